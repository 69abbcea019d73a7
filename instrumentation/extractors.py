"""Extractor paths: where a user id, run id or event type lives, and how to read it cheaply.

Syntax (checked when the path map loads): ``self.a.b`` (attribute or dict-key chain on the
instance), ``arg.NAME.a.b`` (a parameter of the wrapped method, by name, positional or keyword),
``method.name`` and ``method.strip_prefix(P)`` (the method name, whole or without prefix ``P``).

Binding happens once per wrapped (class, method): the parameter's position comes from
``inspect.signature`` then, so a call only indexes ``args``/``kwargs`` and walks attributes.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_STRIP_RE = re.compile(r"^method\.strip_prefix\((.*)\)$")

#: what an extractor returns when the path does not resolve
MISSING: Any = None

Getter = Callable[[Any, tuple, dict], Any]  # (instance, args, kwargs) -> value or None


@dataclass(frozen=True, slots=True)
class ExtractorSpec:
    text: str
    source: str  # "self" | "arg" | "method"
    name: str | None = None  # parameter name for "arg"
    attrs: tuple[str, ...] = ()
    prefix: str | None = None  # for method.strip_prefix; None = method.name


def dotted_names(text: str) -> tuple[str, ...] | None:
    """``a.b.c`` -> ``("a", "b", "c")`` when every part is a Python identifier, the non-ASCII ones
    Python accepts included (``données``, ``चलाओ``); None otherwise."""
    parts = tuple(text.split("."))
    return parts if all(part.isidentifier() for part in parts) else None


def parse_extractor(text: str) -> ExtractorSpec:
    """Parse one extractor path; raise ``ValueError`` saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"an extractor path must be a string, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("self.") and (attrs := dotted_names(text[len("self."):])):
        return ExtractorSpec(text, "self", attrs=attrs)
    if text.startswith("arg.") and (names := dotted_names(text[len("arg."):])):
        return ExtractorSpec(text, "arg", name=names[0], attrs=names[1:])
    if text == "method.name":
        return ExtractorSpec(text, "method")
    if (m := _STRIP_RE.match(text)) and (not m.group(1) or f"_{m.group(1)}".isidentifier()):
        return ExtractorSpec(text, "method", prefix=m.group(1))
    if text.startswith("return"):
        raise ValueError(f"extractor path {text!r}: return values are not supported")
    raise ValueError(f"bad extractor path {text!r}: expected self.a.b, arg.NAME.a.b, method.name "
                     "or method.strip_prefix(P)")


def check_key_chain(text: str) -> str:
    """Validate a dotted key chain of the ``messages`` section (``type``, ``meta.run_id``)."""
    if not isinstance(text, str) or not dotted_names(text):
        raise ValueError(f"bad message key {text!r}: expected a dotted chain of names like meta.run_id")
    return text


def walk(value: Any, attrs: tuple[str, ...]) -> Any:
    """Follow an attribute / dict-key chain; a missing link yields None (a raising property raises).

    Runs on every wrapped call: dicts by key, then attributes; the (slow) ``Mapping`` check only
    happens when an attribute is missing.
    """
    for attr in attrs:
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get(attr)
            continue
        found = getattr(value, attr, _ABSENT)
        if found is _ABSENT:
            found = value.get(attr) if isinstance(value, Mapping) else None
        value = found
    return value


_ABSENT = object()

#: ``functools.partial.__get__`` where it returns the partial unchanged (Python 3.13, with a
#: FutureWarning): a partial is called without the instance, as on 3.11 and 3.12, where it has no
#: ``__get__``. From 3.14 a partial binds like a function (a method descriptor).
_PARTIAL_GET_NOT_BINDING = getattr(functools.partial, "__get__", None) \
    if sys.version_info < (3, 14) else None


def binds_instance(value: Any) -> bool:
    """Whether ``value``, a class attribute other than a staticmethod or classmethod, is called with
    the instance first when read from one: a function or another descriptor, not an object with
    ``__call__`` or a ``functools.partial`` (whose 3.13 ``__get__`` returns it unchanged)."""
    get = getattr(type(value), "__get__", None)
    return get is not None and get is not _PARTIAL_GET_NOT_BINDING


def bind(spec: ExtractorSpec, signature: inspect.Signature | None, method_name: str,
         skip_first: bool) -> Getter | None:
    """A getter for one method, or None when the path can never resolve on it.

    ``skip_first``: the signature's first parameter is ``self``/``cls``, which wrapt does not pass
    in ``args``.
    """
    attrs = spec.attrs
    if spec.source == "method":
        if spec.prefix is None:
            value = method_name
        elif method_name.startswith(spec.prefix) and len(method_name) > len(spec.prefix):
            value = method_name[len(spec.prefix):]
        else:
            return None
        return lambda instance, args, kwargs: value
    if spec.source == "self":
        return lambda instance, args, kwargs: walk(instance, attrs)
    return _bind_arg(spec.name or "", attrs, signature, skip_first)


def _bind_arg(name: str, attrs: tuple[str, ...], signature: inspect.Signature | None,
              skip_first: bool) -> Getter | None:
    if signature is None:  # no signature (builtin): keyword arguments only
        return _keyword_getter(name, attrs)
    params = list(signature.parameters.values())
    if skip_first and params:
        params = params[1:]
    index: int | None = None
    default: Any = None
    keyword_ok = False
    for position, param in enumerate(params):
        if param.name != name:
            continue
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            index = position
        keyword_ok = param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        if param.default is not param.empty:
            default = param.default
        break
    else:
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return _keyword_getter(name, attrs)
        return None
    return _positional_getter(name, index, keyword_ok, default, attrs)


def _keyword_getter(name: str, attrs: tuple[str, ...]) -> Getter:
    def get(instance: Any, args: tuple, kwargs: dict) -> Any:
        value = kwargs.get(name)
        return walk(value, attrs) if attrs else value
    return get


def _positional_getter(name: str, index: int | None, keyword_ok: bool, default: Any,
                       attrs: tuple[str, ...]) -> Getter:
    # Specialized closures: this runs on every wrapped call, so the common shapes avoid a second call.
    position = -1 if index is None else index
    if len(attrs) == 1:
        (first,) = attrs

        def get_one(instance: Any, args: tuple, kwargs: dict) -> Any:
            if keyword_ok and name in kwargs:
                value = kwargs[name]
            elif position >= 0 and position < len(args):
                value = args[position]
            else:
                value = default
            if value is None:
                return None
            if type(value) is dict:
                return value.get(first)
            found = getattr(value, first, _ABSENT)
            return found if found is not _ABSENT else walk(value, attrs)
        return get_one

    def get(instance: Any, args: tuple, kwargs: dict) -> Any:
        if keyword_ok and name in kwargs:
            value = kwargs[name]
        elif position >= 0 and position < len(args):
            value = args[position]
        else:
            value = default
        return walk(value, attrs) if attrs else value
    return get
