"""Catalog measurements: index build and query time, neighbour quality, ``add`` throughput.

- :func:`bench_index`: synthetic L2-normalised embeddings in clusters (a catalog's shape:
  many small groups of similar tracks) at each size; build time and one-query-at-a-time
  latency (p50/p99) of exact search and of the HNSW index, and HNSW's recall@k against
  exact search. Only the search call is timed (no client, no result formatting).
- :func:`neighbour_quality`: on a catalog built from the synthetic benchmark's manifest,
  precision@k of same-genre and same-groove neighbours against chance (the share of other
  tracks with that property, averaged over queries).
- :func:`prepare_mp3s`: transcode a manifest's songs to 44.1 kHz stereo MP3 (the common
  library format), so ``catalog add --format json`` on them measures catalog throughput
  on MP3s; its report splits the time into hashing, decoding, inference and SQLite
  writes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.catalog.index import EmbeddingIndex, faiss_unavailable_reason
from rtagger.catalog.store import Catalog
from rtagger.errors import EngineUnavailable
from rtagger.machine import cpu_model
from rtagger.model.vocab import tag_groups_v1


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}


def synthetic_embeddings(n: int, dim: int, seed: int = 0, per_cluster: int = 50,
                         spread: float = 0.35) -> np.ndarray:
    """``(n, dim)`` float32 unit vectors in clusters of about ``per_cluster`` tracks."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // per_cluster), dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, len(centers), n)]
    x += (spread / np.sqrt(dim)) * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _latencies(index: EmbeddingIndex, queries: np.ndarray, k: int) -> tuple[dict, np.ndarray]:
    index.search(queries[:5], k)  # warm-up: page in the data
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids, _ = index.search(q[None, :], k)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    ms = np.array(times) * 1000
    return ({"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
             "mean_ms": float(ms.mean())}, np.stack(found))


def bench_index(sizes: list[int], dim: int = 128, queries: int = 1000, k: int = 10,
                seed: int = 0, exact: bool = True) -> dict:
    """Build and query exact and HNSW indexes over synthetic embeddings of each size."""
    reason = faiss_unavailable_reason()
    if reason:
        raise EngineUnavailable(f"bench-index measures the HNSW index: {reason}")
    import faiss

    rows = []
    for n in sizes:
        emb = synthetic_embeddings(n, dim, seed)
        rng = np.random.default_rng(seed + 1)
        # queries: perturbed catalog tracks (a new upload that sounds like existing ones)
        q = emb[rng.integers(0, n, queries)]
        q = q + (0.2 / np.sqrt(dim)) * rng.standard_normal(q.shape).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        ids = np.arange(n, dtype=np.int64)
        row: dict = {"tracks": n, "dim": dim, "queries": queries, "k": k}
        truth = None
        if exact:
            t0 = time.perf_counter()
            ex = EmbeddingIndex(ids, emb, "exact")
            row["exact_build_s"] = time.perf_counter() - t0
            row["exact"], truth = _latencies(ex, q, k)
        t0 = time.perf_counter()
        hnsw = EmbeddingIndex(ids, emb, "hnsw")
        row["hnsw_build_s"] = time.perf_counter() - t0
        row["hnsw"], got = _latencies(hnsw, q, k)
        if truth is not None:
            row["hnsw_recall_at_k"] = float(np.mean(
                [len(set(a) & set(b)) / k for a, b in zip(got, truth, strict=True)]))
        rows.append(row)
    return {"machine": machine(), "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "results": rows}


def neighbour_quality(catalog: Catalog, k: int = 10, groove_key: str = "groove",
                      kind: str = "exact") -> dict:
    """precision@k of neighbours sharing a genre tag / the groove, against chance.

    Labels come from each track's ``meta`` (a manifest's ``tags`` and ``groove``); tracks
    without them are skipped. Genre tags are the vocabulary's ``genre`` group.
    """
    setup = catalog.setup()
    recs = [r for r in catalog.tracks(setup_id=setup.id) if r.meta and "tags" in r.meta]
    if len(recs) <= k:
        raise EngineUnavailable(f"neighbour quality needs more than {k} tracks with manifest "
                                f"tags in their meta (found {len(recs)})")
    groups = tag_groups_v1()
    genres = [frozenset(t for t in r.meta["tags"] if groups.get(t) == "genre") for r in recs]
    grooves = [r.meta.get(groove_key) for r in recs]
    emb = np.stack([r.embedding for r in recs])
    ids = np.arange(len(recs))
    index = EmbeddingIndex(ids, emb, kind)
    nn, _ = index.search(emb, k, exclude=ids)
    n = len(recs)

    def score(same) -> dict:
        prec = [np.mean([same(i, j) for j in row]) for i, row in enumerate(nn)]
        hits = [sum(same(i, j) for j in range(n) if j != i) for i in range(n)]
        # ceiling: a perfect ranking still finds only the tracks that share the label
        return {"precision_at_k": float(np.mean(prec)),
                "chance": float(np.mean(hits) / (n - 1)),
                "ceiling": float(np.mean([min(h, k) / k for h in hits]))}

    return {"tracks": n, "k": k, "model": setup.model_name,
            "weights_sha256": setup.weights_sha256, "index": index.kind,
            "distinct_grooves": len(set(grooves)),
            "same_genre": score(lambda i, j: bool(genres[i] & genres[j])),
            "same_groove": score(lambda i, j: grooves[i] is not None
                                 and grooves[i] == grooves[j])}


def prepare_mp3s(manifest: Path, out_dir: Path, limit: int | None = None,
                 rate: int = 44_100, bitrate: int = 192_000) -> Path:
    """Transcode a manifest's songs to stereo MP3 at ``rate`` Hz; returns a manifest of
    the MP3s (same records, new paths). Existing MP3s are kept (resumable)."""
    import av

    from rtagger.atomic import atomic_path, atomic_write
    from rtagger.catalog.sources import expand

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for src in expand([manifest])[:limit]:
        target = out_dir / (Path(src.location).stem + ".mp3")
        if not target.is_file():
            pcm = load_audio(src.location)
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            with atomic_path(target) as tmp:
                with av.open(str(tmp), "w", format="mp3") as container:
                    stream = container.add_stream("libmp3lame", rate=rate, layout="stereo")
                    stream.bit_rate = bitrate
                    for f in [*resampler.resample(frame), *resampler.resample(None)]:
                        for packet in stream.encode(f):
                            container.mux(packet)
                    for packet in stream.encode(None):
                        container.mux(packet)
        lines.append(json.dumps({**src.meta, "path": target.name}))
    out = out_dir / "manifest.jsonl"
    atomic_write(out, "\n".join(lines) + "\n")
    return out
