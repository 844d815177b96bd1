"""Simulated DJ mixes and the evaluation of track-change detection on them.

``build_mixes`` joins songs of a benchmark split into continuous mixes with equal-power
crossfades of random length (0 = a hard cut), and writes each mix as FLAC plus its true
boundaries (the middle of each crossfade). ``evaluate_segmentation`` plays every mix through
the live path's own :class:`~rtagger.live.session.StreamSession` (window tags from
:class:`~rtagger.pipeline.tagger.Tagger` at the live hop) and scores the ``segment`` events
it emits:
boundary precision / recall / F-measure within a tolerance (default +-3 s) and false
boundaries per hour of audio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_path
from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES, load_audio
from rtagger.audio.encode import write_flac
from rtagger.jsonl import JsonlAppender, read_records
from rtagger.live.protocol import Start
from rtagger.live.session import StreamSession
from rtagger.model.checkpoint import TaggingModel, load_model
from rtagger.pipeline.session import SegmenterConfig
from rtagger.pipeline.tagger import Tagger
from rtagger.train.data.manifest import Track
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mix:
    path: Path
    boundaries_s: list[float]
    duration_s: float
    track_ids: list[str]


def _crossfade(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    if n <= 0:
        return np.concatenate([a, b])
    t = np.linspace(0, np.pi / 2, n, dtype=np.float32)
    mid = a[-n:] * np.cos(t) + b[:n] * np.sin(t)  # equal power
    return np.concatenate([a[:-n], mid, b[n:]])


def build_mixes(tracks: list[Track], out_dir: str | Path, n_mixes: int, *,
                tracks_per_mix: int = 4, max_crossfade_s: float = 8.0, seed: int = 0,
                progress: bool = True) -> list[Mix]:
    """Write ``n_mixes`` mixes (``mix-XXX.flac`` + ``mixes.jsonl``); existing ones are kept.

    Resumable: a mix's index line is appended only after its audio file is complete.
    """
    from rtagger.train.data.pool import load_track_audio

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {m.path.name: m for m in read_mixes(out)}
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(n_mixes):  # draw every plan first: the same mixes whatever was done
        picks = rng.choice(len(tracks), size=min(tracks_per_mix, len(tracks)), replace=False)
        fades = rng.uniform(0, max_crossfade_s, len(picks) - 1)
        fades[rng.random(len(fades)) < 0.2] = 0.0  # some hard cuts
        plans.append((f"mix-{i:03d}.flac", [tracks[j] for j in picks], fades))
    bar = Bar("building mixes", n_mixes, enabled=progress)
    mixes = []
    with JsonlAppender(out / "mixes.jsonl") as index:
        for name, picked, fades in plans:
            if name in done:
                mixes.append(done[name])
                bar.advance()
                continue
            audio = load_track_audio(picked[0])
            bounds = []
            for tr, fade_s in zip(picked[1:], fades, strict=True):
                nxt = load_track_audio(tr)
                n = min(int(fade_s * SAMPLE_RATE), len(audio), len(nxt))
                bounds.append((len(audio) - n / 2) / SAMPLE_RATE)
                audio = _crossfade(audio, nxt, n)
            with atomic_path(out / name) as tmp:  # a mix file exists only when complete
                write_flac(tmp, audio)
            mix = Mix(out / name, [round(b, 3) for b in bounds], len(audio) / SAMPLE_RATE,
                      [t.id for t in picked])
            index.write({"path": name, "boundaries_s": mix.boundaries_s,
                         "duration_s": mix.duration_s, "track_ids": mix.track_ids})
            mixes.append(mix)
            bar.advance()
    bar.close()
    return mixes


def boundary_scores(true_s: list[float], found_s: list[float], duration_s: float,
                    tolerance_s: float = 3.0) -> dict:
    """Greedy one-to-one matching within the tolerance -> hits, misses, false alarms.

    ``offsets``: for every found boundary, found minus the nearest true one (seconds), to
    see whether detections are early or late.
    """
    offsets = [f - min(true_s, key=lambda t: abs(t - f)) for f in found_s] if true_s else []
    unmatched = sorted(true_s)
    hits = 0
    for f in sorted(found_s):
        near = [t for t in unmatched if abs(t - f) <= tolerance_s]
        if near:
            unmatched.remove(min(near, key=lambda t: abs(t - f)))
            hits += 1
    return {"true": len(true_s), "found": len(found_s), "hits": hits,
            "false": len(found_s) - hits, "duration_s": duration_s, "offsets": offsets}


def tag_mixes(model: TaggingModel, mixes: list[Mix], *, hop_s: float = 1.0,
              progress: bool = True) -> list[tuple[Mix, list]]:
    """Tag every mix once at the live hop: ``(mix, windows)`` for any number of scorings."""
    tagger = Tagger(model, hop_s=hop_s, aggregation="mean", batch_size=32)
    tagged = []
    bar = Bar("tagging mixes", len(mixes), enabled=progress)
    for mix in mixes:
        result = tagger.tag_array(load_audio(mix.path), source=str(mix.path))
        tagged.append((mix, result.windows))
        bar.advance()
    bar.close()
    return tagged


def score_segmentation(tagged: list[tuple[Mix, list]], tags: list[str], *, hop_s: float,
                       tolerance_s: float = 3.0, cfg: SegmenterConfig | None = None) -> dict:
    """Play tagged mixes through the live session's segmenter and score its boundaries."""
    cfg = cfg or SegmenterConfig()
    totals = {"true": 0, "found": 0, "hits": 0, "false": 0, "duration_s": 0.0}
    offsets: list[float] = []
    for mix, windows in tagged:
        session = StreamSession("eval", Start(hop_s=hop_s, segment=True), tags, None,
                                segmenter=cfg)
        found = []
        for w in windows:
            for event in session.add_window(_as_window(w), w.probs, w.embedding):
                found.append(event["start_s"])
        s = boundary_scores(mix.boundaries_s, found, mix.duration_s, tolerance_s)
        for k in totals:
            totals[k] += s[k]
        offsets += s["offsets"]
    near = np.array([o for o in offsets if abs(o) <= 15.0])  # detections of a real change
    p = totals["hits"] / totals["found"] if totals["found"] else 0.0
    r = totals["hits"] / totals["true"] if totals["true"] else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    hours = totals["duration_s"] / 3600
    return {"mixes": len(tagged), "tolerance_s": tolerance_s, "hop_s": hop_s,
            "threshold": cfg.threshold, "confirm": cfg.confirm,
            "min_segment_s": cfg.min_segment_s, "precision": round(p, 4),
            "recall": round(r, 4), "f_measure": round(f, 4),
            "false_per_hour": round(totals["false"] / hours, 2) if hours else None,
            "offset_s": ({q: round(float(np.percentile(near, v)), 2)
                          for q, v in (("p10", 10), ("median", 50), ("p90", 90))}
                         if near.size else None), **totals}


def evaluate_segmentation(model_path: str | Path, mixes: list[Mix], *, hop_s: float = 1.0,
                          tolerance_s: float = 3.0, cfg: SegmenterConfig | None = None,
                          progress: bool = True) -> dict:
    """Boundary precision / recall / F-measure and false boundaries per hour on ``mixes``."""
    model = load_model(model_path)
    tagged = tag_mixes(model, mixes, hop_s=hop_s, progress=progress)
    return {"model": str(model_path), **score_segmentation(
        tagged, model.tags, hop_s=hop_s, tolerance_s=tolerance_s, cfg=cfg)}


def sweep_segmentation(model_path: str | Path, mixes: list[Mix], thresholds: list[float],
                       confirms: list[int], *, hop_s: float = 1.0, tolerance_s: float = 3.0,
                       base: SegmenterConfig | None = None, progress: bool = True) -> dict:
    """Every (threshold, confirm) pair on the same tagged mixes; the best by F-measure.

    Tune on mixes of the validation split, then report the chosen setting on the test
    split's mixes with :func:`evaluate_segmentation`.
    """
    from dataclasses import replace

    base = base or SegmenterConfig()
    model = load_model(model_path)
    tagged = tag_mixes(model, mixes, hop_s=hop_s, progress=progress)
    rows = [score_segmentation(tagged, model.tags, hop_s=hop_s, tolerance_s=tolerance_s,
                               cfg=replace(base, threshold=t, confirm=c))
            for t in thresholds for c in confirms]
    best = max(rows, key=lambda r: (r["f_measure"], -r["false"]))
    return {"model": str(model_path), "best": best, "grid": rows}


def _as_window(w):
    from rtagger.audio.ringbuffer import Window

    start = round(w.start_s * SAMPLE_RATE)
    valid = round((w.end_s - w.start_s) * SAMPLE_RATE)
    return Window(w.index, start, np.zeros(0, np.float32), min(valid, WINDOW_SAMPLES),
                  w.partial)


def read_mixes(out_dir: str | Path) -> list[Mix]:
    out = Path(out_dir)
    index = out / "mixes.jsonl"
    return [Mix(out / d["path"], d["boundaries_s"], d["duration_s"], d["track_ids"])
            for _, d in read_records(index) if (out / d["path"]).is_file()]
