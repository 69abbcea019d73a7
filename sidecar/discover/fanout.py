"""Guess a dispatch role's fan-outs: the methods that send one message to several users by design.

The path map's ``fan_out`` tells bleed not to judge such a call's writes against the user of the event
they carry (an event for the user who asked, sent to the whole room); left out, every broadcast pages
``bleed.target_vs_socket_owner``. Listed wrongly, it hides a real bleed of a per-user send. So the
guess is conservative: a method is proposed only when every implementation defining it takes no
parameter naming one user (``user_id``, a user context) and either

- its name says several recipients: ``broadcast*``/``multicast*`` (not ``broadcast_to_user``), or
  ``send_to_`` a room, group, channel, all, everyone, users, members, participants, subscribers; or
- its shape does: it calls a per-user send of its own class (a send taking a user id) once per item
  of a loop or comprehension (``for user_id in room: await self.send_to_user(user_id, message)``).

``send_to_thread(thread_id, message)`` that only forwards to ``send_to_user`` is not one: a thread id
passed on as a user id is one user's send (or a bug), not a fan-out.
"""

from __future__ import annotations

import fnmatch

from sidecar.discover.extractors import is_context_name
from sidecar.discover.model import ClassInfo, Method
from sidecar.discover.resolve import all_methods

_FAN_OUT_PREFIXES = ("broadcast", "multicast")
_GROUP_WORDS = frozenset({"room", "rooms", "group", "groups", "channel", "channels", "all", "everyone",
                          "users", "members", "participants", "subscribers"})
_ONE_RECIPIENT_WORDS = frozenset({"user", "connection", "socket", "client", "session"})
_SEND_PREFIXES = ("send", "broadcast", "multicast")


def takes_one_user(method: Method) -> str:
    """The parameter naming one user (``user_id``, a user context), "" when there is none."""
    for param in method.params:
        if param.name.lstrip("_") == "user_id" or is_context_name(param.name):
            return param.name
    return ""


def named_fan_out(name: str) -> bool:
    words = name.lstrip("_").split("_")
    if words[-1] in _ONE_RECIPIENT_WORDS:
        return False
    if words[0] in _FAN_OUT_PREFIXES:
        return True
    return words[:2] == ["send", "to"] and len(words) > 2 and words[2] in _GROUP_WORDS


def _per_user_send_looped(cls_key: str, method: Method, classes: dict[str, ClassInfo]) -> str:
    """The per-user send of its own class ``method`` calls once per item of a loop, "" if none."""
    own = all_methods(cls_key, classes)
    for callee in method.looped_self_calls:
        owner = own.get(callee)
        if owner is None or not callee.lstrip("_").startswith(_SEND_PREFIXES):
            continue
        if takes_one_user(classes[owner].methods[callee]):
            return callee
    return ""


def _why(name: str, cls_key: str, classes: dict[str, ClassInfo]) -> tuple[str, str]:
    """(reason it is a fan-out, reason it is not) for one implementation's ``name``."""
    owner = all_methods(cls_key, classes)[name]
    method = classes[owner].methods[name]
    user = takes_one_user(method)
    if user:
        return "", f"takes {user}: one user's send"
    if named_fan_out(name):
        return "named for several recipients, takes no user id", ""
    callee = _per_user_send_looped(cls_key, method, classes)
    if callee:
        return f"calls {callee} once per item of a loop, takes no user id", ""
    return "", ""


def guess_fan_out(members: list[str], methods: list[str],
                  classes: dict[str, ClassInfo]) -> tuple[list[str], str]:
    """(method names to declare ``fan_out``, why; and which look-alikes were left out and why)."""
    names = sorted({name for key in members for name in all_methods(key, classes)
                    if not name.startswith("_") and any(fnmatch.fnmatchcase(name, p) for p in methods)})
    chosen: list[str] = []
    reasons: list[str] = []
    left_out: list[str] = []
    for name in names:
        verdicts = [_why(name, key, classes) for key in members if name in all_methods(key, classes)]
        yes = [why for why, _ in verdicts if why]
        no = [why_not for _, why_not in verdicts if why_not]
        if yes and len(yes) == len(verdicts):
            chosen.append(name)
            reasons.append(f"{name}: {yes[0]}")
        elif yes or named_fan_out(name):   # looks like one somewhere: say why it is not proposed
            left_out.append(f"{name} ({no[0] if no else 'not a fan-out on every implementation'})")
    note = "; ".join(reasons)
    if left_out:
        note += ("; " if note else "") + "not proposed: " + ", ".join(left_out)
    return chosen, note
