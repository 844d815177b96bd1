"""One track's or stream's state, Sans-I/O: PCM in, windows out; tagged windows in, track tags out.

:class:`TrackSession` is the one place that assembles the parts a track needs: resampler,
ring buffer (windower), track context, optional segmenter and tag stabiliser, and the rule
that weighs each window by its share of real audio. Offline tagging
(:meth:`rtagger.pipeline.tagger.Tagger.stream`), local streaming and the websocket server
all drive it; :class:`rtagger.live.session.StreamSession` adds the protocol's bytes and
messages on top. No I/O and no model here: the caller tags the windows it gets back.

Per window, the driver does::

    windows = session.push(pcm)                        # resample, window
    probs, emb = <tag the windows>                      # an engine or the inference worker
    segment = session.add(window, probs, emb)           # maybe a new segment (track change)
    track = session.context.track_probs()               # or the worker's aggregator
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_S, WINDOW_SAMPLES, Resampler
from rtagger.audio.ringbuffer import Window, Windower
from rtagger.model.aggregator import ContextAggregator
from rtagger.model.vocab import exclusive_indices
from rtagger.pipeline.aggregate import TrackContext


@dataclass(frozen=True)
class SegmenterConfig:
    # Tuned at hop 1 s on mixes of real recordings and of the synthetic benchmark
    # (docs/segmentation.md): the best real-mix F within 0.01 of the best synthetic one.
    threshold: float = 0.15  # cosine distance from the segment's mean embedding
    confirm: int = 8  # consecutive novel windows needed (rejects short breaks/fills)
    min_segment_s: float = 30.0  # no track is shorter than this in a DJ set


class Segmenter:
    """Track-change detection on window embeddings (novelty against the segment mean).

    A boundary is declared when ``confirm`` consecutive windows are all farther than
    ``threshold`` (cosine distance) from the mean embedding of the current segment, and the
    segment is at least ``min_segment_s`` long. The boundary belongs to the first of those
    windows, so a crossfade is attributed to the incoming track once it dominates; the
    session reports it at that window's centre.

    ``dims``: compare the first ``dims`` values of each embedding only, the tagger's CLS
    embedding (its ``d_model``) without the chroma and tempo profiles after it, which change
    inside a track with its key and tempo; None compares all of it.
    """

    def __init__(self, hop_s: float, cfg: SegmenterConfig | None = None,
                 dims: int | None = None) -> None:
        self.cfg = cfg or SegmenterConfig()
        self.hop_s = hop_s
        self.dims = dims
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
        e = np.asarray(embedding[: self.dims], np.float64)
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


@dataclass(frozen=True)
class Segment:
    """A track change: the new segment's number and where it starts in the stream."""

    id: int
    start_s: float


class TrackSession:
    """One track's (or one stream's) state. Not thread-safe: one task drives it.

    ``hop`` is in samples at :data:`SAMPLE_RATE`; ``segment`` turns on track-change
    detection (a DJ set), on the first ``segment_dims`` values of each embedding (see
    :class:`Segmenter`); ``aggregator`` None means mean pooling of window probabilities.
    """

    def __init__(self, tags: list[str], aggregator: ContextAggregator | None, *,
                 sample_rate: int = SAMPLE_RATE, channels: int = 1,
                 hop: int = WINDOW_SAMPLES, source: str = "<stream>", segment: bool = False,
                 segmenter: SegmenterConfig | None = None,
                 segment_dims: int | None = None) -> None:
        self.tags = tags
        self.hop = hop
        self._resampler = Resampler(sample_rate, channels, source)
        self._windower = Windower(hop)
        self.context = TrackContext(len(tags), aggregator)
        self.segmenter = (Segmenter(hop / SAMPLE_RATE, segmenter, segment_dims) if segment
                          else None)
        self.stabilizer = TagStabilizer(len(tags), exclusive=exclusive_indices(tags))
        self.segment_id = 0
        self.segment_start_s = 0.0
        # The windows a boundary may hand to the new segment: the Segmenter never declares
        # more than `confirm`, and this keeps exactly that many.
        self._recent: deque[tuple[Window, np.ndarray, np.ndarray]] = deque()

    @property
    def received_s(self) -> float:
        """Seconds of audio pushed so far (at 16 kHz, after resampling)."""
        return self._windower.received / SAMPLE_RATE

    @property
    def windows_emitted(self) -> int:
        return self._windower.emitted

    def push(self, pcm: np.ndarray) -> list[Window]:
        """A block of PCM at the session's rate and channels -> the windows it completes."""
        return self._windower.push(self._resampler(pcm))

    def finish(self) -> list[Window]:
        """End of the track: the windows still inside the resampler and ring buffer."""
        return self._windower.push(self._resampler.flush()) + self._windower.flush()

    def add(self, window: Window, probs: np.ndarray, emb: np.ndarray) -> Segment | None:
        """Fold one tagged window into the track; returns the new segment if one began.

        A window weighs by its share of real audio (a partial last window counts less).
        On a track change the context restarts with the windows that belong to the new
        track, so its tags never mix with the previous track's.
        """
        n_new = 0
        if self.segmenter is not None:
            self._recent.append((window, probs, emb))
            while len(self._recent) > self.segmenter.cfg.confirm:
                self._recent.popleft()
            n_new = self.segmenter.update(emb)
        if not n_new:
            self.context.add(probs, emb, _weight(window))
            return None
        replay = list(self._recent)[-n_new:]
        self.context.reset()
        self.stabilizer.reset()
        for w, p, e in replay:
            self.context.add(p, e, _weight(w))
        self.segment_id += 1
        # The change is placed mid-window: a window reads as the new track once about half
        # of it is (on simulated mixes, window starts came ~1.8 s early).
        self.segment_start_s = replay[0][0].start_s + WINDOW_S / 2
        return Segment(self.segment_id, self.segment_start_s)


def _weight(window: Window) -> float:
    return window.valid / WINDOW_SAMPLES
