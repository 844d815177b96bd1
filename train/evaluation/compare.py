"""Experiment tables: evaluation reports side by side, with cost and paired confidence.

``rtagger train compare`` reads folders written by ``rtagger train evaluate`` (or a
pipeline's evaluate steps) and writes one Markdown table per comparison: song-level macro
PR-AUC and ROC-AUC, window-level macro PR-AUC, the difference to a reference row with a
paired song-level bootstrap 95% interval (same songs resampled for both models), MACs per
window, parameters and measured CPU latency per window, then macro PR-AUC per tag group.

A row is ``DIR`` (song level, mean-pooled windows) or ``DIR@LEVEL`` with LEVEL one of the
report's levels, e.g. ``runs/cpu/eval-aggregator@song/aggregator``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.errors import ConfigError

DEFAULT_LEVEL = "song/mean"


@dataclass
class Row:
    label: str
    folder: Path
    level: str
    metrics: dict  # the level's tag_metrics dict
    window: dict | None  # the window level's, if any
    meta: dict
    songs: dict[str, np.ndarray]


def load_row(spec: str, label: str | None = None) -> Row:
    """One row from ``DIR`` or ``DIR@LEVEL``; ConfigError for a missing or partial report."""
    folder, _, level = spec.partition("@")
    folder, level = Path(folder), level or DEFAULT_LEVEL
    need = [folder / n for n in ("metrics.json", "meta.json", "songs.npz")]
    missing = [p.name for p in need if not p.exists()]
    if missing:
        raise ConfigError(f"{folder} is not a finished evaluation (missing {missing}); run "
                          f"`rtagger train evaluate ... --out {folder}`")
    levels = json.loads(need[0].read_text())["levels"]
    if level not in levels:
        raise ConfigError(f"{folder} has no level {level!r}; it has {sorted(levels)}")
    meta = json.loads(need[1].read_text())
    with np.load(need[2], allow_pickle=False) as z:
        songs = {k: z[k] for k in z.files}
    agg = level.split("/", 1)[1] if level.startswith("song/") else None
    if agg is not None and agg not in songs:
        raise ConfigError(f"{folder}/songs.npz has no {agg!r} scores")
    name = label or meta.get("model_name") or folder.name
    if level != DEFAULT_LEVEL and label is None:
        name = f"{name} ({level.removeprefix('song/')})"
    return Row(name, folder, level, levels[level], levels.get("window"), meta, songs)


def model_cost(model_path: str | Path, latency: bool = True, budget_s: float = 10.0) -> dict:
    """MACs and parameters per window of the tagger, and batch-1 CPU latency (torch engine)."""
    from rtagger.bench.throughput import BenchSettings, measure_latency
    from rtagger.engines import create_engine
    from rtagger.model.checkpoint import load_model
    from rtagger.model.cost import tagger_cost

    model = load_model(model_path)
    cost = tagger_cost(model.tagger)
    if latency:
        settings = BenchSettings(model=str(model_path), batch_sizes=(1,),
                                 warmup_s=min(2.0, budget_s), budget_s=budget_s,
                                 min_iters=min(50, max(1, round(budget_s * 20))))
        r = measure_latency(create_engine(model, "torch", "cpu"), 1, settings)
        cost["cpu_ms_per_window"] = r["p50_ms"]
    return cost


def _song_scores(row: Row) -> np.ndarray:
    return row.songs[row.level.split("/", 1)[1]]


def paired_delta(row: Row, ref: Row, n: int = 1000, seed: int = 0,
                 group: str | None = None) -> tuple[float, float, float]:
    """Macro PR-AUC of ``row`` minus ``ref`` on the same songs, with a bootstrap 95% CI.

    Models with different vocabularies (v1 against v2) are compared on the tags both emit;
    their truth on those tags must be the same. ``group``: only the scored tags of that
    tag group (genre, mode, structure, ...).
    """
    from rtagger.train.evaluation.evaluate import bootstrap_ci, macro_auc

    if list(row.songs["ids"]) != list(ref.songs["ids"]):
        raise ConfigError(f"{row.folder} and {ref.folder} were scored on different songs")
    mine, theirs = list(row.songs["tags"]), list(ref.songs["tags"])
    common = [t for t in theirs if t in set(mine)]
    if group is not None:
        scored = ref.metrics["per_tag"]
        common = [t for t in common if scored.get(t, {}).get("group") == group]
    if not common:
        raise ConfigError(f"{row.folder} and {ref.folder} have no tag in common")
    ci, ri = [mine.index(t) for t in common], [theirs.index(t) for t in common]
    y = row.songs["true"][:, ci]
    if not np.array_equal(y, ref.songs["true"][:, ri]):
        raise ConfigError(f"{row.folder} and {ref.folder} have other labels for the same tags")
    s, r = _song_scores(row)[:, ci], _song_scores(ref)[:, ri]
    low, high = bootstrap_ci(y, s, "pr_auc", n=n, seed=seed, reference=r)
    return macro_auc(y, s)["pr_auc"] - macro_auc(y, r)["pr_auc"], low, high


def compare_markdown(rows: list[Row], reference: int = 0, costs: dict[str, dict] | None = None,
                     title: str = "", bootstrap: int = 1000) -> str:
    """The comparison table and the per-group table for ``rows`` (reference: an index)."""
    from rtagger.train.evaluation.evaluate import compare_table

    ref = rows[reference]
    table_rows = []
    for r in rows:
        d = {"model": r.label,
             "song PR-AUC": r.metrics["macro"]["pr_auc"],
             "song ROC-AUC": r.metrics["macro"]["roc_auc"],
             "window PR-AUC": (r.window or {}).get("macro", {}).get("pr_auc")}
        if r is ref:
            d["delta PR-AUC [95% CI]"] = "reference"
        else:
            delta, low, high = paired_delta(r, ref, n=bootstrap)
            d["delta PR-AUC [95% CI]"] = f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"
        if costs:
            cost = costs.get(r.label, {})
            d["MACs/window"] = cost.get("macs_per_window")
            d["params"] = cost.get("params")
            d["CPU ms/window"] = cost.get("cpu_ms_per_window")
        table_rows.append(d)
    lines = [f"### {title}", ""] if title else []
    lines.append(compare_table(table_rows, reference=ref.label, key="model",
                               relative="song PR-AUC"))
    groups = list(dict.fromkeys(g for r in rows for g in r.metrics["groups"]))
    lines += ["Song-level macro PR-AUC per tag group:", "",
              "| model | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for r in rows:
        cells = [r.metrics["groups"].get(g, {}).get("pr_auc") for g in groups]
        lines.append(f"| {r.label} | " + " | ".join("-" if v is None else f"{v:.3f}"
                                                   for v in cells) + " |")
    others = [r for r in rows if r is not ref]
    if others:
        lines += ["", f"Delta per tag group to {ref.label} (paired bootstrap 95% CI):", "",
                  "| model | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for r in others:
            cells = []
            for g in groups:
                if ref.metrics["groups"].get(g, {}).get("pr_auc") is None:
                    cells.append("-")  # the group has no scored tag
                    continue
                try:
                    delta, low, high = paired_delta(r, ref, n=bootstrap, group=g)
                except ConfigError:  # no scored tag of the group in common
                    cells.append("-")
                    continue
                cells.append(f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]")
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    chance = ref.metrics["macro"].get("pr_auc_chance")
    songs = len(ref.songs["ids"])
    lines += ["", f"{songs} songs; chance macro PR-AUC (mean tag prevalence) "
                  f"{'-' if chance is None else f'{chance:.3f}'}."]
    return "\n".join(lines) + "\n"
