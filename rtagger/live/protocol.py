"""Websocket protocol v1, Sans-I/O: parse client messages, build server messages.

No sockets here: functions take ``str``/``bytes`` and return dataclasses, numpy arrays or
JSON-ready dicts, so every rule is tested without a network. ``docs/protocol.md`` describes
the protocol; ``rtagger/data/protocol_v1.schema.json`` holds a JSON Schema for every message.

Client -> server
    text ``start``      opens a stream: sample format, rate, channels, hop, options
    binary frames       interleaved little-endian PCM in the announced format, or (format
                        ``encoded``, revision 2) the bytes of an audio file, in order
    text ``end``        no more audio: the server flushes and answers ``final``
    text ``subscribe``  watch an existing stream (dashboards, several viewers)

Server -> client
    ``started``, ``update`` (one per window), ``segment``, ``error``, ``final``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import RtaggerError

PROTOCOL_VERSION = 1
# Additions that keep v1 compatible: revision 2 adds format "encoded" (a file's bytes), the
# notice and error codes of encoded uploads, and `formats` in `started`.
PROTOCOL_REVISION = 2
MAX_TEXT_BYTES = 16 * 1024
# Client messages are flat objects: two levels of nesting is already more than v1 uses, and
# bounding it before parsing keeps a deeply nested frame from reaching the JSON parser.
MAX_JSON_DEPTH = 4
MAX_INT_DIGITS = 18  # every integer field of v1 fits; Python's own limit is 4,300 digits
SAMPLE_FORMATS = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}
ENCODED = "encoded"  # binary frames are the bytes of an audio file (MP3, FLAC, Ogg, M4A, WAV)
FORMATS = (*SAMPLE_FORMATS, ENCODED)
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MAX_CHANNELS = 8
_STREAM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ProtocolError(RtaggerError):
    """A client broke the protocol. ``code`` is the machine-readable error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


# Error codes sent in ``error`` messages. A fatal error closes the stream.
ERROR_CODES = {
    "bad_json": "a text frame is not a JSON object",
    "too_large": "a frame exceeds the size limit",
    "unknown_type": "the message type is not part of protocol v1",
    "bad_message": "a field is missing, of the wrong type or out of range",
    "unsupported_version": "the client speaks another protocol version",
    "not_started": "audio or end arrived before start",
    "already_started": "a second start on the same connection",
    "bad_audio": "a binary frame is not whole samples, or holds NaN/inf; an encoded file is "
                 "truncated or corrupt (the message says why)",
    "duration_limit": "the stream exceeded the server's maximum duration",
    "stream_limit": "the server is at its stream limit (admission control)",
    "unknown_stream": "subscribe named a stream that does not exist",
    "timeout": "no first message within the server's first-message timeout",
    "connection_limit": "the server is at its connection limit",
    "unavailable": "the server cannot tag (its inference worker stopped): try another",
    "internal": "the server failed on this stream (others are unaffected)",
    # revision 2: encoded uploads
    "not_streamable": "notice, not fatal: the file's index is at its end (MP4/M4A with moov "
                      "last), so tags come after its last byte",
    "unsupported_format": "an encoded upload is not an allowed container or audio codec",
    "upload_too_large": "an encoded upload passed the server's limit on encoded bytes",
    "decoded_too_long": "an encoded upload decodes to more audio than the server's limit",
}


@dataclass(frozen=True)
class Start:
    sample_format: str = "int16"
    sample_rate: int = SAMPLE_RATE
    channels: int = 1
    hop_s: float = 1.0
    live: bool = True  # live: drop to the newest window when behind; upload: backpressure
    segment: bool = True  # detect track changes (DJ sets); off for single-track uploads
    stream_id: str | None = None
    name: str = ""  # free text shown on dashboards
    top_k: int = 10

    @property
    def encoded(self) -> bool:
        """Binary frames carry a file's bytes; the server decodes them (to 16 kHz mono)."""
        return self.sample_format == ENCODED

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample for every channel (1 for an encoded file: any split)."""
        if self.encoded:
            return 1
        return SAMPLE_FORMATS[self.sample_format].itemsize * self.channels


@dataclass(frozen=True)
class End:
    pass


@dataclass(frozen=True)
class Subscribe:
    stream_id: str


@dataclass(frozen=True)
class Audio:
    """One binary frame: PCM as the ``start`` message announced it, or a file's next bytes."""

    data: bytes


class Connection:
    """One connection's protocol state, Sans-I/O: ``start -> audio* -> end``, or an error.

    A viewer's connection is ``subscribe`` and nothing after it. The websocket server feeds
    every message it receives to :meth:`receive`; the local ``stream``/``listen`` commands
    feed their own source's events to :meth:`event`; both get the same typed event back,
    or the same :class:`ProtocolError` for a message out of order.
    """

    def __init__(self) -> None:
        self.state = "idle"  # -> streaming -> ended | watching

    def receive(self, message: str | bytes) -> Start | Subscribe | Audio | End:
        """A websocket message (text or binary) -> its event, checked against the state."""
        if isinstance(message, bytes):
            return self.event(Audio(message))
        return self.event(parse_text(message))

    def event(self, ev: Start | Subscribe | Audio | End) -> Start | Subscribe | Audio | End:
        """Advance the state with an already parsed event; raises :class:`ProtocolError`."""
        if self.state == "idle":
            if isinstance(ev, Audio):
                raise ProtocolError("not_started", "binary audio before the start message")
            if isinstance(ev, End):
                raise ProtocolError("not_started", "end before start")
            self.state = "streaming" if isinstance(ev, Start) else "watching"
        elif self.state == "streaming":
            if isinstance(ev, Start):
                raise ProtocolError("already_started", "this connection already streams")
            if isinstance(ev, Subscribe):
                raise ProtocolError("bad_message", "subscribe on a streaming connection")
            if isinstance(ev, End):
                self.state = "ended"
        elif self.state == "watching":
            raise ProtocolError("bad_message", "a viewer's connection sends nothing after "
                                               "subscribe")
        else:
            raise ProtocolError("bad_message", "message after end")
        return ev


def parse_text(text: str | bytes) -> Start | End | Subscribe:
    """Parse one client text frame; raises :class:`ProtocolError`.

    The frame's size and nesting depth are bounded before it is parsed, integers longer
    than ``MAX_INT_DIGITS`` and the non-JSON constants ``NaN``/``Infinity`` are refused while
    parsing, and every field is checked by its schema type and range before use.
    """
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError("too_large", f"text frame of {len(text)} bytes exceeds "
                                         f"{MAX_TEXT_BYTES}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("bad_json", f"text frame is not UTF-8 ({e})") from e
    depth = _nesting_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError("bad_json", f"JSON nested {depth} deep; at most {MAX_JSON_DEPTH}")
    try:
        msg = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"invalid JSON ({e})") from e
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", "a message must be a JSON object")
    kind = msg.get("type")
    if kind == "start":
        return _parse_start(msg)
    if kind == "end":
        _only(msg, {"type"})
        return End()
    if kind == "subscribe":
        _only(msg, {"type", "stream_id"})
        if "stream_id" not in msg:
            raise ProtocolError("bad_message", "subscribe needs a stream_id")
        return Subscribe(_stream_id(msg["stream_id"]))
    raise ProtocolError("unknown_type", f"unknown message type {_short(kind)}")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _nesting_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside string literals (malformed JSON: an estimate)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError("bad_message", f"an integer of {len(digits.lstrip('-'))} digits; "
                                           f"at most {MAX_INT_DIGITS}")
    return int(digits)


def _refuse_constant(name: str) -> None:
    raise ProtocolError("bad_json", f"{name} is not valid JSON")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _only(msg: dict, allowed: set[str]) -> None:
    extra = set(msg) - allowed
    if extra:
        raise ProtocolError("bad_message", f"unknown fields {_short(sorted(extra))} in "
                                           f"{_short(msg.get('type'))}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON Schema: true is no integer


def _stream_id(sid: object) -> str:
    if not isinstance(sid, str) or not _STREAM_ID.match(sid):
        raise ProtocolError("bad_message", "stream_id must be 1-64 characters of "
                                           "[A-Za-z0-9_.-]")
    return sid


def _parse_start(msg: dict) -> Start:
    _only(msg, {"type", "version", "format", "sample_rate", "channels", "hop_s", "live",
                "segment", "stream_id", "name", "top_k"})
    version = msg.get("version", PROTOCOL_VERSION)
    if not _is_int(version):
        raise ProtocolError("bad_message", f"version must be an integer, got {_short(version)}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"server speaks protocol "
                                                   f"{PROTOCOL_VERSION}, client {version}")
    fmt = msg.get("format", "int16")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ProtocolError("bad_message", f"format must be one of {list(FORMATS)}, "
                                           f"got {_short(fmt)}")
    if fmt == ENCODED:
        given = sorted({"sample_rate", "channels"} & set(msg))
        if given:
            raise ProtocolError("bad_message", f"an encoded file states its own "
                                               f"{' and '.join(given)}; leave them out")
        # The server decodes the file to the model's rate, mono, before windowing.
        rate, channels = SAMPLE_RATE, 1
    else:
        rate = _int(msg, "sample_rate", SAMPLE_RATE, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
        channels = _int(msg, "channels", 1, 1, MAX_CHANNELS)
    top_k = _int(msg, "top_k", 10, 1, 1000)
    hop_s = msg.get("hop_s", 1.0)
    window_s = WINDOW_SAMPLES / SAMPLE_RATE
    # The range test comes first and is exact for ints of any size; NaN fails it too.
    if (not isinstance(hop_s, int | float) or isinstance(hop_s, bool)
            or not 0.1 <= hop_s <= window_s):
        raise ProtocolError("bad_message", f"hop_s must be a number in [0.1, {window_s:.4f}], "
                                           f"got {_short(hop_s)}")
    # A file is an upload of one track: backpressure, no track changes, unless asked.
    upload = fmt == ENCODED
    live, segment = msg.get("live", not upload), msg.get("segment", not upload)
    if not isinstance(live, bool) or not isinstance(segment, bool):
        raise ProtocolError("bad_message", "live and segment must be booleans")
    sid = _stream_id(msg["stream_id"]) if "stream_id" in msg else None
    name = msg.get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise ProtocolError("bad_message", "name must be a string of at most 200 characters")
    return Start(fmt, rate, channels, float(hop_s), live, segment, sid, name, top_k)


# Query parameters of ``POST /api/tag`` -> their start fields (the body is the file).
_QUERY_FIELDS = {"hop_s": "number", "live": "bool", "segment": "bool", "stream_id": "str",
                 "name": "str", "top_k": "int", "version": "int"}


def start_from_query(params: dict[str, list[str]]) -> Start:
    """An HTTP upload's query (``parse_qs`` output, ``token`` removed) -> its :class:`Start`.

    The same fields and checks as a websocket ``start`` with ``"format": "encoded"``;
    raises :class:`ProtocolError` (``bad_message``) for unknown or repeated parameters.
    """
    msg: dict = {"type": "start", "format": ENCODED}
    for key, values in params.items():
        kind = _QUERY_FIELDS.get(key)
        if kind is None:
            raise ProtocolError("bad_message", f"unknown parameter {_short(key)}; known: "
                                               f"{', '.join(sorted(_QUERY_FIELDS))}")
        if len(values) != 1:
            raise ProtocolError("bad_message", f"parameter {key} given {len(values)} times")
        msg[key] = _query_value(key, values[0], kind)
    return _parse_start(msg)


def _query_value(key: str, text: str, kind: str) -> object:
    if len(text) > 200:
        raise ProtocolError("bad_message", f"parameter {key} is longer than 200 characters")
    if kind == "str":
        return text
    if kind == "bool":
        if text not in ("true", "false", "1", "0"):
            raise ProtocolError("bad_message", f"{key} must be true or false, got "
                                               f"{_short(text)}")
        return text in ("true", "1")
    try:
        return json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant) \
            if kind == "number" else _parse_int(text)
    except (json.JSONDecodeError, ValueError):
        raise ProtocolError("bad_message", f"{key} must be a number, got "
                                           f"{_short(text)}") from None


def _int(msg: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = msg.get(key, default)
    if not _is_int(v) or not lo <= v <= hi:
        raise ProtocolError("bad_message", f"{key} must be an integer in [{lo}, {hi}], "
                                           f"got {_short(v)}")
    return v


def decode_pcm(data: bytes, start: Start) -> np.ndarray:
    """A binary frame -> ``(samples * channels,)`` interleaved samples (int16 or float32).

    Raises ``bad_audio`` for partial samples/frames and non-finite floats.
    """
    bpf = start.bytes_per_frame
    if len(data) % bpf:
        raise ProtocolError("bad_audio", f"binary frame of {len(data)} bytes is not a whole "
                                         f"number of {bpf}-byte sample frames "
                                         f"({start.sample_format} x {start.channels} channels)")
    pcm = np.frombuffer(data, dtype=SAMPLE_FORMATS[start.sample_format])
    if start.sample_format == "float32" and not np.isfinite(pcm).all():
        raise ProtocolError("bad_audio", f"{int((~np.isfinite(pcm)).sum())} NaN/inf samples")
    return pcm.astype(pcm.dtype.newbyteorder("="), copy=False)


# --- server messages ------------------------------------------------------------------------


def encode(msg: dict) -> str:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False)


def error_msg(code: str, message: str, stream_id: str | None = None, fatal: bool = True) -> dict:
    if code not in ERROR_CODES:
        raise ValueError(f"undocumented error code {code!r}")
    return {"type": "error", "code": code, "message": message, "stream_id": stream_id,
            "fatal": fatal}


def started_msg(stream_id: str, start: Start, tags: list[str], model: dict) -> dict:
    return {"type": "started", "version": PROTOCOL_VERSION, "revision": PROTOCOL_REVISION,
            "formats": list(FORMATS), "stream_id": stream_id,
            "window_s": WINDOW_SAMPLES / SAMPLE_RATE, "hop_s": start.hop_s, "live": start.live,
            "segment": start.segment, "format": start.sample_format, "tags": tags,
            "model": model}


def top_tags(tags: list[str], probs: np.ndarray, k: int) -> list[list]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [[tags[i], round(float(probs[i]), 4)] for i in order]


def float32_frame(block: np.ndarray) -> bytes:
    """A ``(n,)`` or ``(channels, n)`` float block -> one interleaved float32 binary frame."""
    pcm = np.asarray(block, np.float32)
    if pcm.ndim == 2:
        pcm = pcm.T  # (channels, n) -> (n, channels): interleaved
    return np.ascontiguousarray(pcm, dtype="<f4").tobytes()
