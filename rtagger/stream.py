"""Per-stream state for live tagging, Sans-I/O: bytes in, windows and messages out.

A :class:`StreamSession` holds everything one stream needs and nothing shared: resampler,
ring buffer, track context, segmenter, tag stabiliser, counters. The websocket server and
the ``listen``/``stream`` commands drive it; tests drive it directly.

Per window, the driver does::

    windows = session.feed(pcm_bytes)                  # decode, resample, window
    probs, emb = <tag the windows>                      # the inference worker
    events = session.add_window(window, probs, emb)     # maybe a `segment` event
    track = <aggregate session.context()>               # worker, or mean pooling
    update = session.update_msg(window, probs, track, latency_ms)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from rtagger.aggregate import TrackContext
from rtagger.audio import SAMPLE_RATE, WINDOW_S, WINDOW_SAMPLES, Resampler
from rtagger.model import ContextAggregator
from rtagger.protocol import ProtocolError, Start, decode_pcm, top_tags
from rtagger.ringbuffer import Window, Windower
from rtagger.vocab import exclusive_indices


@dataclass(frozen=True)
class SegmenterConfig:
    threshold: float = 0.25  # cosine distance from the segment's mean embedding
    confirm: int = 5  # consecutive novel windows needed (rejects short breaks/fills)
    min_segment_s: float = 30.0  # no track is shorter than this in a DJ set


class Segmenter:
    """Track-change detection on window embeddings (novelty against the segment mean).

    A boundary is declared when ``confirm`` consecutive windows are all farther than
    ``threshold`` (cosine distance) from the mean embedding of the current segment, and the
    segment is at least ``min_segment_s`` long. The boundary belongs to the first of those
    windows, so a crossfade is attributed to the incoming track once it dominates; the
    session reports it at that window's centre.
    """

    def __init__(self, hop_s: float, cfg: SegmenterConfig | None = None) -> None:
        self.cfg = cfg or SegmenterConfig()
        self.hop_s = hop_s
        self.reset()

    def reset(self) -> None:
        self._sum: np.ndarray | None = None
        self._count = 0
        self._recent: deque[np.ndarray] = deque()

    def update(self, embedding: np.ndarray) -> int:
        """Add a window; returns how many recent windows start a new segment (0: none).

        Never more than ``confirm``: novel windows are held at most until there are
        ``confirm`` of them. Then either the segment is long enough and they start the next
        one, or it is too young to end (a track is never shorter than ``min_segment_s``),
        and they are folded into it. So a segment that began on an outlier (silence, the
        tail of a crossfade) is absorbed by the music that follows instead of keeping every
        later window novel forever.
        """
        e = np.asarray(embedding, np.float64)
        e = e / (np.linalg.norm(e) + 1e-9)
        if self._sum is None or self._count == 0:
            self._sum, self._count = e.copy(), 1
            return 0
        mean = self._sum / (np.linalg.norm(self._sum) + 1e-9)
        if 1.0 - float(mean @ e) <= self.cfg.threshold:
            # not novel: earlier novel windows were a blip; fold them into the segment
            self._fold()
            self._sum += e
            self._count += 1
            return 0
        self._recent.append(e)
        if len(self._recent) < self.cfg.confirm:
            return 0
        if self._count * self.hop_s < self.cfg.min_segment_s:
            self._fold()  # too young to end: the novel windows are this segment's own
            return 0
        n = len(self._recent)
        self._sum = np.sum(self._recent, axis=0)
        self._count = n
        self._recent.clear()
        return n

    def _fold(self) -> None:
        for r in self._recent:
            self._sum += r
            self._count += 1
        self._recent.clear()


class TagStabilizer:
    """Committed track tags with hysteresis, so dashboards don't flicker.

    A tag is committed after its track probability stays >= ``on`` for ``dwell`` updates and
    released after it stays < ``off`` for ``dwell`` updates. Within each ``exclusive`` group
    of tag indices (``slow``/``fast``, ``major``/``minor``) at most one tag is committed: the
    most probable one; the others are released.
    """

    def __init__(self, n_tags: int, on: float = 0.5, off: float = 0.35, dwell: int = 3,
                 exclusive: list[list[int]] | None = None) -> None:
        if not 0 <= off <= on <= 1:
            raise ValueError(f"need 0 <= off <= on <= 1, got on={on} off={off}")
        self.on, self.off, self.dwell = on, off, dwell
        self.n_tags = n_tags
        self.exclusive = [np.asarray(g, np.int64) for g in exclusive or []]
        self.reset()

    def reset(self) -> None:
        self.committed = np.zeros(self.n_tags, bool)
        self._streak = np.zeros(self.n_tags, np.int64)

    def update(self, probs: np.ndarray) -> np.ndarray:
        want = np.where(self.committed, probs >= self.off, probs >= self.on)
        for g in self.exclusive:
            # Only the group's most probable tag may be wanted (ties: the first listed).
            keep = g[int(np.argmax(probs[g]))]
            want[g[g != keep]] = False
        changing = want != self.committed
        self._streak = np.where(changing, self._streak + 1, 0)
        flip = self._streak >= self.dwell
        self.committed = np.where(flip, want, self.committed)
        self._streak[flip] = 0
        for g in self.exclusive:
            # A newly committed tag replaces its rival at once, never beside it.
            on = g[self.committed[g]]
            if len(on) > 1:
                self.committed[on[~want[on]]] = False
        return self.committed


class StreamSession:
    """One stream's state. Not thread-safe: one task drives it."""

    def __init__(self, stream_id: str, start: Start, tags: list[str],
                 aggregator: ContextAggregator | None, *, max_duration_s: float = 6 * 3600.0,
                 segmenter: SegmenterConfig | None = None) -> None:
        self.stream_id = stream_id
        self.start = start
        self.tags = tags
        self.hop = round(start.hop_s * SAMPLE_RATE)
        self.max_duration_s = max_duration_s
        self._resampler = Resampler(start.sample_rate, start.channels, stream_id)
        self._windower = Windower(self.hop)
        self.context = TrackContext(len(tags), aggregator)
        self.segmenter = Segmenter(start.hop_s, segmenter) if start.segment else None
        self.stabilizer = TagStabilizer(len(tags), exclusive=exclusive_indices(tags))
        self.segment_id = 0
        self.segment_start_s = 0.0
        self.seq = 0
        self.dropped = 0  # windows skipped because the stream fell behind (live only)
        # The windows a boundary may hand to the new segment: the Segmenter never declares
        # more than `confirm`, and this keeps exactly that many.
        self._recent: deque[tuple[Window, np.ndarray, np.ndarray]] = deque()

    @property
    def received_s(self) -> float:
        return self._windower.received / SAMPLE_RATE

    def feed(self, data: bytes) -> list[Window]:
        """A binary frame -> the windows it completes. Raises :class:`ProtocolError`."""
        pcm = decode_pcm(data, self.start)
        if self.received_s + len(pcm) / self.start.channels / self.start.sample_rate \
                > self.max_duration_s:
            raise ProtocolError("duration_limit", f"stream longer than the server's limit "
                                                  f"of {self.max_duration_s:.0f} s")
        return self._windower.push(self._resampler(pcm))

    def finish(self) -> list[Window]:
        """End of stream: the windows still inside the resampler and ring buffer."""
        return self._windower.push(self._resampler.flush()) + self._windower.flush()

    def add_window(self, window: Window, probs: np.ndarray, emb: np.ndarray) -> list[dict]:
        """Fold one tagged window into the track state; returns ``segment`` events."""
        events = []
        weight = window.valid / WINDOW_SAMPLES
        n_new = 0
        if self.segmenter is not None:
            self._recent.append((window, probs, emb))
            while len(self._recent) > self.segmenter.cfg.confirm:
                self._recent.popleft()
            n_new = self.segmenter.update(emb)
        if n_new:
            # The last n_new windows belong to the new track: restart the context with them.
            replay = list(self._recent)[-n_new:]
            self.context.reset()
            self.stabilizer.reset()
            for w, p, e in replay:
                self.context.add(p, e, w.valid / WINDOW_SAMPLES)
            self.segment_id += 1
            # The change is placed mid-window: a window reads as the new track once about
            # half of it is (on simulated mixes, window starts came ~1.8 s early).
            self.segment_start_s = replay[0][0].start_s + WINDOW_S / 2
            events.append({"type": "segment", "stream_id": self.stream_id,
                           "segment": self.segment_id, "start_s": round(self.segment_start_s, 3)})
        else:
            self.context.add(probs, emb, weight)
        return events

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
            "windows": self._windower.emitted,
            "segment": self.segment_id,
            "dropped": self.dropped,
            "track": {t: round(float(p), 5) for t, p in zip(self.tags, track, strict=True)},
        }
