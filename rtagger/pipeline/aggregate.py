"""Track-level tags from window outputs: the rolling, bounded track context.

:class:`TrackContext` is per-stream, Sans-I/O state: feed it each window's probabilities
and embedding in order, ask for the current track tags at any time, ``reset()`` at a
segment boundary (a new track in a DJ set).

Two aggregations:

- ``mean``: the paper's baseline, window probabilities averaged, each window weighted by
  its fraction of real (non-padding) audio. Exact, O(1) memory.
- ``aggregator``: the :class:`~rtagger.model.aggregator.ContextAggregator` transformer over the
  embeddings of the current segment. Its context is bounded (``max_windows``): when a
  segment outgrows it, every other stored embedding is dropped and only every
  ``stride``-th later window is kept, so the context always spans the whole segment evenly
  with bounded memory. The kept set depends only on window indices, so a stream and the
  offline run of the same audio see the same context.
"""

from __future__ import annotations

import numpy as np
import torch

from rtagger.model.aggregator import ContextAggregator


@torch.no_grad()
def run_aggregator(aggregator: ContextAggregator, contexts: list[np.ndarray]) -> np.ndarray:
    """Track probabilities for several contexts at once: ``(n, n_tags)`` float32.

    ``contexts`` are ``(windows_i, d)`` arrays of different lengths; they are padded to the
    longest and masked, so one call serves many streams (the inference worker batches them).
    """
    p = next(aggregator.parameters())
    emb, valid = pad_contexts(contexts)
    x = torch.from_numpy(emb).to(p.device, p.dtype)
    mask = torch.from_numpy(valid).to(p.device)
    return torch.sigmoid(aggregator(x, mask)).float().cpu().numpy()


def pad_contexts(contexts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(windows_i, d)`` arrays -> ``(n, longest, d)`` float32 and ``(n, longest)`` valid."""
    longest = max(len(c) for c in contexts)
    emb = np.zeros((len(contexts), longest, contexts[0].shape[1]), np.float32)
    valid = np.zeros((len(contexts), longest), bool)
    for i, c in enumerate(contexts):
        emb[i, : len(c)] = c
        valid[i, : len(c)] = True
    return emb, valid


def context_indices(n_windows: int, max_windows: int) -> list[int]:
    """Which of a segment's first ``n_windows`` windows a :class:`TrackContext` keeps.

    The same thinning as :meth:`TrackContext.add`, as a pure function: training builds
    aggregator inputs with it so they look like the contexts seen live.
    """
    kept: list[int] = []
    stride = 1
    for i in range(n_windows):
        if i % stride == 0:
            kept.append(i)
            if len(kept) > max_windows:
                kept = kept[::2]
                stride *= 2
    return kept


class TrackContext:
    def __init__(self, n_tags: int, aggregator: ContextAggregator | None = None) -> None:
        self.n_tags = n_tags
        self.aggregator = aggregator
        self.max_windows = aggregator.cfg.max_windows if aggregator is not None else 0
        self.reset()

    @property
    def method(self) -> str:
        return "aggregator" if self.aggregator is not None else "mean"

    def reset(self) -> None:
        self._prob_sum = np.zeros(self.n_tags, np.float64)
        self._weight = 0.0
        self._embs: list[np.ndarray] = []
        self._stride = 1
        self._seen = 0  # windows added since the last reset
        self._cached: np.ndarray | None = None

    @property
    def windows(self) -> int:
        return self._seen

    def add(self, probs: np.ndarray, embedding: np.ndarray, weight: float = 1.0) -> None:
        """Add one window: ``probs`` (n_tags,), ``embedding`` (d,), ``weight`` in (0, 1]."""
        self._prob_sum += weight * np.asarray(probs, np.float64)
        self._weight += weight
        if self.aggregator is not None and self._seen % self._stride == 0:
            self._embs.append(np.asarray(embedding, np.float32))
            if len(self._embs) > self.max_windows:
                self._embs = self._embs[::2]  # keeps windows 0, 2s, 4s, ... of the segment
                self._stride *= 2
        self._seen += 1
        self._cached = None

    def mean_probs(self) -> np.ndarray:
        if self._weight == 0:
            return np.zeros(self.n_tags, np.float32)
        return (self._prob_sum / self._weight).astype(np.float32)

    def context(self) -> np.ndarray | None:
        """The embeddings the aggregator attends over, ``(windows, d)``; None for ``mean``."""
        if self.aggregator is None or not self._embs:
            return None
        return np.stack(self._embs)

    def set_track_probs(self, probs: np.ndarray) -> None:
        """Accept aggregator output computed elsewhere (the batching inference worker)."""
        self._cached = np.asarray(probs, np.float32)

    def track_probs(self) -> np.ndarray:
        """Current track-level probabilities (n_tags,), float32."""
        ctx = self.context()
        if ctx is None:
            return self.mean_probs()
        if self._cached is None:
            self._cached = run_aggregator(self.aggregator, [ctx])[0]
        return self._cached
