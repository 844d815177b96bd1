"""How live track tags converge: tags at 15, 30, 60, 120 s into a stream vs the whole song.

The upload preview and live tagging rest on one promise: the track tags a stream shows
early are already close to what the whole song gives. This measures it on labelled songs
through the live path's own session (:meth:`rtagger.pipeline.tagger.Tagger.stream` at the
served hop of 1 s, the track context growing window by window, the model's aggregator when
it has one): at each checkpoint time, the track tags of the last window that ended by then
are compared with

- the final tags of the same song (the offline result at that hop: mean |delta prob|, and
  how many of the final top-5 tags are already in the top 5), and
- the songs' true labels (song-level macro ROC-AUC and PR-AUC over the songs long enough
  to reach that time).

``rtagger train convergence MODEL --manifest test.jsonl --out DIR`` writes
``convergence.json``, ``convergence.md`` and ``convergence.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_path, atomic_write
from rtagger.audio.decode import DEFAULT_LIVE_HOP_S, iter_audio
from rtagger.errors import ConfigError
from rtagger.train.data.manifest import Track
from rtagger.train.data.windows import tag_list_for
from rtagger.train.evaluation.evaluate import macro_auc
from rtagger.train.progress import Bar

CHECKPOINTS_S = (15.0, 30.0, 60.0, 120.0)
TOP_K = 5


@dataclass
class SongCurve:
    """One song's track tags at each checkpoint (None: the song ended before it)."""

    track: Track
    duration_s: float
    at: dict[float, np.ndarray | None]
    final: np.ndarray


def song_curve(tagger, track: Track, checkpoints: tuple[float, ...]) -> SongCurve:
    """Stream ``track`` through ``tagger`` one window at a time; keep the tags at each time."""
    at: dict[float, np.ndarray | None] = dict.fromkeys(checkpoints)
    final, end_s = None, 0.0
    for update in tagger.stream(iter_audio(track.path), low_latency=True, source=track.path):
        end_s = update.window.end_s
        final = update.track_probs
        for c in checkpoints:
            if end_s <= c:
                at[c] = final  # the newest tags a viewer sees at time c
    if final is None:
        raise ConfigError(f"{track.path}: no audio")
    return SongCurve(track, end_s, {c: (at[c] if c < end_s else None) for c in checkpoints},
                     final)


def convergence(model: str | Path, tracks: list[Track], *, hop_s: float = DEFAULT_LIVE_HOP_S,
                checkpoints: tuple[float, ...] = CHECKPOINTS_S,
                progress: bool = True) -> dict:
    """The convergence report of ``model`` on labelled ``tracks`` (JSON-ready)."""
    from rtagger.pipeline.tagger import Tagger

    if not tracks:
        raise ConfigError("no tracks to measure")
    tagger = Tagger(model, hop_s=hop_s)
    tags = tagger.tags
    index = {t: i for i, t in enumerate(tags)}
    bar = Bar("convergence", len(tracks), enabled=progress)
    curves = []
    for tr in tracks:
        curves.append(song_curve(tagger, tr, checkpoints))
        bar.advance()
    bar.close()
    truth = np.zeros((len(curves), len(tags)), np.float32)
    for r, c in enumerate(curves):
        for t in c.track.tags:
            if t in index:
                truth[r, index[t]] = 1.0
    # Scored on the tags the songs' labels decide (v1's for the synthetic benchmark).
    labelled_cols = [index[t] for t in tag_list_for([c.track for c in curves]) if t in index]
    rows = []
    for c in (*checkpoints, "final"):
        keep = [i for i, cv in enumerate(curves)
                if c == "final" or cv.at[c] is not None]
        if not keep:
            rows.append({"at_s": c, "songs": 0})
            continue
        probs = np.stack([curves[i].final if c == "final" else curves[i].at[c] for i in keep])
        finals = np.stack([curves[i].final for i in keep])
        delta = np.abs(probs - finals).mean(1)
        top_now = np.argsort(-probs, 1)[:, :TOP_K]
        top_end = np.argsort(-finals, 1)[:, :TOP_K]
        overlap = [len(set(a) & set(b)) / TOP_K for a, b in zip(top_now, top_end, strict=True)]
        y = truth[keep][:, labelled_cols]
        try:
            auc = macro_auc(y, probs[:, labelled_cols])
        except ConfigError:  # too few songs left at this time to score any tag
            auc = {"roc_auc": None, "pr_auc": None}
        rows.append({"at_s": c, "songs": len(keep),
                     "mean_abs_delta_to_final": float(delta.mean()),
                     "top5_overlap_with_final": float(np.mean(overlap)),
                     "song_macro_roc_auc": auc["roc_auc"], "song_macro_pr_auc": auc["pr_auc"]})
    info = tagger.model_info()
    return {"model": {k: info[k] for k in ("name", "weights_sha256", "engine")},
            "aggregation": tagger.new_session().context.method, "hop_s": hop_s,
            "songs": len(curves),
            "mean_duration_s": float(np.mean([c.duration_s for c in curves])),
            "rows": rows}


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """``convergence.json``, ``convergence.md`` and ``convergence.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write(out / "convergence.json", json.dumps(report, indent=2) + "\n"),
             atomic_write(out / "convergence.md", report_markdown(report))]
    paths.append(_plot(report, out / "convergence.png"))
    return paths


def report_markdown(report: dict) -> str:
    def f(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [f"Model `{report['model']['name']}` ({report['model']['weights_sha256'][:12]}), "
             f"{report['aggregation']} aggregation, hop {report['hop_s']:g} s, "
             f"{report['songs']} songs (mean {report['mean_duration_s']:.0f} s).", "",
             "| into the stream | songs | mean abs delta to final | top-5 overlap with final "
             "| song macro ROC-AUC | song macro PR-AUC |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        at = "whole song" if r["at_s"] == "final" else f"{r['at_s']:g} s"
        if not r["songs"]:
            lines.append(f"| {at} | 0 | - | - | - | - |")
            continue
        lines.append(f"| {at} | {r['songs']} | {f(r['mean_abs_delta_to_final'], 4)} | "
                     f"{f(r['top5_overlap_with_final'], 2)} | {f(r['song_macro_roc_auc'])} | "
                     f"{f(r['song_macro_pr_auc'])} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["at_s"] != "final" and r["songs"]]
    final = next(r for r in report["rows"] if r["at_s"] == "final")
    xs = [r["at_s"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(xs, [r["mean_abs_delta_to_final"] for r in rows], "o-")
    a1.set(xscale="log", xticks=xs, xticklabels=[f"{x:g}" for x in xs],
           xlabel="seconds into the stream", ylabel="mean |prob - final prob|",
           title="distance to the whole-song tags")
    for key, label in (("song_macro_roc_auc", "ROC-AUC"), ("song_macro_pr_auc", "PR-AUC")):
        pts = [(r["at_s"], r[key]) for r in rows if r[key] is not None]
        if pts:
            line, = a2.plot(*zip(*pts, strict=True), "o-", label=label)
            if final[key] is not None:
                a2.axhline(final[key], ls="--", color=line.get_color(), lw=1)
    a2.set(xscale="log", xticks=xs, xticklabels=[f"{x:g}" for x in xs],
           xlabel="seconds into the stream", ylabel="song macro AUC (dashed: whole song)",
           title="against the true labels")
    a2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
