"""What a class name says: its role, whether it looks retired, whether it looks like the canonical one.

All of these are guesses and are rendered as such. The role is read from the right of the name:
``SupervisorExecutionEngineAdapter`` is an engine (adapter of one), ``ExecutionEngineFactory`` is
not an engine at all (it makes them).
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")

ROLE_KINDS = {
    "execution_engine": "execute",
    "supervisor": "execute",
    "event_emitter": "emit",
    "socket_manager": "dispatch",
}
_ROLE_TOKENS = {
    "Engine": "execution_engine", "Executor": "execution_engine",
    "Supervisor": "supervisor", "Orchestrator": "supervisor",
    "Emitter": "event_emitter", "Notifier": "event_emitter", "Bridge": "event_emitter",
}
# tokens that qualify a role without changing it (read past them from the right)
_QUALIFIER_TOKENS = frozenset({
    "Adapter", "Wrapper", "Proxy", "Facade", "Impl", "Implementation", "Redirect", "Shim", "Compat",
    "Fallback", "Legacy", "Agent", "Service", "V", "Mixin",
})
_INTERFACE_TOKENS = frozenset({"Base", "Abstract", "Interface", "Protocol", "ABC"})
_RETIRED_TOKENS = {"Legacy": "Legacy", "Deprecated": "Deprecated", "Old": "Old", "Isolated": "Isolated",
                   "Fallback": "Fallback", "Obsolete": "Obsolete"}
_CANONICAL_PREFIXES = ("User", "Unified")


def tokens(name: str) -> list[str]:
    """``WebSocketManagerV2`` -> ``[Web, Socket, Manager, V, 2]``; underscores split too."""
    return [token for part in name.split("_") for token in _TOKEN.findall(part)]


def _normalised(name: str) -> list[str]:
    return [token.capitalize() if token.isupper() and len(token) > 3 else token for token in tokens(name)]


def is_interface_name(name: str) -> bool:
    words = _normalised(name)
    return bool(words) and (words[0] in ("Base", "Abstract") or words[-1] in ("Interface", "Protocol", "ABC"))


def role_from_name(name: str, public_methods: set[str]) -> tuple[str, str]:
    """(role, reason) or ("", "") when the name does not say."""
    words = [word for word in _normalised(name) if not word.isdigit()]
    for word in reversed(words):
        if word in _ROLE_TOKENS:
            return _ROLE_TOKENS[word], f"name ends in {word}"
        if word == "Manager":
            return _manager_role(words, public_methods)
        if word in _QUALIFIER_TOKENS or word in _INTERFACE_TOKENS:
            continue
        return "", ""
    return "", ""


def _manager_role(words: list[str], public_methods: set[str]) -> tuple[str, str]:
    sends = sorted(method for method in public_methods if method.startswith("send_to_"))
    if sends:
        return "socket_manager", f"a Manager with {', '.join(sends[:3])}"
    if "Socket" in words or "Websocket" in words or "Connection" in words or "WS" in words:
        return "socket_manager", "a (Web)Socket/Connection Manager"
    return "", ""


def retired_reason(name: str) -> str:
    words = tokens(name)
    for word in words:
        if word in _RETIRED_TOKENS:
            return f"name says {_RETIRED_TOKENS[word]}"
    return ""


def canonical_by_name(name: str) -> bool:
    words = tokens(name)
    return bool(words) and words[0] in _CANONICAL_PREFIXES


def short_names(keys: list[str]) -> dict[str, str]:
    """``module.Class`` -> the shortest dotted tail that tells it from the other ``keys``: ``Class``, or
    ``chat.supervisor.SupervisorAgent`` when two modules define a ``SupervisorAgent``."""
    found: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        for size in range(1, len(parts) + 1):
            tail = ".".join(parts[-size:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                break
        found[key] = tail
    return found
