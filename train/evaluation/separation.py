"""How far apart the embeddings put two tracks, against two stretches of one track.

The segmenter can only find a change of track the embedding shows. On the tagged windows
of a set of mixes this measures that directly, without any segmenter setting: the cosine
distance between the mean (unit-normalised) embeddings of 20 s of audio before and 20 s
after each change of track, the crossfade left out (*between*), against the same distance
inside a track, at every 10 s of its un-faded part where 20 s fit on both sides
(*within*). The ROC-AUC of that distance for telling the two apart is the ceiling of any
rule that compares such blocks; a within-track distance above the segmenter's threshold
is a false boundary waiting to happen. ``dims`` keeps the first values of each embedding
only, as the segmenter does (its ``dims``).
"""

from __future__ import annotations

import numpy as np

BLOCK_S = 20.0
WITHIN_STEP_S = 10.0


def _block(starts: np.ndarray, ends: np.ndarray, emb: np.ndarray, a: float, b: float):
    """Mean unit embedding of the windows wholly inside ``[a, b]``, or None."""
    keep = (starts >= a) & (ends <= b)
    if not keep.any():
        return None
    m = emb[keep].mean(0)
    return m / (np.linalg.norm(m) + 1e-9)


def _distance(starts, ends, emb, left: tuple[float, float], right: tuple[float, float]):
    x, y = _block(starts, ends, emb, *left), _block(starts, ends, emb, *right)
    return None if x is None or y is None else float(1.0 - x @ y)


def mix_distances(mix, windows, dims: int | None = None) -> tuple[list[float], list[float]]:
    """``(between, within)`` distances of one tagged mix (see the module docstring)."""
    starts = np.array([w.start_s for w in windows])
    ends = np.array([w.end_s for w in windows])
    emb = np.stack([w.embedding[:dims] for w in windows]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9
    fades = [t.crossfade_s for t in mix.transitions] or [0.0] * len(mix.boundaries_s)
    between, within = [], []
    pure_from = 0.0
    edges = [*zip(mix.boundaries_s, fades, strict=True), (mix.duration_s, 0.0)]
    for b, fade in edges:
        pure_to = b - fade / 2
        for m in np.arange(pure_from + BLOCK_S, pure_to - BLOCK_S + 1e-9, WITHIN_STEP_S):
            d = _distance(starts, ends, emb, (m - BLOCK_S, m), (m, m + BLOCK_S))
            if d is not None:
                within.append(d)
        if b < mix.duration_s:
            d = _distance(starts, ends, emb, (pure_to - BLOCK_S, pure_to),
                          (b + fade / 2, b + fade / 2 + BLOCK_S))
            if d is not None:
                between.append(d)
        pure_from = b + fade / 2
    return between, within


def track_separation(tagged: list[tuple], dims: int | None = None) -> dict:
    """Distances between and within tracks over tagged mixes, and their ROC-AUC."""
    from sklearn.metrics import roc_auc_score

    between, within = [], []
    for mix, windows in tagged:
        b, w = mix_distances(mix, windows, dims)
        between += b
        within += w

    def quantiles(v: list[float]) -> dict | None:
        return ({q: round(float(np.percentile(v, p)), 4)
                 for q, p in (("p10", 10), ("median", 50), ("p90", 90))} if v else None)

    auc = (float(roc_auc_score([1] * len(between) + [0] * len(within), between + within))
           if between and within else None)
    return {"block_s": BLOCK_S, "between": len(between), "within": len(within),
            "between_distance": quantiles(between), "within_distance": quantiles(within),
            "roc_auc": None if auc is None else round(auc, 4),
            # share of within-track block pairs farther apart than each threshold
            "within_above": {str(t): round(float(np.mean(np.array(within) > t)), 4)
                             for t in (0.1, 0.15, 0.2, 0.25, 0.3)} if within else None}
