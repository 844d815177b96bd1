"""Outlets for tagging results: JSON, CSV, rich tables and taggram plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from rtagger.pipeline.tagger import TrackResult

UNTRAINED_NOTICE = (
    "model {name} is UNTRAINED (random weights): its scores exercise the pipeline and mean "
    "nothing about the music"
)


def result_to_dict(result: TrackResult, top_k: int = 10, taggram: bool = True) -> dict:
    d = {
        "source": result.source,
        "duration_s": round(result.duration_s, 3),
        "model": result.model,
        "aggregation": result.aggregation,
        "top_tags": [{"tag": t, "prob": round(p, 5)} for t, p in result.top(top_k)],
        "track": {t: round(float(p), 5) for t, p in zip(result.tags, result.track_probs,
                                                         strict=True)},
    }
    if not result.model.get("trained", True):
        d["warning"] = UNTRAINED_NOTICE.format(name=result.model.get("name"))
    if taggram:
        d["tags"] = list(result.tags)
        d["windows"] = [
            {"start_s": round(w.start_s, 4), "end_s": round(w.end_s, 4),
             "partial": w.partial, "probs": [round(float(p), 5) for p in w.probs]}
            for w in result.windows
        ]
    return d


def results_to_json(results: list[TrackResult], errors: list[dict], top_k: int = 10) -> str:
    return json.dumps({"results": [result_to_dict(r, top_k) for r in results],
                       "errors": errors}, indent=2)


def results_to_csv(results: list[TrackResult]) -> str:
    """One row per window and one ``track`` row per file: source, kind, start, end, tags..."""
    if not results:
        return ""
    tags = results[0].tags
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "kind", "start_s", "end_s", "partial", *tags])
    for r in results:
        w.writerow([r.source, "track", 0.0, round(r.duration_s, 4), False,
                    *(f"{p:.5f}" for p in r.track_probs)])
        for win in r.windows:
            w.writerow([r.source, "window", round(win.start_s, 4), round(win.end_s, 4),
                        win.partial, *(f"{p:.5f}" for p in win.probs)])
    return buf.getvalue()


def results_table(result: TrackResult, top_k: int = 10, groups: dict[str, str] | None = None):
    """A rich Table of the top track tags (``groups`` maps tag -> group for a column)."""
    from rich.table import Table

    trained = result.model.get("trained", True)
    title = f"{result.source}  ({result.duration_s:.1f} s, {len(result.windows)} windows)"
    if not trained:
        title += "  [UNTRAINED model: scores, not tags]"
    table = Table(title=title, title_justify="left")
    table.add_column("tag" if trained else "output")
    table.add_column("group", style="dim")
    table.add_column("prob" if trained else "score", justify="right")
    table.add_column("", min_width=20)
    groups = groups or {}
    for tag, p in result.top(top_k):
        table.add_row(tag, groups.get(tag, ""), f"{p:.3f}", "█" * round(20 * p))
    return table


def plot_taggram(result: TrackResult, path: str | Path, max_tags: int = 40) -> Path:
    """Time x tags heat map of window probabilities, tags ordered by track probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gram = result.taggram()
    order = np.argsort(-result.track_probs, kind="stable")[:max_tags]
    fig_h = max(3.0, 0.22 * len(order) + 1.5)
    fig, ax = plt.subplots(figsize=(10, fig_h), dpi=100)
    if len(gram):
        edges = [w.start_s for w in result.windows] + [result.windows[-1].end_s]
        extent = (0.0, max(edges), len(order) - 0.5, -0.5)
        ax.imshow(gram[:, order].T, aspect="auto", interpolation="nearest", cmap="magma",
                  vmin=0.0, vmax=1.0, extent=extent)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([result.tags[i] for i in order], fontsize=8)
    ax.set_xlabel("time (s)")
    title = f"taggram: {Path(result.source).name}  (model {result.model.get('name')})"
    if not result.model.get("trained", True):
        title += "  UNTRAINED"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
