"""Protocol v1 parsing without a network."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtagger.live.protocol import (
    ERROR_CODES,
    MAX_TEXT_BYTES,
    Audio,
    Connection,
    End,
    ProtocolError,
    Start,
    Subscribe,
    decode_pcm,
    error_msg,
    float32_frame,
    parse_text,
)


def _start(**kw) -> str:
    return json.dumps({"type": "start", **kw})


def test_start_defaults_and_fields():
    s = parse_text(_start())
    assert s == Start()
    s = parse_text(_start(format="float32", sample_rate=48000, channels=2, hop_s=0.5,
                          live=False, segment=False, stream_id="dj-set_1", name="Set", top_k=5))
    assert (s.sample_format, s.sample_rate, s.channels, s.hop_s, s.live, s.segment) == (
        "float32", 48000, 2, 0.5, False, False)
    assert s.bytes_per_frame == 8 and s.stream_id == "dj-set_1"


def test_end_and_subscribe():
    assert parse_text('{"type":"end"}') == End()
    assert parse_text('{"type":"subscribe","stream_id":"abc"}') == Subscribe("abc")


@pytest.mark.parametrize(("text", "code"), [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    ('{"type": "dance"}', "unknown_type"),
    ("{}", "unknown_type"),
    (_start(version=2), "unsupported_version"),
    (_start(format="int24"), "bad_message"),
    (_start(sample_rate=100), "bad_message"),
    (_start(sample_rate=44100.5), "bad_message"),
    (_start(channels=0), "bad_message"),
    (_start(channels=True), "bad_message"),
    (_start(hop_s=0), "bad_message"),
    (_start(hop_s=10), "bad_message"),
    (_start(hop_s="1"), "bad_message"),
    (_start(live="yes"), "bad_message"),
    (_start(stream_id="../../etc/passwd"), "bad_message"),
    (_start(path="/etc/passwd"), "bad_message"),  # nothing may name a server file
    ('{"type":"end","now":1}', "bad_message"),
    ('{"type":"subscribe"}', "bad_message"),
    ("x" * (MAX_TEXT_BYTES + 1), "too_large"),
    # found by hostile clients: each once escaped as an internal error, or was accepted
    ("[" * 973 + "]" * 973, "bad_json"),  # RecursionError in the parser
    ('{"type":"start","name":' + "[" * 10 + "]" * 10 + "}", "bad_json"),
    ('{"type":"start","top_k":' + "9" * 4301 + "}", "bad_message"),  # int() digit limit
    ('{"type":"start","sample_rate":' + "1" * 5000 + "}", "bad_message"),
    ('{"type":"start","version":' + "1" * 19 + "}", "bad_message"),
    ('{"type":"start","hop_s":' + "1" * 401 + "}", "bad_message"),  # OverflowError
    ('{"type":"start","hop_s":1e400}', "bad_message"),  # inf
    ('{"type":"start","hop_s":NaN}', "bad_json"),  # not JSON at all
    ('{"type":"start","hop_s":-Infinity}', "bad_json"),
    (_start(format=[]), "bad_message"),  # TypeError: unhashable
    (_start(format={}), "bad_message"),
    (_start(format=None), "bad_message"),
    (_start(version=True), "bad_message"),  # booleans are not integers in JSON Schema
    (_start(version="1"), "bad_message"),
    (_start(version=1.0), "bad_message"),
    (_start(stream_id=None), "bad_message"),  # the schema has no null stream_id
    (_start(stream_id=7), "bad_message"),
    (_start(top_k=False), "bad_message"),
    (_start(hop_s=True), "bad_message"),
    (_start(name=None), "bad_message"),
    (_start(segment=None), "bad_message"),
    ('{"type":["start"]}', "unknown_type"),
    ('{"type":{"a":1}}', "unknown_type"),
    ('{"type":"subscribe","stream_id":null}', "bad_message"),
    ('{"type":"subscribe","stream_id":["a"]}', "bad_message"),
])
def test_bad_messages_get_specific_codes(text, code):
    with pytest.raises(ProtocolError) as e:
        parse_text(text)
    assert e.value.code == code and e.value.code in ERROR_CODES


def test_pcm_decoding():
    s = Start(sample_format="int16", channels=2)
    pcm = decode_pcm(np.array([1, -2, 3, -4], "<i2").tobytes(), s)
    assert pcm.dtype == np.int16 and pcm.tolist() == [1, -2, 3, -4]
    with pytest.raises(ProtocolError, match="not a whole number") as e:
        decode_pcm(b"\x00\x01\x02", s)  # odd frame size
    assert e.value.code == "bad_audio"
    f = Start(sample_format="float32")
    with pytest.raises(ProtocolError, match="NaN/inf"):
        decode_pcm(np.array([0.0, np.nan], "<f4").tobytes(), f)
    stereo = np.array([[1, 2], [3, 4]], np.float32)  # (channels, n)
    assert decode_pcm(float32_frame(stereo), Start("float32", channels=2)).tolist() == [
        1, 3, 2, 4]


def test_error_messages_only_use_documented_codes():
    assert error_msg("bad_audio", "x")["code"] == "bad_audio"
    with pytest.raises(ValueError, match="undocumented"):
        error_msg("oops", "x")


def test_strings_do_not_count_as_nesting_and_big_values_stay_in_range():
    # brackets inside a string are text, not structure
    assert parse_text(_start(name="[[[[[[{{{{{{ \\\" ]]]]")).name == "[[[[[[{{{{{{ \\\" ]]]]"
    assert parse_text(_start(hop_s=3)).hop_s == 3.0  # an integer hop is a number
    with pytest.raises(ProtocolError, match="at most 18"):
        parse_text('{"type":"start","channels":-' + "1" * 40 + "}")


def test_validation_survives_python_optimisation(tmp_path):
    """``python -O`` strips asserts: validation must not rely on them."""
    import subprocess
    import sys

    code = ("from rtagger.live.protocol import parse_text, ProtocolError\n"
            "for t in ['{\"type\":\"start\",\"version\":true}', '{\"type\":\"start\",'"
            "'\"format\":[]}']:\n"
            "    try:\n        parse_text(t)\n    except ProtocolError as e:\n"
            "        print(e.code)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["bad_message", "bad_message"]


def _code(conn: Connection, message) -> str:
    with pytest.raises(ProtocolError) as e:
        conn.receive(message) if isinstance(message, str | bytes) else conn.event(message)
    return e.value.code


def test_connection_state_machine_start_audio_end():
    conn = Connection()
    assert isinstance(conn.receive(_start()), Start) and conn.state == "streaming"
    assert conn.receive(b"\x00\x00") == Audio(b"\x00\x00")
    assert _code(conn, _start()) == "already_started"
    assert _code(conn, json.dumps({"type": "subscribe", "stream_id": "a"})) == "bad_message"
    assert conn.state == "streaming"  # a refused message changes nothing
    assert isinstance(conn.receive('{"type": "end"}'), End) and conn.state == "ended"
    assert _code(conn, b"\x00\x00") == "bad_message"
    assert _code(conn, End()) == "bad_message"


def test_connection_refuses_what_cannot_open_a_connection():
    assert _code(Connection(), b"\x00\x00") == "not_started"
    assert _code(Connection(), '{"type": "end"}') == "not_started"
    assert _code(Connection(), "{not json") == "bad_json"
    viewer = Connection()
    assert isinstance(viewer.event(Subscribe("a")), Subscribe) and viewer.state == "watching"
    assert _code(viewer, b"\x00") == "bad_message"
    local = Connection()  # the local commands drive it with events, as the server does
    local.event(Start())
    assert local.event(Audio(b"")) == Audio(b"") and local.state == "streaming"


def test_the_published_schema_lists_exactly_the_error_codes():
    from importlib import resources

    schema = json.loads(resources.files("rtagger.data").joinpath("protocol_v1.schema.json")
                        .read_text())
    error = next(v for v in _walk(schema) if isinstance(v, dict)
                 and v.get("properties", {}).get("type") == {"const": "error"})
    assert error["properties"]["code"]["enum"] == list(ERROR_CODES)


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)
