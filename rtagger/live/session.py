"""One websocket stream's state, Sans-I/O: protocol bytes in, protocol messages out.

A :class:`StreamSession` is a :class:`~rtagger.pipeline.session.TrackSession` (resampler,
ring buffer, track context, segmenter, tag stabiliser) plus what protocol v1 adds: binary
frames decoded per the ``start`` message, the server's duration limit, counters and the
``update``/``segment``/``final`` messages. The server and the local ``listen``/``stream``
commands drive it through :class:`~rtagger.live.driver.SessionDriver`; tests drive it
directly::

    windows = session.feed(pcm_bytes)                  # decode, resample, window
    probs, emb = <tag the windows>                      # the inference worker
    events = session.add_window(window, probs, emb)     # maybe a `segment` event
    track = <aggregate session.context>                 # worker, or mean pooling
    update = session.update_msg(window, probs, track, latency_ms)
"""

from __future__ import annotations

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.ringbuffer import Window
from rtagger.live.protocol import ProtocolError, Start, decode_pcm, top_tags
from rtagger.model.network import ContextAggregator
from rtagger.pipeline.session import SegmenterConfig, TrackSession


class StreamSession(TrackSession):
    """One stream's state. Not thread-safe: one task drives it."""

    def __init__(self, stream_id: str, start: Start, tags: list[str],
                 aggregator: ContextAggregator | None, *, max_duration_s: float = 6 * 3600.0,
                 segmenter: SegmenterConfig | None = None) -> None:
        super().__init__(tags, aggregator, sample_rate=start.sample_rate,
                         channels=start.channels, hop=round(start.hop_s * SAMPLE_RATE),
                         source=stream_id, segment=start.segment, segmenter=segmenter)
        self.stream_id = stream_id
        self.start = start
        self.max_duration_s = max_duration_s
        self.seq = 0
        self.dropped = 0  # windows skipped because the stream fell behind (live only)

    def feed(self, data: bytes) -> list[Window]:
        """A binary frame -> the windows it completes. Raises :class:`ProtocolError`."""
        pcm = decode_pcm(data, self.start)
        if self.received_s + len(pcm) / self.start.channels / self.start.sample_rate \
                > self.max_duration_s:
            raise ProtocolError("duration_limit", f"stream longer than the server's limit "
                                                  f"of {self.max_duration_s:.0f} s")
        return self.push(pcm)

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
        return {
            "type": "final",
            "stream_id": self.stream_id,
            "duration_s": round(self.received_s, 3),
            "windows": self.windows_emitted,
            "segment": self.segment_id,
            "dropped": self.dropped,
            "track": {t: round(float(p), 5) for t, p in zip(self.tags, track, strict=True)},
        }
