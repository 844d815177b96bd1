"""Fidelity to the teachers on whole real tracks held out from training (issue 12, 5a).

The real pool has no labels; what the student is asked to learn there is its teachers'
judgement. This check measures how well it reproduces that judgement on recordings it never
trained on: a tenth of the pool, chosen by hashing track ids
(:func:`rtagger.train.data.windows.labelled_subset`, the rule the pipeline's
``exclude_labelled`` uses to keep them out of pseudo-labelling and training), is labelled by
the same teacher ensemble into its own shard folder (``rtagger train pseudo``). Per track,
the teachers' target for a tag is the mean of their window labels over the track, as for the
aggregator's song targets; the student tags the whole track the way users run it
(:class:`rtagger.pipeline.tagger.Tagger` with the model's aggregation).

Per tag the teachers define (not NaN): Pearson ``r`` across tracks between the student's
track probability and the teachers' target, and the mean absolute error against a constant
reference (every track given the tag's mean target over these tracks: an optimistic
baseline, since it knows the held-out mean). Per track: how many of the teachers' five
strongest tags are among the student's five (``top5``). Macro figures per tag group carry
95 % percentile bootstrap intervals, resampling tracks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_write
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import load_model
from rtagger.model.vocab import tag_groups
from rtagger.pipeline.tagger import Tagger
from rtagger.train.data.cache import FeatureCache
from rtagger.train.data.windows import PseudoWindows
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)

TOP_K = 5
MIN_TRACKS = 3  # fewer tracks than this cannot carry a correlation


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson r of two ``(tracks, tags)`` arrays (NaN where one is constant)."""
    varies = (np.ptp(a, axis=0) > 0) & (np.ptp(b, axis=0) > 0)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(varies & (den > 0), (a * b).sum(axis=0) / den, np.nan)


def _top_overlap(student: np.ndarray, teacher: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Per track: the share of the teachers' ``k`` strongest tags among the student's ``k``."""
    s = np.argsort(-student, axis=1, kind="stable")[:, :k]
    t = np.argsort(-teacher, axis=1, kind="stable")[:, :k]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(s, t, strict=True)])


def fidelity_metrics(student: np.ndarray, teacher: np.ndarray, tags: list[str], *,
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """Fidelity of ``student`` to ``teacher`` track scores, ``(tracks, tags)`` each, no NaN."""
    if student.shape != teacher.shape or student.shape[1] != len(tags):
        raise ValueError(f"scores {student.shape} and targets {teacher.shape} for {len(tags)} "
                         f"tags do not match")
    n = student.shape[0]
    if n < MIN_TRACKS:
        raise ConfigError(f"{n} held-out tracks; fidelity needs at least {MIN_TRACKS}")
    groups = tag_groups(tags)
    per_tag = {}
    r = _pearson(student, teacher)
    mae = np.abs(student - teacher).mean(axis=0)
    const = np.abs(teacher - teacher.mean(axis=0)).mean(axis=0)
    for i, tag in enumerate(tags):
        per_tag[tag] = {"group": groups.get(tag, "other"),
                        "pearson_r": None if np.isnan(r[i]) else float(r[i]),
                        "mae": float(mae[i]), "mae_constant": float(const[i]),
                        "teacher_mean": float(teacher[:, i].mean())}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    top = _top_overlap(student, teacher)

    def summary(cols: np.ndarray) -> dict:
        def macro(idx: np.ndarray) -> tuple[float, float, float]:
            s, t = student[idx][:, cols], teacher[idx][:, cols]
            rr = _pearson(s, t)
            return (float(np.nanmean(rr)) if np.isfinite(rr).any() else np.nan,
                    float(np.abs(s - t).mean()),
                    float(np.abs(t - t.mean(axis=0)).mean()))
        full = macro(np.arange(n))
        boot = np.array([macro(d) for d in draws])

        def ci(j: int) -> list[float]:
            v = boot[:, j][np.isfinite(boot[:, j])]
            return [float(x) for x in np.quantile(v, [0.025, 0.975])] if v.size else [None, None]
        return {"tags": len(cols), "pearson_r": full[0], "pearson_r_ci": ci(0),
                "mae": full[1], "mae_ci": ci(1), "mae_constant": full[2],
                "mae_constant_ci": ci(2)}

    by_group = {}
    for g in sorted(set(groups.get(t, "other") for t in tags)):
        by_group[g] = summary(np.array([i for i, t in enumerate(tags)
                                        if groups.get(t, "other") == g]))
    boot_top = np.array([top[d].mean() for d in draws])
    return {"tracks": n, "macro": summary(np.arange(len(tags))), "groups": by_group,
            "top5_overlap": float(top.mean()),
            "top5_overlap_ci": [float(x) for x in np.quantile(boot_top, [0.025, 0.975])],
            "per_tag": per_tag}


def fidelity(model: str | Path, pseudo: list[str | Path], cache_dir: str | Path,
             out_dir: str | Path, *, device: str = "cpu", progress: bool = True) -> dict:
    """Score ``model`` against the teachers' labels in ``pseudo`` (held-out tracks' shards).

    Writes ``fidelity.json`` and ``fidelity.md`` into ``out_dir`` and returns the report.
    """
    tagging = load_model(model, device=device)
    tagger = Tagger(tagging, device=device, batch_size=32)
    cache = FeatureCache(cache_dir)
    targets = PseudoWindows(tuple(str(p) for p in pseudo), cache, list(tagging.tags)) \
        .song_targets()
    if not targets:
        raise ConfigError(f"{', '.join(map(str, pseudo))}: no labelled tracks")
    refs = sorted(targets)
    teacher = np.stack([targets[r] for r in refs]).astype(np.float64)
    defined = np.isfinite(teacher).all(axis=0)
    if not defined.any():
        raise ConfigError("the teachers' labels define none of the model's tags")
    tags = [t for t, d in zip(tagging.tags, defined, strict=True) if d]
    student = []
    bar = Bar("fidelity: tagging held-out tracks", len(refs), enabled=progress)
    for ref in refs:
        pcm = cache.pcm(ref).astype(np.float32) / 32768.0
        student.append(tagger.tag_array(pcm, source=ref).track_probs)
        bar.advance()
    bar.close()
    report = fidelity_metrics(np.stack(student)[:, defined].astype(np.float64),
                              teacher[:, defined], tags)
    report = {"model": {"name": tagging.name, "weights_sha256": tagging.weights_sha256},
              "pseudo": [str(p) for p in pseudo], "aggregation": tagger.aggregation,
              **report}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "fidelity.json", json.dumps(report, indent=1))
    atomic_write(out / "fidelity.md", fidelity_markdown(report))
    return report


def _f(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def fidelity_markdown(report: dict) -> str:
    """The report's macro figures per tag group as a Markdown table."""
    lines = [f"Fidelity of `{report['model']['name']}` to its teachers on "
             f"{report['tracks']} held-out real tracks (whole tracks; track targets are the "
             f"mean of the teachers' window labels).", "",
             "| group | tags | Pearson r [95% CI] | MAE [95% CI] | MAE of the constant |",
             "|---|---|---|---|---|"]
    rows = [("all", report["macro"]), *report["groups"].items()]
    for name, s in rows:
        lines.append(f"| {name} | {s['tags']} | {_f(s['pearson_r'])} "
                     f"[{_f(s['pearson_r_ci'][0])}, {_f(s['pearson_r_ci'][1])}] | "
                     f"{_f(s['mae'])} [{_f(s['mae_ci'][0])}, {_f(s['mae_ci'][1])}] | "
                     f"{_f(s['mae_constant'])} |")
    lo, hi = report["top5_overlap_ci"]
    lines += ["", f"Teachers' top-{TOP_K} tags among the student's top {TOP_K}: "
              f"{report['top5_overlap']:.3f} [{lo:.3f}, {hi:.3f}] per track.", ""]
    return "\n".join(lines)
