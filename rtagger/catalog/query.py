"""Questions to a catalog: tracks by tags, tracks like a track or a file.

Every query runs on one setup's tracks (default: the current one, the last ``add``'s),
because tags and embeddings of different models are not comparable. Results are
JSON-ready dicts (the CLI prints them as a table or as JSON).

Tag search: a track matches when every requested tag's track probability is >= ``min_p``;
matches rank by the geometric mean of the requested tags' probabilities (one weak tag
pulls a track down more than an average would).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, is_url
from rtagger.catalog.add import track_embedding
from rtagger.catalog.index import EmbeddingIndex, cached_index
from rtagger.catalog.store import Catalog, CatalogError, Setup, TrackRecord
from rtagger.errors import ConfigError


def track_summary(rec: TrackRecord, setup: Setup, top: int = 5,
                  score: float | None = None) -> dict:
    order = np.argsort(-rec.probs, kind="stable")[:top]
    out = {"id": rec.id, "source": rec.source, "duration_s": round(rec.duration_s, 3),
           "top": [[setup.tags[i], round(float(rec.probs[i]), 4)] for i in order]}
    if score is not None:
        out["score"] = round(float(score), 6)
    if rec.meta:
        out["meta"] = rec.meta
    return out


def search_tags(catalog: Catalog, tags: list[str], *, min_p: float = 0.5, limit: int = 20,
                setup_id: int | None = None) -> dict:
    """Tracks carrying every tag in ``tags`` (probability >= ``min_p``), best first."""
    if not tags:
        raise ConfigError("give at least one --tag")
    if not 0.0 <= min_p <= 1.0:
        raise ConfigError(f"--min must be in [0, 1], got {min_p}")
    setup = catalog.setup(setup_id)
    pos = {t: i for i, t in enumerate(setup.tags)}
    unknown = [t for t in tags if t not in pos]
    if unknown:
        raise ConfigError(f"unknown tag(s) {', '.join(unknown)}; this catalog's model "
                          f"({setup.model_name}) has: {', '.join(setup.tags)}")
    ids, probs = catalog.matrix("probs", setup.id)
    cols = probs[:, [pos[t] for t in tags]]
    match = (cols >= min_p).all(axis=1)
    score = np.exp(np.log(np.clip(cols, 1e-12, 1.0)).mean(axis=1))
    hits = np.flatnonzero(match)
    hits = hits[np.argsort(-score[hits], kind="stable")][:limit]
    recs = catalog.tracks(ids[hits].tolist())
    return {"tags": tags, "min": min_p, "matches": int(match.sum()),
            "tracks_searched": len(ids), "setup": _setup_dict(setup),
            "results": [track_summary(r, setup, score=s)
                        for r, s in zip(recs, score[hits], strict=True)]}


def index_for(catalog: Catalog, setup: Setup, kind: str = "auto") -> EmbeddingIndex:
    """The embedding index of one setup's tracks (an HNSW index is cached beside the db)."""
    ids, emb = catalog.embeddings(setup.id)
    row = catalog.db.execute("SELECT COUNT(*), MAX(id), MAX(added_at) FROM tracks WHERE "
                             "setup_id=?", (setup.id,)).fetchone()
    stamp = {"setup": setup.id, "count": row[0], "max_id": row[1], "max_added_at": row[2]}
    cache = catalog.path.with_name(f"{catalog.path.name}.hnsw-{setup.id}.faiss")
    return cached_index(ids, emb, stamp, cache, kind)


def similar(catalog: Catalog, query: str, *, k: int = 10, kind: str = "auto",
            engine: str = "auto", setup_id: int | None = None) -> dict:
    """The ``k`` tracks nearest to ``query``: a track id, a stored source, or any audio
    file or URL (tagged now with the catalog's model, hop and aggregation)."""
    setup = catalog.setup(setup_id)
    rec = _stored_track(catalog, query)
    if rec is not None:
        if rec.setup_id != setup.id:
            raise CatalogError(f"track {rec.id} was tagged by another setup ({rec.setup_id});"
                               f" re-add it with the current model first")
        emb, exclude, about = rec.embedding, rec.id, track_summary(rec, setup)
    else:
        emb, about = _tag_now(query, setup, engine)
        exclude = None
    index = index_for(catalog, setup, kind)
    ids, scores = index.search(emb[None, :], k,
                               None if exclude is None else np.array([exclude]))
    keep = ids[0] >= 0
    recs = catalog.tracks(ids[0][keep].tolist())
    return {"query": about, "index": index.kind, "tracks_searched": len(index),
            "setup": _setup_dict(setup),
            "results": [track_summary(r, setup, score=s)
                        for r, s in zip(recs, scores[0][keep], strict=True)]}


def _stored_track(catalog: Catalog, query: str) -> TrackRecord | None:
    if query.isdigit():
        found = catalog.tracks([int(query)])
        if not found:
            raise CatalogError(f"no track with id {query} in {catalog.path}")
        return found[0]
    location = query if is_url(query) else str(Path(query).expanduser().absolute())
    return catalog.track_by_source(location)


def _tag_now(query: str, setup: Setup, engine: str) -> tuple[np.ndarray, dict]:
    from rtagger.pipeline.tagger import Tagger

    tagger = Tagger(setup.model_source, engine=engine, hop_s=setup.hop_s,
                    aggregation=setup.aggregation)
    if tagger.model.weights_sha256 != setup.weights_sha256:
        raise CatalogError(f"the catalog's model {setup.model_source} has changed (weights "
                           f"sha256 {str(tagger.model.weights_sha256)[:12]}..., catalog "
                           f"{setup.weights_sha256[:12]}...); re-add the library with it")
    result = tagger.tag_file(query)
    valid = np.array([round((w.end_s - w.start_s) * SAMPLE_RATE) for w in result.windows])
    emb = track_embedding(np.stack([w.embedding for w in result.windows]), valid)
    order = np.argsort(-result.track_probs, kind="stable")[:5]
    about = {"source": query, "in_catalog": False, "duration_s": round(result.duration_s, 3),
             "top": [[result.tags[i], round(float(result.track_probs[i]), 4)] for i in order]}
    return emb, about


def _setup_dict(setup: Setup) -> dict:
    return {"id": setup.id, "model": setup.model_name, "weights_sha256": setup.weights_sha256,
            "vocabulary": setup.vocabulary, "hop_s": setup.hop_s,
            "aggregation": setup.aggregation}
