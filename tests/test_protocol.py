"""Protocol v1 parsing without a network."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtagger.protocol import (
    ERROR_CODES,
    MAX_TEXT_BYTES,
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
    with pytest.raises(AssertionError):
        error_msg("oops", "x")
