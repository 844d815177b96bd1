"""Nearest tracks by embedding: exact search below a size threshold, FAISS HNSW above it.

Track embeddings are L2-normalised (:func:`rtagger.catalog.add.track_embedding`), so the
inner product is the cosine similarity and "nearest" means "most similar".

- ``exact``: one matrix product per query batch in numpy (float32). Needs nothing
  optional and is right for small catalogs; docs/catalog.md measures where it stops being
  fast enough (:data:`EXACT_BELOW`).
- ``hnsw``: FAISS's ``IndexHNSWFlat`` (inner product; ``M`` = 32, efConstruction 80,
  efSearch 96). FAISS because it is maintained by Meta's research team with regular
  releases and CPU wheels on PyPI (``faiss-cpu``), holds exact and approximate indexes
  behind one API, and writes indexes to disk; hnswlib, the other candidate, has had no
  release since 2023. HNSW because it needs no training pass (IVF trains k-means on the
  data first) and answers one query at a time in well under a millisecond at 10^6 tracks.

``kind="auto"`` takes ``exact`` below :data:`EXACT_BELOW` tracks, or when FAISS is not
installed (with a logged warning above the threshold: slower, never wrong).

A built HNSW index can be saved beside the catalog (:func:`cached_index`) and reloaded
while the catalog's tracks are unchanged, so ``catalog similar`` does not rebuild it per
call.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_path, atomic_write
from rtagger.errors import ConfigError, EngineUnavailable

log = logging.getLogger(__name__)

EXACT_BELOW = 100_000  # tracks; docs/catalog.md: exact p99 vs HNSW at 10^5 and 10^6
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96
KINDS = ("auto", "exact", "hnsw")


def faiss_unavailable_reason() -> str | None:
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        return f"faiss is not installed ({e}); pip install 'rtagger[catalog]'"
    return None


class EmbeddingIndex:
    """``ids`` ``(n,)`` int64 and L2-normalised ``embeddings`` ``(n, d)`` float32."""

    def __init__(self, ids: np.ndarray, embeddings: np.ndarray, kind: str = "auto",
                 faiss_index=None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.ids = np.asarray(ids, np.int64)
        emb = np.ascontiguousarray(embeddings, np.float32)
        if emb.ndim != 2 or len(emb) != len(self.ids):
            raise ConfigError(f"{len(self.ids)} ids for embeddings of shape {emb.shape}")
        self.dim = emb.shape[1]
        self.kind = _choose(kind, len(self.ids))
        self._emb = emb
        self._faiss = faiss_index
        if self.kind == "hnsw" and self._faiss is None:
            self._faiss = _build_hnsw(emb)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest tracks of each query: ids ``(q, k)`` and cosine ``(q, k)``.

        ``exclude`` ``(q,)``: one track id per query left out of its results (the query
        track itself). Rows have fewer than ``k`` real hits when the index is small; the
        rest are id -1, score -inf.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        if q.shape[1] != self.dim:
            raise ConfigError(f"query embeddings have {q.shape[1]} dimensions, the index "
                              f"{self.dim}")
        want = min(k + (1 if exclude is not None else 0), len(self.ids))
        if want == 0:
            return np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf, np.float32)
        if self.kind == "exact":
            pos, score = _exact(self._emb, q, want)
        else:
            self._faiss.hnsw.efSearch = max(HNSW_EF_SEARCH, want)
            score, pos = self._faiss.search(q, want)
        ids = np.where(pos >= 0, self.ids[np.clip(pos, 0, None)], -1)
        score = np.where(pos >= 0, score, -np.inf).astype(np.float32)
        out_ids = np.full((len(q), k), -1, np.int64)
        out_score = np.full((len(q), k), -np.inf, np.float32)
        for i in range(len(q)):
            keep = ids[i] >= 0
            if exclude is not None:
                keep &= ids[i] != exclude[i]
            row_ids, row_score = ids[i][keep][:k], score[i][keep][:k]
            out_ids[i, : len(row_ids)] = row_ids
            out_score[i, : len(row_score)] = row_score
        return out_ids, out_score


def _choose(kind: str, n: int) -> str:
    if kind == "exact":
        return kind
    reason = faiss_unavailable_reason()
    if kind == "hnsw":
        if reason:
            raise EngineUnavailable(f"index hnsw: {reason}")
        return kind
    if n < EXACT_BELOW:
        return "exact"
    if reason:
        log.warning("%d tracks: exact search (slower than an HNSW index, same results) "
                    "because %s", n, reason)
        return "exact"
    return "hnsw"


def _exact(emb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ emb.T  # (q, n) cosine
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(top, order, axis=1)


def _build_hnsw(emb: np.ndarray):
    import faiss

    index = faiss.IndexHNSWFlat(emb.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(emb)
    return index


def cached_index(ids: np.ndarray, embeddings: np.ndarray, stamp: dict, cache: Path,
                 kind: str = "auto") -> EmbeddingIndex:
    """An index over ``ids``/``embeddings``, reusing ``cache`` (a FAISS file) when its
    recorded ``stamp`` (what identifies the catalog's current tracks) is the same."""
    chosen = _choose(kind, len(ids))
    if chosen == "exact":
        return EmbeddingIndex(ids, embeddings, "exact")
    import faiss

    stamp_file = cache.with_name(cache.name + ".json")
    if cache.is_file() and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return EmbeddingIndex(ids, embeddings, "hnsw", faiss.read_index(str(cache)))
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("index cache %s unusable (%s); rebuilding", cache, e)
    index = EmbeddingIndex(ids, embeddings, "hnsw")
    with atomic_path(cache) as tmp:
        faiss.write_index(index._faiss, str(tmp))
    atomic_write(stamp_file, json.dumps(stamp))
    return index
