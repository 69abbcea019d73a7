"""The content of an outgoing message as one number (instrumentation/message_content.py): equal for
the same message, bounded in what it reads, never raising."""

from __future__ import annotations

import json

from instrumentation.message_content import MAX_VALUES, TEXT_ENDS, content_key

MESSAGE = {"type": "agent_thinking", "run_id": "run-1", "payload": {"step": 1, "tools": ["a", None]}}


def test_the_same_message_has_one_content_and_another_message_another():
    assert content_key(MESSAGE) == content_key(json.loads(json.dumps(MESSAGE))) is not None
    assert content_key(MESSAGE) != content_key({**MESSAGE, "payload": {"step": 2, "tools": ["a", None]}})
    assert content_key({"done": True}) != content_key({"done": 1})  # true is not 1
    text = json.dumps(MESSAGE)
    assert content_key(text) == content_key(text[:]) != content_key(text.replace("1", "2"))
    raw = text.encode()
    assert content_key(raw) == content_key(bytearray(raw)) == content_key(memoryview(raw))


def test_a_long_message_is_read_by_its_ends_and_length_and_a_large_one_up_to_a_bound():
    long = "x" * 1_000_000
    assert content_key(long) != content_key(long + "x")  # its length
    assert content_key("a" + long) != content_key("b" + long)  # its first characters
    assert content_key("a" + long + "b") == content_key("a" + long[:500_000] + "y" + long[500_001:] + "b")
    rows = [{"id": n} for n in range(10_000)]
    changed = rows[:MAX_VALUES] + [{"id": -1}] + rows[MAX_VALUES + 1:]
    assert content_key({"rows": rows}) == content_key({"rows": changed})  # past the bound
    assert content_key({"rows": rows}) != content_key({"rows": rows[:-1]})  # its length
    assert TEXT_ENDS > 0


def test_what_it_cannot_read_has_no_content_and_never_raises():
    class Event:
        type = "agent_thinking"

    class Broken(dict):
        def items(self):
            raise RuntimeError("the app's bug")

    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert content_key(Event()) is None
    assert content_key({"event": Event()}) is None
    assert content_key(Broken(a=1)) is None
    assert content_key({("a", 1): 1}) is None
    assert content_key(memoryview(b"abcd")[::2]) is not None
    assert content_key(deep) is not None  # read to a bounded depth


def test_enums_and_subclasses_of_json_types_are_read_as_json_dumps_takes_them():
    import collections
    import enum

    class Kind(str, enum.Enum):
        THINKING = "agent_thinking"

    class Step(enum.IntEnum):
        FIRST = 1

    message = {"type": Kind.THINKING, "step": Step.FIRST}
    assert content_key(message) == content_key(dict(message)) is not None
    assert content_key(collections.OrderedDict(message)) is not None
    assert content_key({"type": Kind.THINKING}) != content_key({"type": "other"})
