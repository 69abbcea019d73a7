"""Linking a socket write to the emit it belongs to.

Inside an emit (same task) the write finds the emit's event through a context variable
(``delivery.link = context``). A write made later in another task (a queue consumer, a batch
flusher) has no context: it reads ``(run_id, event_type)`` from the outgoing message and looks in a
bounded table of recent emits (``delivery.link = message_key``). A write of the very message an emit
of that key was already written with (``message_content``), to a socket that has not had that emit,
is a copy of it: a user's second tab fed the same events, or a tab opened later and sent that event
while the first is open (a history replayed to a new tab). Else it takes the oldest emit nothing has found yet (a
queue delivers in order; unless a dispatch queued that one with another message and the write copies
an emit made before its socket opened), else a copy of one made before its socket opened (a history
sent to a socket that reconnected), else one its socket has not had though it was open when the
emit was made, else the most recent one (a re-send). A socket opened after an emit that went elsewhere (a
reconnect: it went to the old socket) does not get it again. A message carrying its own event id
always wins.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any

from instrumentation.forks import in_forked_child
from instrumentation.identity import new_id_factory

LINK_CONTEXT = "context"
LINK_MESSAGE_KEY = "message_key"
LINK_NONE = "none"

#: emits remembered in all (measured with tracemalloc, each written to one socket with its content:
#: 25.2 MiB with 32 emits a key, 24.7 MiB with 512, 38.2 MiB with one a key; at 16 sockets each:
#: 48.7 MiB the most — the keys' index by content (``_Emits``) and each emit's order took 4 to 9 MiB
#: of it: 16.6, 33.8 and 44.4 MiB without, measured alike; each emit's slot for the message a
#: queueing dispatch named adds 8 bytes, 0.5 MiB); beyond it the oldest emit of the
#: least recently emitted (run_id, event_type) key is forgotten. A write made in another task comes
#: milliseconds after its emit; this holds seconds of a busy process's emits (a bound of keys alone,
#: 65,536 keys of 32, held 2 M emits, 306 MiB)
MAX_EMITS = 65536
#: emits remembered per key (repeated event types within one run: a streamed run's tokens). A socket
#: whose writer task trails the emits of a key by more than this (a slow client, a burst of tokens)
#: has its writes linked to the wrong emits: at 32 a key, a writer 60 tokens behind made false
#: ``no_connection`` and ``duplicate.emission`` findings (/tmp/s29_soakB/repro_token_burst.py).
#: Lookups by key are indexed (``_Emits``): a long stream with a trailing writer task took 3.5 us an
#: event in the table at 512 a key, 11.1 us at 32 walked
MAX_EMITS_PER_KEY = 512
#: sockets remembered per emit as written to (a user's tabs); one more and the emit counts as
#: written to every socket, as when a write's socket is not known
MAX_CONNECTIONS_PER_EMIT = 16

_made = itertools.count()  # the order emits were recorded in (their ``made`` may be set again)

_EVERY_CONNECTION = ("*",)  # written where the socket was not known (or to too many): to any
#: users a fan-out's nested per-user sends named, remembered per emit it sent (``PendingEmits``); one
#: more, or a per-user send naming none, and any user's socket may have it by design
MAX_RECIPIENTS_PER_FAN_OUT = 32
#: an emit a fan-out sent: written by design to any user's socket (no per-user send named its users)
_FANNED = ()
_ANYONE = ("*",)

#: one order for emits made and sockets opened in the process: a socket may get an emit that went
#: to another socket only if it was open before the emit was made (``connection_opened``)
_order = itertools.count(1)


def connection_opened() -> int:
    """The place of a socket opening now in the order of emits (the middleware calls it when a
    WebSocket connection begins)."""
    return next(_order)


#: the sockets the middleware saw open and not yet closed: a write copying an emit made before its
#: socket opened is a replay only while a socket that had the emit is still open (else the user
#: reconnected, and the write is an event queued while away)
_open_sockets: set[str] = set()


def socket_open(connection_id: str) -> None:
    """The middleware serves the socket ``connection_id`` from now on."""
    _open_sockets.add(connection_id)


def socket_closed(connection_id: str) -> None:
    """The middleware is done with the socket ``connection_id`` (its endpoint returned or raised)."""
    _open_sockets.discard(connection_id)


@in_forked_child
def _forget_open_sockets() -> None:
    _open_sockets.clear()  # the parent's to serve


new_event_id = new_id_factory("e")


class EventRef:
    """The event an emit (or a dispatch that found it) is producing, visible to writes below it."""

    __slots__ = ("event_id", "run_id", "event_type", "link")

    def __init__(self, event_id: str, run_id: str | None, event_type: str | None, link: str) -> None:
        self.event_id = event_id
        self.run_id = run_id
        self.event_type = event_type
        self.link = link  # how writes below this point reach the emit


current_event: ContextVar[EventRef | None] = ContextVar("pathwatch_event", default=None)


def event_in_context(run_id: str | None, event_type: str | None) -> EventRef | None:
    """The event of the emit this code runs under, unless what is being sent names another run or
    event type. A task started inside an emit call (a lazily started flusher or worker) copies the
    context and keeps the first event for its whole life: its later sends are not that event."""
    event = current_event.get()
    if event is None:
        return None
    if run_id is not None and event.run_id is not None and run_id != event.run_id:
        return None
    if event_type is not None and event.event_type is not None and event_type != event.event_type:
        return None
    return event


class DispatchCounter:
    """Counts the socket writes made inside one dispatch call, those made through a dispatch nested
    in it included (``live`` until it ends: a task it started and that writes later does not count
    for it). ``fan_out``: the call is of a method the path map declares a fan-out."""

    __slots__ = ("writes", "live", "outer", "fan_out", "fanned")

    def __init__(self, outer: DispatchCounter | None, fan_out: bool = False) -> None:
        self.writes = 0
        self.live = True
        self.fan_out = fan_out
        #: a fan-out call's: (run_id, event_type, event_id) of the emit it sent, when remembered
        #: (``PendingEmits.fanned_out``): the per-user sends nested in it name its recipients
        self.fanned: tuple[str, str, str] | None = None
        # the dispatch call this one runs inside (of any role): a write here is a write of that
        # call too (``send_to_thread`` delegating to ``send_to_user`` wrote what the delegate wrote)
        while outer is not None and not outer.live:  # an ended one never counts again: skipped
            outer = outer.outer
        self.outer = outer


def in_fan_out(dispatch: DispatchCounter | None) -> bool:
    """Whether a write made under ``dispatch`` (the innermost dispatch call it runs inside) is one
    of a fan-out call still running: that call or one it runs inside."""
    while dispatch is not None:
        if dispatch.live and dispatch.fan_out:
            return True
        dispatch = dispatch.outer
    return False


def fan_out_sent(dispatch: DispatchCounter | None) -> tuple[str, str, str] | None:
    """The emit (run_id, event_type, event_id) sent by the live fan-out call ``dispatch`` (the
    innermost dispatch call a new one runs inside) is, or runs inside; None when there is none."""
    while dispatch is not None:
        if dispatch.live and dispatch.fan_out:
            return dispatch.fanned
        dispatch = dispatch.outer
    return None


current_dispatch: ContextVar[DispatchCounter | None] = ContextVar("pathwatch_dispatch", default=None)


def count_write(dispatch: DispatchCounter | None) -> None:
    """Count one socket write for ``dispatch`` (the innermost one it runs inside) and every live
    dispatch call that one runs inside."""
    while dispatch is not None:
        if dispatch.live:
            dispatch.writes += 1
        dispatch = dispatch.outer


class RoleWrite:
    """The call of a ``deliver`` role in progress: that call's span is the write's deliver span. The
    Starlette write under it makes no span of its own; it tells this one its connection and whether
    the socket was closed (``live`` until the call ends: a task it started writes on its own)."""

    __slots__ = ("span", "live", "closed", "writes", "setting")

    def __init__(self, span: Any, setting: Any = None) -> None:
        self.span = span
        #: the setting the span was started under (its tracer's key): the connection user is
        #: pseudonymized with it (None: the current one)
        self.setting = setting
        self.live = True
        self.closed = False  # the write hit a closed socket, whether or not the call then raised
        self.writes = 0  # the first write is the call's; more (a broadcast) make spans of their own


# a write inside send_json -> send, or inside a deliver role's call, must count once: the outer
# wrapper marks the write in progress (True for a Starlette write, a RoleWrite for a role's call)
write_in_progress: ContextVar[bool | RoleWrite] = ContextVar("pathwatch_write", default=False)


def role_write_in_progress() -> RoleWrite | None:
    """The live deliver-role call this code runs under, if any."""
    current = write_in_progress.get()
    if type(current) is RoleWrite and current.live:
        return current
    return None


class _Emits(list):
    """The emits of one key, oldest first, with what the lookups by key read without a walk of them
    all: ``contents``, content key -> the emits written with it, oldest first (made once the key
    holds more than ``_INDEXED_FROM`` emits: a short key is walked); ``target``, the user its first
    emit is addressed to, and ``mixed``, whether another user's emit was recorded since; ``lead``,
    how many emits at the front are found (none is ever unfound again)."""

    __slots__ = ("contents", "target", "mixed", "lead")

    def __init__(self, target: str | None) -> None:
        super().__init__()
        self.contents: dict[int, list[list]] | None = None
        self.target = target
        self.mixed = False
        self.lead = 0

    def add(self, emit: list) -> None:
        self.append(emit)
        if emit[5] != self.target:
            self.mixed = True
        if self.contents is None and len(self) > _INDEXED_FROM:
            self.contents = {}
            for kept in self:
                if kept[4] is not None:
                    _index(self.contents, kept)

    def drop_oldest(self) -> list:
        emit = self.pop(0)
        if emit[4] is not None and self.contents is not None:
            same = self.contents[emit[4]]
            same.remove(emit)
            if not same:
                del self.contents[emit[4]]
        if self.lead:
            self.lead -= 1
        return emit

    def first_unfound(self) -> int:
        """The place of the oldest emit nothing has found (``len`` when every one was)."""
        lead = self.lead
        while lead < len(self) and self[lead][1]:
            lead += 1
        self.lead = lead
        return lead


#: a key holding more emits than this indexes them by content (``_Emits.contents``)
_INDEXED_FROM = 16


def _set_content(emits: _Emits, emit: list, content: int | None) -> None:
    """``emit``, one of the key's ``emits``, was written with a message of ``content``: its first
    one is kept, and indexed."""
    if emit[4] is not None or content is None:
        return
    emit[4] = content
    if emits.contents is not None:
        _index(emits.contents, emit)


def _index(contents: dict[int, list[list]], emit: list) -> None:
    same = contents.get(emit[4])
    if same is None:
        contents[emit[4]] = [emit]
    else:  # written in the order they were recorded, or near it: kept oldest first
        index = len(same)
        while index and same[index - 1][8] > emit[8]:
            index -= 1
        same.insert(index, emit)


class PendingEmits:
    """Bounded table (run_id, event_type) -> recent emits, each [event_id, matched, made, written,
    content, target, fanned, sent, recorded]: at most ``max_emits`` emits in all, ``per_key`` of one key.
    ``matched``: a write or a dispatch found it; ``made``: its place in the order of emits and
    sockets; ``written``: the sockets it was written to (None: none yet; one's id; a tuple of ids;
    ``_EVERY_CONNECTION``: not known which); ``content``: the ``message_content.content_key`` of the
    first message written for it that had one (None: none yet); ``target``: the user (pseudonym) it
    is addressed to, if it names one; ``fanned``: a dispatch the path map declares a fan-out sent it
    (``fan_out``): its writes are a fan-out's, wherever they are made (each socket's own writer) —
    False: not fanned out; a tuple: the users the per-user sends nested in the fan-out named
    (``add_recipient``), whose sockets alone have it by design, a write to another user's socket
    being a misroute (a stale socket map putting a member's copy on another socket's queue); empty
    (none named: a fan-out writing or queueing straight to sockets) or ``_ANYONE`` (one more than
    ``MAX_RECIPIENTS_PER_FAN_OUT``, or a per-user send naming none): any socket; ``sent``: the
    ``content_key`` of the message a dispatch that wrote nothing itself (it queued it) sent it with
    (``sent``; None: not known).

    A key can hold several users' emits: their clients number runs alike (each from 1), and each
    user's socket has a writer of its own, so their writes come in any order. A write to a socket of
    a known user (a dispatch addressed to one) takes an emit addressed to that user when the key has
    one, by the rules below among those; another user's only when it has none (a misrouted event:
    bleed reports it).

    A write whose message has the content an emit of its key was written with, on a socket that has
    not had that emit, takes it: a copy of the emit. Of those, first the oldest one the socket was
    open for when it was made (a tab the queue writes each event to after another), else the oldest
    one written to a socket still open (the socket opened after it: a history replayed to a new tab;
    with the sockets that had it closed it is a reconnect, and the write is rather an event queued
    while away, below). Otherwise a write takes the oldest emit nothing has found, as a queue
    delivers in order: the events of a run moved to the user's other open tab or device go to it,
    and a user who reconnects gets the events queued while away. Only when every emit was found does
    a copy take the emit it copies whatever the sockets (a history sent to a socket that
    reconnected), and a socket take one it has not had though it was open when the emit was made (two tabs of one user
    fed by one queue, whose messages differ per tab). A reconnected socket never takes the old
    socket's events by these rules (it opened after them, and the old socket is closed)."""

    def __init__(self, max_emits: int = MAX_EMITS, per_key: int = MAX_EMITS_PER_KEY) -> None:
        self._table: OrderedDict[tuple[str, str], _Emits] = OrderedDict()
        self._lock = threading.Lock()
        self._max_emits = max_emits
        self._per_key = per_key
        self._held = 0  # emits in the table
        #: (run_id, event_type) -> contents of messages fan-outs made outside any emit sent while
        #: the key's unwritten emits were addressed to several users (``fan_out_by_key``): which
        #: one they sent is known only when a write of that content finds its user's own emit
        self._claims: dict[tuple[str, str], list[int]] = {}
        #: unmatched emits forgotten (beyond the bound in all, or beyond the per-key bound): a write
        #: that comes for one of them later finds no emit by key
        self.evicted = 0

    def __len__(self) -> int:
        """The emits held."""
        return self._held

    def record(self, run_id: str, event_type: str, event_id: str, target: str | None = None) -> None:
        with self._lock:
            self._add((run_id, event_type), [event_id, False, next(_order), None, None, target, False,
                                             None, next(_made)])

    def _add(self, key: tuple[str, str], entry: list) -> None:
        """``entry`` after ``key``'s emits, within the bounds (the caller holds the lock)."""
        emits = self._table.get(key)
        if emits is None:
            emits = self._table[key] = _Emits(entry[5])
        else:
            self._table.move_to_end(key)
        emits.add(entry)
        if len(emits) > self._per_key:
            self.evicted += not emits.drop_oldest()[1]
        else:
            self._held += 1
        while self._held > self._max_emits:  # the oldest emit of the least recent key
            oldest_key, oldest = next(iter(self._table.items()))
            self.evicted += not oldest.drop_oldest()[1]
            self._held -= 1
            if not oldest:
                del self._table[oldest_key]
                self._claims.pop(oldest_key, None)

    def fan_out_by_key(self, run_id: str, event_type: str,
                       content: int | None) -> tuple[str, bool] | None:
        """(event id, fanned out) of the emit a fan-out made outside any emit sent, found by key:
        the oldest one nothing has found, marked found and fanned out — when the key's unfound
        emits are addressed to one user (or name none). It is sent now, with the message of
        ``content``: the members' writes of it, made later (each socket's writer), are copies of
        it on any socket open now, not the user's next emit (unfound then). When they are
        addressed to several users (clients numbering runs alike: a stale emit of an offline user,
        two users' runs at once)
        which one it sent is not known: none is taken (None), and the fan-out's message
        ``content`` is remembered, so that the first write by key of that content on a socket of a
        user with an unfound emit of the key takes it as the one the fan-out sent (``linked``),
        and until then a write of it on a socket of a user with none is linked to no emit."""
        key = (run_id, event_type)
        with self._lock:
            emits = self._table.get(key)
            if not emits:
                return None
            unfound = [emit for emit in emits if not emit[1]]
            if len({emit[5] for emit in unfound}) > 1:
                if content is not None:
                    claims = self._claims.setdefault(key, [])
                    claims.append(content)
                    if len(claims) > self._per_key:
                        del claims[0]
                return None
            emit = unfound[0] if unfound else emits[-1]
            emit[1] = True
            emit[2] = next(_order)  # a socket open now was open for it
            _set_content(emits, emit, content)
            if emit[6] is False:
                emit[6] = _FANNED
            return emit[0], True

    def match(self, run_id: str, event_type: str, connection_id: str | None = None,
              opened: int | None = None, content: int | None = None,
              user: str | None = None) -> str | None:
        """Event id of the emit ``linked`` finds (None: none)."""
        found = self.linked(run_id, event_type, connection_id, opened, content, user)
        return None if found is None else found[0]

    def linked(self, run_id: str, event_type: str, connection_id: str | None = None,
               opened: int | None = None, content: int | None = None,
               user: str | None = None) -> tuple[str, bool] | None:
        """(event id, fanned out) of the emit with that key a write of a message with ``content``
        (``message_content.content_key``) on ``connection_id``, opened at ``opened``
        (``connection_opened``), belongs to: a copy of one written with that content, else the
        oldest one nothing has found yet (unless it was queued with another message, ``sent``,
        and the write copies one made before the socket opened), else a copy of one made before
        the socket opened, else the oldest one that socket has not had though it was open when it
        was made, else the newest (a re-send); marked found (written to that socket).
        A dispatch or a write whose socket or its opening is not known takes the oldest one nothing
        has found, else the newest. With ``user`` (the socket's, or the dispatch's recipient), only
        the emits addressed to that user are looked at, if the key has any. A write of the message
        of a fan-out whose emit was not known (``fan_out_by_key``) takes the oldest unfound emit of
        its socket's user as that fan-out's, or none when that user has none."""
        with self._lock:
            emits = self._table.get((run_id, event_type))
            if not emits:
                return None
            whole = emits  # the key's: indexed (emits may become some of them, below)
            own = True
            if (user is not None and (emits.mixed or user != emits.target)
                    and any(emit[5] != user for emit in emits)):
                mine = [emit for emit in emits if emit[5] == user]
                own = bool(mine)
                emits = mine or emits
            claims = self._claims.get((run_id, event_type))
            claimed = None
            if claims and content is not None and content in claims:
                # a copy of a fan-out's message whose emit is not known yet (``fan_out_by_key``)
                if user is None or not own:
                    return None  # not this user's event: the one it copies is not known
                claimed = _claimed(emits, user)  # else: the user's own, linked as a write's
            if claimed is not None:
                claims.remove(content)
                if not claims:
                    del self._claims[(run_id, event_type)]
                claimed[1] = True
                if claimed[6] is False:
                    claimed[6] = _FANNED
                if connection_id is not None:
                    claimed[3] = _with(claimed[3], connection_id)
                    _set_content(whole, claimed, content)
                return claimed[0], True
            if content is not None and opened is not None:
                copied = _copied(emits, content, connection_id, opened)
                if copied is not None:
                    copied[3] = _with(copied[3], connection_id)
                    return copied[0], _fanned_for(copied[6], user)
            start = emits.first_unfound() if emits.__class__ is _Emits else 0
            for emit in itertools.islice(emits, start, None):
                if not emit[1]:
                    if (content is not None and opened is not None and emit[7] is not None
                            and emit[7] != content):
                        # queued with another message, so not this write (a queue writes in
                        # order): a copy of an emit written before (rule 1 found none the socket
                        # was open for) is a history replayed to a socket that reconnected
                        replayed = _replayed(emits, content, connection_id)
                        if replayed is not None:
                            replayed[3] = _with(replayed[3], connection_id)
                            return replayed[0], _fanned_for(replayed[6], user)
                    emit[1] = True
                    if connection_id is not None:
                        emit[3] = _with(emit[3], connection_id)
                        _set_content(whole, emit, content)
                    return emit[0], _fanned_for(emit[6], user)
            if opened is not None:  # every emit was found: another socket's copy of one?
                if content is not None:
                    replayed = _replayed(emits, content, connection_id)
                    if replayed is not None:  # a history sent to a socket opened after it
                        replayed[3] = _with(replayed[3], connection_id)
                        return replayed[0], _fanned_for(replayed[6], user)
                for emit in emits:
                    if opened < emit[2] and not _written_to(emit[3], connection_id):
                        emit[3] = _with(emit[3], connection_id)
                        _set_content(whole, emit, content)
                        return emit[0], _fanned_for(emit[6], user)
            return emits[-1][0], _fanned_for(emits[-1][6], user)

    def mark(self, run_id: str | None, event_type: str | None, event_id: str,
             connection_id: str | None = None, content: int | None = None,
             user: str | None = None) -> bool:
        """Mark an emit found because a write found it another way (context or its own id): written
        to ``connection_id``, or to every socket when the write's is not known; written with a
        message of ``content`` if it had none. Returns whether a fan-out sent it to the socket's
        ``user`` (any user's, when no per-user send nested in it named its recipients)."""
        if run_id is None or event_type is None:
            return False
        with self._lock:
            emits = self._table.get((run_id, event_type), ())
            for emit in reversed(emits):  # a write in its emit: of one of the newest
                if emit[0] == event_id:
                    emit[1] = True
                    emit[3] = (_EVERY_CONNECTION if connection_id is None
                               else _with(emit[3], connection_id))
                    _set_content(emits, emit, content)
                    return _fanned_for(emit[6], user)
        return False

    def sent(self, run_id: str, event_type: str, event_id: str, content: int | None) -> None:
        """A dispatch that wrote nothing itself (it queued the message for a writer task, or found
        no socket) sent the emit ``event_id`` with a message of ``content``: a write of another
        message does not take it while it is unfound if that write copies an emit written before
        (a history replayed to a socket that reconnected while it waits: ``linked``)."""
        if content is None:
            return
        with self._lock:
            for emit in reversed(self._table.get((run_id, event_type), ())):
                if emit[0] == event_id:
                    if emit[7] is None:
                        emit[7] = content
                    return

    def fanned_out(self, run_id: str | None, event_type: str | None, event_id: str,
                   made_elsewhere: bool = False) -> None:
        """A dispatch the path map declares a fan-out sent the emit ``event_id``: its writes made
        elsewhere (each socket's writer task, linked by key or by the message's own id) are a
        fan-out's. ``made_elsewhere``: the id is the message's own, and an emit the table does not
        have was made in another process (a pub/sub relay): it is added, found and fanned out, so
        that the writes of its message here are the fan-out's as well."""
        if run_id is None or event_type is None:
            return
        key = (run_id, event_type)
        with self._lock:
            for emit in reversed(self._table.get(key, ())):
                if emit[0] == event_id:
                    if emit[6] is False:
                        emit[6] = _FANNED
                    return
            if made_elsewhere:
                self._add(key, [event_id, True, next(_order), None, None, None, _FANNED, None, next(_made)])

    def add_recipient(self, run_id: str, event_type: str, event_id: str, user: str | None) -> None:
        """A per-user send nested in the fan-out that sent the emit ``event_id`` is addressed to
        ``user`` (None: it names none, so any user's socket may have the emit)."""
        with self._lock:
            for emit in reversed(self._table.get((run_id, event_type), ())):
                if emit[0] == event_id:
                    recipients = emit[6]
                    if recipients is False or recipients is _ANYONE or user in recipients:
                        return
                    emit[6] = (_ANYONE if user is None
                               or len(recipients) >= MAX_RECIPIENTS_PER_FAN_OUT
                               else (*recipients, user))
                    return

    def clear(self) -> None:
        with self._lock:
            self._table.clear()
            self._claims.clear()
            self._held = 0

    def after_fork_in_child(self) -> None:
        """A forked child starts empty, under a new lock (another thread of the parent may have held
        the old one at the fork): the parent's emits are the parent's to link, and the child
        reports its own evictions."""
        self._lock = threading.Lock()
        self._table = OrderedDict()
        self._claims = {}
        self._held = 0
        self.evicted = 0


def _with_content(emits: list[list], content: int) -> list[list]:
    """The emits of ``emits`` that may have been written with ``content``, oldest first: the key's
    index of them, or all (a list of some of a key's emits)."""
    if emits.__class__ is _Emits and emits.contents is not None:
        return emits.contents.get(content, ())
    return emits


def _copied(emits: list[list], content: int, connection_id: str | None,
            opened: int) -> list | None:
    """The emit a write of a message of ``content`` on a socket opened at ``opened`` is a copy of:
    the oldest one written with that content that the socket has not had and was open for when it
    was made, else the oldest such one made before it opened and written to a socket still open."""
    replayed = None
    for emit in _with_content(emits, content):
        if emit[4] != content or _written_to(emit[3], connection_id):
            continue
        if opened < emit[2]:
            return emit
        if replayed is None and _still_open(emit[3]):
            replayed = emit
    return replayed


def _claimed(emits: list[list], user: str) -> list | None:
    """The emit a fan-out whose emit was not known sent, found by a write of its message on a socket
    of ``user`` (``emits``: those addressed to that user): the oldest one nothing has found."""
    for emit in emits:
        if not emit[1] and emit[5] == user:
            return emit
    return None


def _replayed(emits: list[list], content: int, connection_id: str | None) -> list | None:
    """The oldest emit written with ``content`` that the socket has not had, when every emit was
    found: no event is waiting, so the write is a copy of one (a history sent to a socket that
    reconnected: those that had it are closed) rather than an event queued while away."""
    for emit in _with_content(emits, content):
        if emit[4] == content and not _written_to(emit[3], connection_id):
            return emit
    return None


def _still_open(written: str | tuple | None) -> bool:
    """Whether a socket ``written`` names is open (not one written where its socket is not known)."""
    if written is None or written is _EVERY_CONNECTION:
        return False
    if written.__class__ is str:
        return written in _open_sockets
    return any(connection_id in _open_sockets for connection_id in written)


def _fanned_for(fanned: bool | tuple, user: str | None) -> bool:
    """Whether a write to a socket of ``user`` (None: not known) of an emit is a fan-out's by
    design: the emit was fanned out, to any user or to ``user`` among the recipients named."""
    if fanned is False:
        return False
    if not fanned or fanned is _ANYONE or user is None:
        return True
    return user in fanned


def _written_to(written: str | tuple | None, connection_id: str) -> bool:
    if written is None:
        return False
    if written.__class__ is str:
        return written == connection_id
    return written is _EVERY_CONNECTION or connection_id in written


def _with(written: str | tuple | None, connection_id: str) -> str | tuple:
    """``written`` and ``connection_id``: one socket as its id (the usual case, and the id is the
    socket's own string: no allocation), several as a tuple (a user has a few tabs)."""
    if written is None:
        return connection_id
    if _written_to(written, connection_id):
        return written
    if written.__class__ is str:
        return (written, connection_id)
    if len(written) >= MAX_CONNECTIONS_PER_EMIT:
        return _EVERY_CONNECTION
    return (*written, connection_id)


pending_emits = PendingEmits()


in_forked_child(pending_emits.after_fork_in_child)
