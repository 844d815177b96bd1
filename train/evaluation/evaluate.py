"""Evaluation of tagging experiments: metrics, reports, comparison tables, bootstrap CIs.

Library functions over arrays (no model code): ``y_true`` is ``(n_items, n_tags)`` in {0, 1},
``y_score`` the same shape, any monotone score (probabilities or logits). An item is a window
or a song. :func:`tag_metrics` gives per-tag ROC-AUC and PR-AUC (average precision, from
scikit-learn), macro averages over the tags that have both positives and negatives (the others
are listed with the reason, never averaged in as NaN), per-group macros and micro averages.
:func:`evaluate_levels` runs it at window level and for each song-level aggregation,
:func:`write_report` writes ``metrics.json``, ``metrics.md`` and curve plots,
:func:`compare_table` formats the experiment summary and :func:`bootstrap_ci` gives a
song-level bootstrap interval of a macro metric (or of a paired difference between models).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from rtagger.atomic import atomic_write
from rtagger.errors import ConfigError

METRICS = ("roc_auc", "pr_auc")
METRIC_NAMES = {"roc_auc": "ROC-AUC", "pr_auc": "PR-AUC"}
CURVE_POINTS = 101  # common FPR / recall grid on which per-tag curves are averaged
BOOTSTRAP_CHUNK_ELEMS = 4_000_000  # resamples x items per vectorised step (~32 MB float64)


def _check(y_true: np.ndarray, y_score: np.ndarray, n_tags: int | None = None) -> None:
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must be equal 2-D")
    if n_tags is not None and y_true.shape[1] != n_tags:
        raise ValueError(f"{y_true.shape[1]} score columns but {n_tags} tags")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not np.isfinite(y_score).all():
        raise ValueError(f"y_score has {int((~np.isfinite(y_score)).sum())} non-finite values")


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _pr_interp(y: np.ndarray, s: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Interpolated precision (best precision at recall >= r) on ``grid``."""
    precision, recall, _ = precision_recall_curve(y, s)
    precision, recall = precision[::-1], recall[::-1]  # recall ascending
    best = np.maximum.accumulate(precision[::-1])[::-1]
    return best[np.minimum(np.searchsorted(recall, grid), len(best) - 1)]


def tag_metrics(y_true: np.ndarray, y_score: np.ndarray, tags: Sequence[str],
                groups: dict[str, str] | None = None) -> dict:
    """Per-tag, per-group, macro and micro ROC-AUC / PR-AUC of one set of items.

    ``y_true``: ``(n_items, n_tags)`` in {0, 1}; ``y_score``: ``(n_items, n_tags)`` float;
    ``groups``: tag -> group (e.g. :func:`rtagger.model.vocab.tag_groups_v1`), None for no groups.
    A tag without positives or without negatives has no AUC: it is left out of every average
    and listed under ``skipped`` (tag -> reason), its per-tag metrics are None.
    Returns a JSON-ready dict: ``n_items``, ``macro``, ``micro``, ``groups``, ``per_tag``,
    ``skipped`` and ``curves`` (macro and per-group ROC / interpolated PR curves on a
    common grid of :data:`CURVE_POINTS`, for plots).
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    tags = list(tags)
    _check(y_true, y_score, len(tags))
    missing = [t for t in tags if groups is not None and t not in groups]
    if missing:
        raise ValueError(f"tags without a group: {missing}")
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    per_tag, skipped, curves = {}, {}, {}
    for j, tag in enumerate(tags):
        y, s = y_true[:, j].astype(np.int64), y_score[:, j]
        pos = int(y.sum())
        entry = {"group": groups[tag] if groups else None, "positives": pos,
                 "prevalence": pos / len(y) if len(y) else None, "roc_auc": None, "pr_auc": None}
        if pos == 0 or pos == len(y):
            skipped[tag] = "no positives" if pos == 0 else "no negatives"
        else:
            entry["roc_auc"] = float(roc_auc_score(y, s))
            entry["pr_auc"] = float(average_precision_score(y, s))
            fpr, tpr, _ = roc_curve(y, s)
            curves[tag] = (np.interp(grid, fpr, tpr), _pr_interp(y, s, grid))
        per_tag[tag] = entry

    def summary(members: list[str]) -> dict:
        valid = [t for t in members if t not in skipped]
        out = {m: _mean([per_tag[t][m] for t in valid]) for m in METRICS}
        out["pr_auc_chance"] = _mean([per_tag[t]["prevalence"] for t in valid])
        out["n_tags"], out["skipped"] = len(valid), [t for t in members if t in skipped]
        return out

    group_names = list(dict.fromkeys(groups[t] for t in tags)) if groups else []
    members = {g: [t for t in tags if groups and groups[t] == g] for g in group_names}
    has_both = 0 < y_true.sum() < y_true.size
    flat_true, flat_score = y_true.ravel(), y_score.ravel()
    scored = {k: [curves[t] for t in ts if t in curves]
              for k, ts in {"macro": tags, **members}.items()}
    mean_curve = {kind: {k: np.mean([c[i] for c in cs], axis=0).round(4).tolist()
                         for k, cs in scored.items() if cs} for i, kind in enumerate(("roc", "pr"))}
    return {
        "n_items": int(y_true.shape[0]),
        "n_tags": len(tags),
        "macro": summary(tags),
        "micro": {"roc_auc": float(roc_auc_score(flat_true, flat_score)) if has_both else None,
                  "pr_auc": float(average_precision_score(flat_true, flat_score))
                  if has_both else None},
        "groups": {g: summary(ts) for g, ts in members.items()},
        "per_tag": per_tag,
        "skipped": skipped,
        "curves": {"grid": grid.round(4).tolist(), **mean_curve},
    }


def macro_auc(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Macro ROC-AUC and PR-AUC over the tags with positives and negatives (no curves).

    The cheap form of :func:`tag_metrics`'s ``macro`` entry, for validation during
    training; raises :class:`ConfigError` when no tag can be scored.
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    cols = [j for j in range(y_true.shape[1]) if 0 < y_true[:, j].sum() < len(y_true)]
    if not cols:
        raise ConfigError("no tag has both positive and negative examples to score")
    return {"roc_auc": float(np.mean([roc_auc_score(y_true[:, j], y_score[:, j])
                                      for j in cols])),
            "pr_auc": float(np.mean([average_precision_score(y_true[:, j], y_score[:, j])
                                     for j in cols]))}


def evaluate_levels(window_true: np.ndarray | None, window_score: np.ndarray | None,
                    song_true: np.ndarray, song_scores: dict[str, np.ndarray],
                    tags: Sequence[str], groups: dict[str, str] | None = None) -> dict[str, dict]:
    """:func:`tag_metrics` at window level and per song-level aggregation.

    ``window_true`` / ``window_score``: ``(n_windows, n_tags)`` (window labels are usually the
    song's, ``song_true[window_song]``), both None to skip the window level. ``song_true``:
    ``(n_songs, n_tags)``; ``song_scores``: aggregation name -> ``(n_songs, n_tags)``, e.g.
    ``{"mean": ..., "aggregator": ...}``. Returns ``{"window": ..., "song/<name>": ...}``.
    """
    if (window_true is None) != (window_score is None):
        raise ValueError("give both window_true and window_score, or neither")
    if not song_scores:
        raise ValueError("song_scores is empty: pass at least one aggregation")
    results = {}
    if window_true is not None:
        results["window"] = tag_metrics(window_true, window_score, tags, groups)
    for name, scores in song_scores.items():
        results[f"song/{name}"] = tag_metrics(song_true, scores, tags, groups)
    return results


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _markdown(results: dict[str, dict], title: str) -> str:
    levels = list(results)
    header = ["group"] + [f"{lv} {METRIC_NAMES[m]}" for lv in levels for m in METRICS]
    lines = [f"# {title}", ""]
    for lv, r in results.items():
        skipped = ", ".join(f"{t} ({why})" for t, why in r["skipped"].items()) or "none"
        lines.append(f"- {lv}: {r['n_items']} items, {r['macro']['n_tags']} of {r['n_tags']} "
                     f"tags scored; skipped: {skipped}")
    group_names = list(dict.fromkeys(g for r in results.values() for g in r["groups"]))
    lines += ["", "## Summary", "", "| " + " | ".join(header) + " |",
              "|---|" + "---:|" * (len(header) - 1)]
    for row in [*group_names, "macro", "micro"]:
        cells = [results[lv]["groups"].get(row, {}) if row in group_names else results[lv][row]
                 for lv in levels]
        lines.append(f"| {row} | " + " | ".join(_num(c.get(m)) for c in cells for m in METRICS)
                     + " |")
    chance = [(_num(0.5 if r["macro"]["n_tags"] else None), _num(r["macro"]["pr_auc_chance"]))
              for r in results.values()]  # PR-AUC of random scores is the mean prevalence
    lines.append("| chance | " + " | ".join(v for pair in chance for v in pair) + " |")
    header = ["tag", "group"] + [f"{lv} {h}" for lv in levels for h in ("pos", "ROC", "PR")]
    lines += ["", "## Per tag", "", "| " + " | ".join(header) + " |",
              "|---|---|" + "---:|" * (len(header) - 2)]
    first = results[levels[0]]["per_tag"]
    for tag in first:
        cells = [results[lv]["per_tag"][tag] for lv in levels]
        lines.append(f"| {tag} | {first[tag]['group'] or ''} | " + " | ".join(
            f"{c['positives']} | {_num(c['roc_auc'])} | {_num(c['pr_auc'])}" for c in cells)
            + " |")
    return "\n".join(lines) + "\n"


def _curve_png(result: dict, title: str) -> bytes:
    fig = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax_roc, ax_pr = fig.subplots(1, 2)
    grid = result["curves"]["grid"]
    for name in result["curves"]["roc"]:
        summary = result["macro"] if name == "macro" else result["groups"][name]
        style = {"linewidth": 2.5, "color": "black"} if name == "macro" else {"linewidth": 1.2}
        ax_roc.plot(grid, result["curves"]["roc"][name], label=f"{name} "
                    f"({_num(summary['roc_auc'])})", **style)
        ax_pr.plot(grid, result["curves"]["pr"][name], label=f"{name} "
                   f"({_num(summary['pr_auc'])})", **style)
    ax_roc.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if result["macro"]["pr_auc_chance"] is not None:
        ax_pr.axhline(result["macro"]["pr_auc_chance"], ls=":", color="grey", label="chance")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlabel="recall", ylabel="interpolated precision", title="PR")
    for ax in (ax_roc, ax_pr):
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "upper right")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(results: dict[str, dict], out_dir: str | Path, title: str) -> list[Path]:
    """Write ``metrics.json``, ``metrics.md`` and ``curves_<level>.png`` into ``out_dir``.

    ``results``: level -> :func:`tag_metrics` dict, as :func:`evaluate_levels` returns.
    Each file is written atomically; returns the paths written.
    """
    if not results:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"title": title, "levels": results}, indent=1, allow_nan=False)
    paths = [atomic_write(out / "metrics.json", text.encode()),
             atomic_write(out / "metrics.md", _markdown(results, title).encode())]
    for level, r in results.items():
        if r["curves"]["roc"]:  # no scorable tag: nothing to draw
            png = _curve_png(r, f"{title}: {level}")
            paths.append(atomic_write(out / f"curves_{level.replace('/', '_')}.png", png))
    return paths


def _fmt(col: str, v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return f"[{_fmt(col, v[0])}, {_fmt(col, v[1])}]"
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return str(v).replace("|", "\\|")
    v, col = float(v), col.lower()
    if "auc" in col:
        return f"{v:.3f}"
    if any(k in col for k in ("macs", "flops", "params")) and abs(v) >= 1e3:
        exp = min(int(np.log10(abs(v))) // 3, 4)
        return f"{v / 10 ** (3 * exp):.3g} {' kMGT'[exp]}"
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def compare_table(rows: list[dict], reference: str | None = None, key: str = "model",
                  relative: str = "macro_pr_auc") -> str:
    """A Markdown table of experiment rows with a "% of <reference>" column.

    ``rows``: dicts such as ``{"model", "macro_pr_auc", "macro_roc_auc", "macs_per_window",
    "cpu_ms_per_window", "params"}``; columns are the keys in first-seen order, a missing
    value shows as "-". The relative column gives ``row[relative]`` as a percentage of the
    reference row's (the row whose ``key`` equals ``reference``; the first row if None).
    """
    if not rows:
        raise ValueError("no rows")
    names = [r.get(key) for r in rows]
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is not among the rows' {key!r}: {names}")
    ref = rows[0] if reference is None else rows[names.index(reference)]
    cols = list(dict.fromkeys(c for r in rows for c in r))
    rel_col = f"% of {ref.get(key)}"
    base = ref.get(relative)
    table = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float, np.number, type(None), tuple, list))
                   for r in rows) and c != key for c in cols]
    if relative in cols:
        at = cols.index(relative) + 1
        cols.insert(at, rel_col)
        numeric.insert(at, True)
        for cells, r in zip(table, rows, strict=True):
            v = r.get(relative)
            cells.insert(at, "-" if v is None or not base else f"{100.0 * v / base:.1f}%")
    lines = ["| " + " | ".join(_fmt(c, c) for c in cols) + " |",
             "|" + "".join("---:|" if n else "---|" for n in numeric)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in table]) + "\n"


def weighted_scores(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """ROC-AUC and AP of one tag for ``(n_resamples, n_items)`` sample weights ``w`` at once.

    Equals scikit-learn with ``sample_weight`` (ties handled as one threshold); NaN where a
    resample has no positive or no negative weight. Returns metric -> ``(n_resamples,)``.
    """
    order = np.argsort(-s, kind="stable")
    y, s, w = y[order].astype(np.float64), s[order], w[:, order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), len(s) - 1)  # last item of each tie
    tp = np.cumsum(w * y, axis=1)[:, ends]
    fp = np.cumsum(w * (1.0 - y), axis=1)[:, ends]
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.pad(tp / n_pos, ((0, 0), (1, 0)))
        fpr = np.pad(fp / n_neg, ((0, 0), (1, 0)))
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
    roc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)
    ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    bad = (n_pos[:, 0] <= 0) | (n_neg[:, 0] <= 0)
    return {"roc_auc": np.where(bad, np.nan, roc), "pr_auc": np.where(bad, np.nan, ap)}


def _macro_weighted(y_true: np.ndarray, y_score: np.ndarray, w: np.ndarray,
                    metric: str) -> np.ndarray:
    """``(n_resamples,)`` macro ``metric`` over the columns of ``y_true`` for weights ``w``."""
    per_tag = np.stack([weighted_scores(y_true[:, j], y_score[:, j], w)[metric]
                        for j in range(y_true.shape[1])], axis=1)
    with np.errstate(invalid="ignore"):
        scored = np.isfinite(per_tag).sum(axis=1)
        return np.where(scored > 0, np.nansum(per_tag, axis=1) / np.maximum(scored, 1), np.nan)


def bootstrap_ci(y_true: np.ndarray, y_score: np.ndarray, metric: str = "pr_auc",
                 n: int = 1000, seed: int = 0, alpha: float = 0.05,
                 reference: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` of a macro metric, resampling songs.

    ``y_true`` / ``y_score``: song-level ``(n_songs, n_tags)``. Each of the ``n`` resamples
    draws songs with replacement (same draws for a given ``seed``) and averages the metric over
    the tags scorable in the full set that have both classes in the resample. With
    ``reference`` (another model's ``(n_songs, n_tags)`` scores on the same songs) the interval
    is of the paired difference ``macro(y_score) - macro(reference)``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    if n < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n >= 1 and 0 < alpha < 1, got n={n}, alpha={alpha}")
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    _check(y_true, y_score)
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        _check(y_true, reference)
    pos = y_true.sum(axis=0)
    keep = (pos > 0) & (pos < y_true.shape[0])
    if not keep.any():
        raise ValueError("no tag has both positives and negatives: no macro metric to bootstrap")
    y_true = y_true[:, keep]
    rng = np.random.default_rng(seed)
    n_songs = y_true.shape[0]
    stats = []
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMS // n_songs)
    for start in range(0, n, chunk):
        draws = rng.integers(0, n_songs, size=(min(chunk, n - start), n_songs))
        w = np.stack([np.bincount(d, minlength=n_songs) for d in draws]).astype(np.float64)
        stat = _macro_weighted(y_true, y_score[:, keep], w, metric)
        if reference is not None:
            stat = stat - _macro_weighted(y_true, reference[:, keep], w, metric)
        stats.append(stat)
    values = np.concatenate(stats)
    values = values[np.isfinite(values)]  # resamples where no tag had both classes
    if values.size == 0:
        raise ValueError("no bootstrap resample had a scorable tag; too few songs")
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)
