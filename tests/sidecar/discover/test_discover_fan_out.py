"""Discovery proposes ``fan_out`` for a dispatch role's methods that send one message to several users
by name or by shape, and for nothing else: a draft without it pages bleed.target_vs_socket_owner on
every broadcast once adopted; one with a per-user send in it hides that send's bleeds."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import yaml
from starlette.testclient import TestClient

from instrumentation.pathmap import PathMap
from sidecar.detectors.bleed import BleedDetector
from sidecar.discover import discover
from sidecar.discover.render import render_yaml
from tests.sidecar.detectors.factory import NOW, S, rules, state
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend
from tests.sidecar.detectors.test_bleed_instrumented_fan_out import BACKEND, room_app, send

MANAGER = """\
import asyncio


class WebSocketManager:
    def __init__(self):
        self.sockets = {}
        self.rooms = {}
        self.threads = {}

    async def send_to_user(self, user_id, message):
        for websocket in self.sockets.get(user_id, []):
            await websocket.send_json(message)

    async def send_to_room(self, room, message):           # by name
        for user_id in self.rooms.get(room, []):
            await self.send_to_user(user_id, message)

    async def broadcast(self, message):                     # by name
        for sockets in self.sockets.values():
            for websocket in sockets:
                await websocket.send_json(message)

    async def send_to_thread(self, thread_id, message):     # by shape: a per-user send per participant
        await asyncio.gather(*(self.send_to_user(u, message) for u in self.threads[thread_id]))

    async def send_to_session(self, session_id, message):   # one user's send under another name
        await self.send_to_user(self.owner_of(session_id), message)

    async def broadcast_to_user(self, user_id, message):    # named broadcast, one recipient
        await self.send_to_user(user_id, message)

    async def send_to_connections(self, user_id, message):  # loops, but over one user's sockets
        for websocket in self.sockets.get(user_id, []):
            await self.send_to_user(user_id, message)

    def owner_of(self, session_id):
        return session_id
"""


def tree(root: Path, files: dict[str, str]) -> Path:
    package = root / "app"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in files.items():
        (package / name).write_text(textwrap.dedent(source))
    return package


def sockets_role(package: Path):
    found = discover(package)
    [role] = [role for role in found.roles if role.name == "socket_manager"]
    return found, role


def test_fan_outs_are_proposed_by_name_and_by_shape_and_per_user_sends_are_not(tmp_path):
    found, role = sockets_role(tree(tmp_path, {"sockets.py": MANAGER}))
    assert role.fan_out == ["broadcast", "send_to_room", "send_to_thread"]
    assert "send_to_thread: calls send_to_user once per item of a loop" in role.fan_out_note
    # a name that says broadcast but takes a user is left out, and the draft says why
    assert "broadcast_to_user" not in role.fan_out and "send_to_user" not in role.fan_out
    draft = render_yaml(found)
    assert "fan_out: [broadcast, send_to_room, send_to_thread]" in draft
    assert "TODO confirm: fan_out is a guess" in draft and "would hide its bleeds" in draft
    data = yaml.safe_load(draft)
    assert data["roles"]["socket_manager"]["fan_out"] == ["broadcast", "send_to_room", "send_to_thread"]
    # the draft loads: every fan_out name is among the wrapped methods
    PathMap.from_yaml(draft, source="draft.yaml")


def test_a_method_taking_a_user_id_is_never_a_fan_out_whatever_its_name(tmp_path):
    source = """\
    class WebSocketManager:
        async def send_to_user(self, user_id, message):
            pass

        async def broadcast(self, user_id, message):
            pass

        async def send_to_room(self, room, message, user_context):
            pass
    """
    found, role = sockets_role(tree(tmp_path, {"sockets.py": source}))
    assert role.fan_out == []
    assert "broadcast (takes user_id: one user's send)" in role.fan_out_note
    assert "send_to_room (takes user_context: one user's send)" in role.fan_out_note
    assert "# fan_out: none guessed (not proposed: broadcast" in render_yaml(found)


def test_a_send_that_fans_out_on_only_some_implementations_is_not_proposed(tmp_path):
    source = """\
    class WebSocketManager:
        async def send_to_user(self, user_id, message):
            pass

        async def send_to_thread(self, thread_id, message):
            for user_id in self.participants(thread_id):
                await self.send_to_user(user_id, message)


    class LegacyWebSocketManager:
        async def send_to_user(self, user_id, message):
            pass

        async def send_to_thread(self, thread_id, message):
            await self.send_to_user(thread_id, message)
    """
    _, role = sockets_role(tree(tmp_path, {"sockets.py": source}))
    assert role.fan_out == []
    assert "send_to_thread (not a fan-out on every implementation)" in role.fan_out_note


def test_a_thread_id_forwarded_as_a_user_id_is_not_a_fan_out():
    """The reference backend's send_to_thread (a bug, S2) only forwards: one user's send."""
    found = discover(Path(__file__).parent / "fixtures" / "agent_app")
    [role] = [role for role in found.roles if role.name == "socket_manager"]
    assert role.fan_out == [] and role.fan_out_note == ""
    assert "# fan_out: none guessed  # TODO confirm" in render_yaml(found)


def test_other_kinds_get_no_fan_out(tmp_path):
    source = """\
    class AgentWebSocketBridge:
        async def broadcast_started(self, run_id):
            pass

        async def broadcast_done(self, run_id):
            pass
    """
    found = discover(tree(tmp_path, {"events.py": source}))
    [role] = found.roles
    assert role.kind == "emit" and role.fan_out == []
    assert "fan_out" not in render_yaml(found)


_modules = itertools.count()


def test_the_adopted_draft_raises_no_bleed_on_a_broadcast_or_a_room_send(tmp_path, monkeypatch):
    """End to end: the draft discovery writes for a backend with a room send and a broadcast, used
    as it is by the instrumentation, on real sockets. Before, the draft had no fan_out and each of
    these events was a critical bleed.target_vs_socket_owner."""
    module = f"pw_discover_fan_out_{next(_modules)}"
    source_root = tmp_path / "src"
    source_root.mkdir()
    (source_root / f"{module}.py").write_text(BACKEND)
    draft = render_yaml(discover(source_root))
    assert yaml.safe_load(draft)["roles"]["socket_manager"]["fan_out"] == ["broadcast", "send_to_room"]
    with instrumented_backend(tmp_path, monkeypatch, module, BACKEND, draft) as (backend, exporter):
        with TestClient(room_app(backend)) as client:
            assert [m["type"] for m in send(client, "ask", ("alice", "bob", "carol"))] == ["agent_thinking"] * 3
            assert [m["type"] for m in send(client, "notice", ("alice", "bob", "carol"))] == ["system_notice"] * 3
        spans = decoded(exporter)
    bleed = BleedDetector(rules(), state())
    assert bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S) == []
