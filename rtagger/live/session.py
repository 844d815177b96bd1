"""One websocket stream's state, Sans-I/O: protocol bytes in, protocol messages out.

A :class:`StreamSession` is a :class:`~rtagger.pipeline.session.TrackSession` (resampler,
ring buffer, track context, segmenter, tag stabiliser) plus what protocol v1 adds: binary
frames decoded per the ``start`` message (PCM, or an encoded file through
:class:`~rtagger.audio.progressive.ProgressiveDecoder`), the server's limits, counters and
the ``update``/``segment``/``final`` messages. The server and the local ``listen``/``stream``
commands drive it through :class:`~rtagger.live.driver.SessionDriver`; tests drive it
directly::

    windows = session.feed(pcm_bytes)                  # decode, resample, window
    probs, emb = <tag the windows>                      # the inference worker
    events = session.add_window(window, probs, emb)     # maybe a `segment` event
    track = <aggregate session.context>                 # worker, or mean pooling
    update = session.update_msg(window, probs, track, latency_ms)

An encoded upload's decoding costs CPU, so the driver may run :meth:`StreamSession.decode`
(which touches the decoder and nothing else) in a thread and :meth:`StreamSession.push`
on its own task: ``session.push_blocks(session.decode(data))`` is :meth:`feed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.progressive import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DURATION_S,
    DecodedTooLong,
    NotAllowed,
    ProgressiveDecoder,
    UploadTooLarge,
)
from rtagger.audio.ringbuffer import Window
from rtagger.errors import AudioError
from rtagger.live.protocol import ProtocolError, Start, decode_pcm, error_msg, top_tags
from rtagger.model.aggregator import ContextAggregator
from rtagger.pipeline.session import SegmenterConfig, TrackSession


class StreamSession(TrackSession):
    """One stream's state. Not thread-safe: one task drives it."""

    def __init__(self, stream_id: str, start: Start, tags: list[str],
                 aggregator: ContextAggregator | None, *, max_duration_s: float = 6 * 3600.0,
                 segmenter: SegmenterConfig | None = None, segment_dims: int | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_BYTES,
                 max_upload_s: float = DEFAULT_MAX_DURATION_S) -> None:
        super().__init__(tags, aggregator, sample_rate=start.sample_rate,
                         channels=start.channels, hop=round(start.hop_s * SAMPLE_RATE),
                         source=stream_id, segment=start.segment, segmenter=segmenter,
                         segment_dims=segment_dims)
        self.stream_id = stream_id
        self.start = start
        self.max_duration_s = max_duration_s
        self.seq = 0
        self.dropped = 0  # windows skipped because the stream fell behind (live only)
        self.decoder = (ProgressiveDecoder(max_bytes=max_upload_bytes,
                                           max_duration_s=min(max_upload_s, max_duration_s),
                                           source=f"upload {stream_id}")
                        if start.encoded else None)
        self._told_not_streamable = False

    @property
    def received_bytes(self) -> int:
        """Encoded bytes taken so far (encoded uploads; 0 for PCM)."""
        return self.decoder.received if self.decoder is not None else 0

    def feed(self, data: bytes) -> list[Window]:
        """A binary frame -> the windows it completes. Raises :class:`ProtocolError`."""
        return self.push_blocks(self.decode(data))

    def decode(self, data: bytes) -> list[np.ndarray]:
        """A binary frame -> PCM blocks at the start's rate and channels (no windowing).

        Touches only the decoder, so it may run in another thread than the rest.
        """
        if self.decoder is None:
            return [decode_pcm(data, self.start)]
        with _protocol_errors():
            return self.decoder.feed(data)

    def decode_end(self) -> list[np.ndarray]:
        """End of an encoded file: the PCM still inside the decoder (PCM streams: none)."""
        if self.decoder is None:
            return []
        with _protocol_errors():
            return self.decoder.finish()

    def push_blocks(self, blocks: list[np.ndarray]) -> list[Window]:
        """Decoded blocks -> the windows they complete, within the duration limit."""
        n = sum(b.size for b in blocks) / self.start.channels
        if self.received_s + n / self.start.sample_rate > self.max_duration_s:
            raise ProtocolError("duration_limit", f"stream longer than the server's limit "
                                                  f"of {self.max_duration_s:.0f} s")
        return [w for b in blocks for w in self.push(b)]

    def notices(self) -> list[dict]:
        """Non-fatal ``error`` messages due now (once each): ``not_streamable``."""
        if (self.decoder is not None and self.decoder.streamable is False
                and not self._told_not_streamable):
            self._told_not_streamable = True
            return [error_msg("not_streamable", "this MP4/M4A keeps its index (moov) after "
                              "the audio, so it cannot be decoded before its last byte: "
                              "tags come at the end (remux with `-movflags +faststart` to "
                              "preview while uploading)", self.stream_id, fatal=False)]
        return []

    def add_window(self, window: Window, probs: np.ndarray, emb: np.ndarray) -> list[dict]:
        """Fold one tagged window into the track state; returns ``segment`` events."""
        seg = self.add(window, probs, emb)
        if seg is None:
            return []
        return [{"type": "segment", "stream_id": self.stream_id, "segment": seg.id,
                 "start_s": round(seg.start_s, 3)}]

    def update_msg(self, window: Window, probs: np.ndarray, track: np.ndarray,
                   latency_ms: float, final: bool = False) -> dict:
        committed = self.stabilizer.update(track)
        self.seq += 1
        k = self.start.top_k
        return {
            "type": "update",
            "stream_id": self.stream_id,
            "seq": self.seq,
            "window": {"index": window.index, "start_s": round(window.start_s, 3),
                       "end_s": round(window.end_s, 3), "partial": window.partial,
                       "top": top_tags(self.tags, probs, k)},
            "segment": self.segment_id,
            "track": top_tags(self.tags, track, k),
            "committed": [t for t, c in zip(self.tags, committed, strict=True) if c],
            "provisional": not final and self.context.windows < self.stabilizer.dwell,
            "latency_ms": round(latency_ms, 2),
            "dropped": self.dropped,
        }

    def final_msg(self, track: np.ndarray) -> dict:
        extra = {} if self.decoder is None else {"received_bytes": self.received_bytes}
        return extra | {
            "type": "final",
            "stream_id": self.stream_id,
            "duration_s": round(self.received_s, 3),
            "windows": self.windows_emitted,
            "segment": self.segment_id,
            "dropped": self.dropped,
            "track": {t: round(float(p), 5) for t, p in zip(self.tags, track, strict=True)},
        }



_AUDIO_ERROR_CODES = {NotAllowed: "unsupported_format", UploadTooLarge: "upload_too_large",
                      DecodedTooLong: "decoded_too_long"}


@contextmanager
def _protocol_errors() -> Iterator[None]:
    """Decoder errors -> :class:`ProtocolError` with their kind's code (else ``bad_audio``)."""
    try:
        yield
    except AudioError as e:
        raise ProtocolError(_AUDIO_ERROR_CODES.get(type(e), "bad_audio"), e.reason) from e
