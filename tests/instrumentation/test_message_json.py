"""Reading an outgoing JSON message text for its event keys: short texts parsed whole, long ones read
key by key up to the keys wanted (instrumentation/message_json.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instrumentation.message_json import WHOLE_PARSE_MAX_CHARS, read_json_object
from instrumentation.runtime import MessageKeys
from instrumentation.transport import describe_message

from tests.instrumentation.helpers import nested_too_deep_for_json

KEYS = frozenset({"type", "run_id"})
PAYLOAD = {"rows": [{"id": n, "text": "x" * 40, "nested": [1.5, None, True, "é"]} for n in range(2000)]}


def long_message(**fields) -> str:
    text = json.dumps(fields)
    assert len(text) > WHOLE_PARSE_MAX_CHARS
    return text


def test_a_long_message_is_read_up_to_its_last_wanted_key_and_no_further():
    text = long_message(type="tool_result", run_id="run-1", data=PAYLOAD)
    assert read_json_object(text, KEYS) == {"type": "tool_result", "run_id": "run-1"}
    # what follows the keys is not read: a payload json.loads refuses does not cost the link
    broken = text[:-2] + ",,}"
    with pytest.raises(ValueError):
        json.loads(broken)
    assert read_json_object(broken, KEYS) == {"type": "tool_result", "run_id": "run-1"}


def test_a_long_message_whose_keys_come_last_is_read_whole_as_before():
    text = long_message(data=PAYLOAD, meta={"a": [1, 2, {"b": "}"}]}, run_id="run-2", type="token")
    assert read_json_object(text, KEYS) == {"run_id": "run-2", "type": "token"}
    partial = long_message(data=PAYLOAD, type="token")  # no run id in it: read to the end
    assert read_json_object(partial, KEYS) == {"type": "token"}


@pytest.mark.parametrize("text", [
    '{"data": %s, "type": "x", "run_' % json.dumps(PAYLOAD),  # cut off before its last key
    '{"data": %s "type": "x"}' % json.dumps(PAYLOAD),  # no comma
    '{"data" %s}' % json.dumps(PAYLOAD),  # no colon
    "{data: %s}" % json.dumps(PAYLOAD),  # a key not quoted
    "[%s]" % json.dumps(PAYLOAD),  # not an object
    " \n" + json.dumps(PAYLOAD)[1:],  # not an object
])
def test_a_long_text_that_is_not_a_json_object_up_to_its_keys_is_no_message(text):
    assert len(text) > WHOLE_PARSE_MAX_CHARS
    assert read_json_object(text, KEYS) is None
    assert read_json_object(text.encode(), KEYS) is None


def test_long_bytes_are_read_as_utf_8():
    fields = {"type": "tool_result", "run_id": "rün-1", "data": PAYLOAD}
    raw = json.dumps(fields, ensure_ascii=False).encode()
    assert read_json_object(raw, KEYS) == {"type": "tool_result", "run_id": "rün-1"}
    assert read_json_object(bytearray(raw), KEYS) == {"type": "tool_result", "run_id": "rün-1"}
    assert read_json_object(memoryview(raw), KEYS) == {"type": "tool_result", "run_id": "rün-1"}
    assert read_json_object(b'{"type": "\xff\xfe", "data": %s}' % json.dumps(PAYLOAD).encode(),
                            KEYS) is None  # not UTF-8: no message, as json.loads says


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be",
                                      "utf-8-sig"])
@pytest.mark.parametrize("fields", [{"type": "x", "run_id": "r"},
                                    {"type": "x", "run_id": "r", "data": PAYLOAD}],
                         ids=["short", "long"])
def test_bytes_in_another_encoding_are_read_as_json_loads_reads_them(encoding, fields):
    # UTF-16 but little-endian without a byte order mark, and a BOM, were no message: the bytes did
    # not begin with "{" (only json.loads' own detection read the first, and only short)
    raw = json.dumps(fields).encode(encoding)
    assert json.loads(raw) == fields
    assert read_json_object(raw, KEYS) == {"type": "x", "run_id": "r"}
    assert read_json_object(memoryview(raw), KEYS) == {"type": "x", "run_id": "r"}


def test_a_memoryview_of_any_shape_is_read_as_its_bytes_and_a_released_one_is_no_message():
    raw = json.dumps({"type": "x", "run_id": "r"}).encode()
    padded = raw + b" " * (-len(raw) % 4)
    assert read_json_object(memoryview(padded).cast("I"), KEYS) == {"type": "x", "run_id": "r"}
    assert read_json_object(memoryview(raw)[::1], KEYS) == {"type": "x", "run_id": "r"}
    released = memoryview(raw)
    released.release()
    assert read_json_object(released, KEYS) is None
    assert describe_message(released) is None
    assert read_json_object("\ufeff" + raw.decode(), KEYS) is None  # text with a BOM: json.loads refuses


BINARY_FRAMES = {
    # a protobuf or msgpack frame, PCM16 audio: a zero among the first two bytes reads as UTF-16/32
    "zero_second_byte": b"\x08\x00" + bytes(range(256)) * 4096,
    "zero_first_byte": b"\x00\x01" + bytes(range(256)) * 4096,
    "no_zero": b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)) * 4096,
}


@pytest.mark.parametrize("form", ["bytes", "bytearray", "memoryview"])
@pytest.mark.parametrize("frame", list(BINARY_FRAMES), ids=list(BINARY_FRAMES))
def test_a_binary_frame_is_no_message_without_being_decoded_or_copied_whole(frame, form):
    # 7286600 read bytes as json.loads does: a 1 MB binary frame starting with a zero byte was
    # decoded whole as UTF-16 on every write (3.3 ms, 271 us for 64 KB; 0.2 us before) and a
    # memoryview copied whole, to find it starts with no "{" (/tmp/s27_rev2/measure_binary_frames.py)
    import tracemalloc

    data = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[form](
        BINARY_FRAMES[frame])
    tracemalloc.start()
    try:
        assert read_json_object(data, KEYS) is None
        assert describe_message(data) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-32", "utf-8"])
def test_bytes_of_a_json_object_after_a_long_run_of_whitespace_are_still_read(encoding):
    raw = (" \n" * 200 + json.dumps({"type": "x", "run_id": "r"})).encode(encoding)
    assert read_json_object(raw, KEYS) == {"type": "x", "run_id": "r"}
    assert read_json_object(memoryview(raw), KEYS) == {"type": "x", "run_id": "r"}


def test_short_texts_are_parsed_whole_and_an_empty_object_is_one():
    assert read_json_object('{"type": "x", "run_id": "r", "type": "y"}', KEYS) == {
        "type": "y", "run_id": "r"}  # json.loads: the last of a key sent twice
    assert read_json_object("{ }" + " " * WHOLE_PARSE_MAX_CHARS, KEYS) == {}
    assert read_json_object("not json", KEYS) is None


def test_a_long_message_is_described_by_the_path_maps_chains(monkeypatch):
    from instrumentation.runtime import state

    monkeypatch.setattr(state, "messages", MessageKeys())  # the defaults, whatever ran before
    text = long_message(type="tool_result", run_id="run-9", event_id="evt-9", data=PAYLOAD)
    info = describe_message(text)
    assert (info.event_type, info.run_id, info.event_id) == ("tool_result", "run-9", None)
    nested = MessageKeys(event_type="meta.kind", run_id="meta.run", event_id="event_id")
    assert nested.top_level == {"meta", "event_id"}
    text = long_message(event_id="evt-9", meta={"kind": "token", "run": "run-3"}, data=PAYLOAD)
    assert read_json_object(text, nested.top_level) == {
        "event_id": "evt-9", "meta": {"kind": "token", "run": "run-3"}}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "run_id", "data", "x", "é", "\"", ""]), json_values,
                       max_size=6),
       st.sampled_from([0, 1, 3]), st.booleans())
def test_a_long_message_reads_as_json_loads_reads_it(fields, indent, ascii_only):
    fields = {**fields, "pad": "p" * WHOLE_PARSE_MAX_CHARS}
    text = json.dumps(fields, indent=indent or None, ensure_ascii=ascii_only)
    whole = json.loads(text)
    expected = {key: whole[key] for key in KEYS if key in whole}
    assert read_json_object(text, KEYS) == expected
    assert read_json_object(text.encode(), KEYS) == expected


DEEP = nested_too_deep_for_json()  # deeper than the interpreter lets json parse


@pytest.mark.parametrize("pad", [0, WHOLE_PARSE_MAX_CHARS], ids=["short", "long"])
@pytest.mark.parametrize("form", [str, str.encode], ids=["str", "bytes"])
def test_a_message_nested_deeper_than_the_stack_is_read_up_to_its_keys_and_never_raises(pad, form):
    # json.loads (and the key-by-key scanner) raised RecursionError out of read_json_object: the
    # app's write then lost its deliver span (a false delivery finding for a written event)
    with pytest.raises(RecursionError):
        json.loads(DEEP)
    head, tail = '"type": "token", "run_id": "run-1"', f'"pad": "{"p" * pad}", "tree": {DEEP}'
    assert read_json_object(form("{" + head + ", " + tail + "}"), KEYS) == {
        "type": "token", "run_id": "run-1"}
    # a key wanted that the message lacks: the ones before the deep value
    assert read_json_object(form("{" + head + ", " + tail + "}"), KEYS | {"event_id"}) == {
        "type": "token", "run_id": "run-1"}
    assert read_json_object(form("{" + tail + ", " + head + "}"), KEYS) is None  # keys after it
    assert read_json_object(form('{"tree": ' + DEEP + "}"), frozenset()) is None  # no keys wanted
