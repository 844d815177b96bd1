"""Where the structure tags' information is lost: probes of the window outputs (issue 13).

The context aggregator learns ``breakdown`` and ``tempo_change`` from the sequence of
window outputs. Whether it *can* is a question about that sequence, which this answers
without training anything: fixed rules score every song from what the aggregator reads,
and from what it does not read, and each rule's song-level ROC-AUC against the benchmark's
labels says how much of the tag that signal holds.

- ``breakdown``: the drums go silent for >= 8 s with >= 10 s of drums on both sides, in
  20-90 % of the song. The rule: over every run of windows wholly inside a candidate gap,
  the mean drum signal of the windows wholly outside it (10 s on each side) less the run's;
  the song's score is the largest. Fed with the truth (each window's drum label from the
  timeline) it gives the rule's ceiling;
  fed with the tagger's ``drums`` probability, what the tagger's own output holds; at the
  training contexts' hop (3.69 s) and the live hop (1 s).
- ``tempo_change``: >= 15 % between 30 % and 70 % of the song, the new tempo lasting >= 15 s.
  The rule compares a tempo signal over the 12 s before and after each ``t`` in that span:
  a ridge regression from the window embedding to log2 bpm (fitted on the valid songs,
  scored on the test songs: how much tempo the embedding carries at all), the tagger's
  ``slow``/``fast`` probabilities (what its outputs say), and, as the alternative input, an
  onset-autocorrelation tempo estimate of the audio itself
  (:func:`rtagger.train.evaluation.mixes.estimate_tempo`; distances folded over octaves).

``rtagger train probe MODEL --valid valid.jsonl --test test.jsonl --out DIR``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_write
from rtagger.audio.decode import SAMPLE_RATE, WINDOW_S, load_audio
from rtagger.errors import ConfigError
from rtagger.train.data.manifest import Track
from rtagger.train.evaluation.mixes import estimate_tempo
from rtagger.train.progress import Bar
from rtagger.train.synth import labels as L

TEMPO_SPAN_S = 12.0  # audio compared on each side of a candidate tempo change
TEMPO_STEP_S = 1.0
BOOTSTRAP = 1000


@dataclass
class Song:
    """One song's window series at one hop, with the truth the rules need."""

    track: Track
    duration: float
    centres: np.ndarray  # (n,) s
    drums_true: np.ndarray  # (n,) 0/1 from the timeline
    drums_prob: np.ndarray  # (n,)
    slow: np.ndarray
    fast: np.ndarray
    emb: np.ndarray  # (n, d)
    log2_bpm: np.ndarray  # (n,) true tempo of each window


def series(tagger, track: Track, audio: np.ndarray) -> Song:
    """Window outputs of ``audio`` through ``tagger`` (a :class:`Tagger`) and their truth."""
    timeline = track.extra.get("timeline")
    if timeline is None:
        raise ConfigError(f"{track.id}: no timeline (probes need the synthetic benchmark)")
    result = tagger.tag_array(audio, source=track.id)
    wins = [w for w in result.windows if not w.partial]
    if not wins:
        raise ConfigError(f"{track.id}: shorter than one window")
    idx = {t: i for i, t in enumerate(tagger.tags)}
    probs = np.stack([w.probs for w in wins])
    record = {"tags": list(track.tags), "timeline": timeline}
    return Song(
        track=track, duration=float(timeline["duration"]),
        centres=np.array([(w.start_s + w.end_s) / 2 for w in wins]),
        drums_true=np.array([float("drums" in L.window_labels(record, w.start_s, w.end_s))
                             for w in wins]),
        drums_prob=probs[:, idx["drums"]], slow=probs[:, idx["slow"]],
        fast=probs[:, idx["fast"]], emb=np.stack([w.embedding for w in wins]),
        log2_bpm=np.log2([L.window_bpm(timeline, w.start_s, w.end_s) for w in wins]))


def breakdown_score(centres: np.ndarray, drums: np.ndarray, duration: float) -> float:
    """The breakdown rule on one drum signal per window (see the module docstring).

    Over every run of windows ``i..j`` wholly inside a candidate gap (centres spanning at
    least ``8 s - window``, within 20-90 % of the song), the mean drum signal of the windows
    wholly outside it within 10 s on each side, less the run's: the largest such value.
    """
    n = len(centres)
    cs = np.concatenate([[0.0], np.cumsum(drums)])
    gap = max(L.BREAKDOWN_MIN_S - WINDOW_S, 0.0)
    around = L.BREAKDOWN_DRUMS_AROUND_S

    def mean(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:  # windows lo..hi-1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(hi > lo, (cs[hi] - cs[lo]) / (hi - lo), np.nan)

    ok = ((centres >= L.BREAKDOWN_START_FRAC * duration)
          & (centres <= L.BREAKDOWN_END_FRAC * duration))
    best = -1.0
    for i in np.flatnonzero(ok):
        j = np.flatnonzero(ok & (centres >= centres[i] + gap))
        if not j.size:
            continue
        # windows wholly before the gap end a window's width before its first window's centre
        b_lo = np.searchsorted(centres, centres[i] - WINDOW_S - around, "left")
        b_hi = np.searchsorted(centres, centres[i] - WINDOW_S, "right")
        before = mean(np.array(b_lo), np.array(b_hi))
        a_lo = np.searchsorted(centres, centres[j] + WINDOW_S, "left")
        a_hi = np.searchsorted(centres, centres[j] + WINDOW_S + around, "right")
        after = mean(a_lo, np.minimum(a_hi, n))
        score = np.minimum(before, after) - mean(np.full_like(j, i), j + 1)
        if np.isfinite(score).any():
            best = max(best, float(np.nanmax(score)))
    return best


def change_score(centres: np.ndarray, signal: np.ndarray, duration: float) -> float:
    """Largest change of the mean ``signal`` (n,) or (n, k) between the 12 s before and
    after a time in 30-70 % of the song (summed over the k columns)."""
    sig = signal.reshape(len(signal), -1)
    best = 0.0
    for t in np.arange(L.STRUCTURE_START_FRAC * duration, L.STRUCTURE_END_FRAC * duration,
                       TEMPO_STEP_S):
        a = sig[(centres < t) & (centres >= t - TEMPO_SPAN_S)]
        b = sig[(centres > t) & (centres <= t + TEMPO_SPAN_S)]
        if not (len(a) and len(b)):
            continue
        best = max(best, float(np.abs(b.mean(0) - a.mean(0)).sum()))
    return best


def audio_tempo_score(audio: np.ndarray, duration: float) -> float:
    """The tempo-change rule on onset-autocorrelation tempi of the audio itself."""
    best = 0.0
    span = int(TEMPO_SPAN_S * SAMPLE_RATE)
    for t in np.arange(L.STRUCTURE_START_FRAC * duration, L.STRUCTURE_END_FRAC * duration,
                       TEMPO_STEP_S):
        i = int(t * SAMPLE_RATE)
        a, b = estimate_tempo(audio[max(i - span, 0):i]), estimate_tempo(audio[i:i + span])
        if a and b:
            d = np.log2(b / a)
            best = max(best, abs(d - round(d)))
    return best


def roc_with_ci(y: np.ndarray, s: np.ndarray, seed: int = 0) -> dict:
    """ROC-AUC and a percentile bootstrap 95 % interval over songs."""
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        raise ConfigError("a probe needs songs with and without the tag")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            boots.append(roc_auc_score(y[i], s[i]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"roc_auc": float(roc_auc_score(y, s)), "ci95": [float(lo), float(hi)]}


def _songs(tagger, tracks: list[Track], what: str, progress: bool, audio_tempo: bool):
    """Window series of ``tracks``, and the audio tempo rule's scores if ``audio_tempo``."""
    out, tempo = [], []
    bar = Bar(f"probing {what}", len(tracks), enabled=progress)
    for tr in tracks:
        pcm = load_audio(tr.path)
        out.append(series(tagger, tr, pcm))
        if audio_tempo:
            tempo.append(audio_tempo_score(pcm, out[-1].duration))
        bar.advance()
    bar.close()
    return out, tempo


def probe(model: str | Path, valid: list[Track], test: list[Track], *,
          hops: tuple[float, ...] = (WINDOW_S, 1.0), progress: bool = True) -> dict:
    """The probe report of ``model`` (JSON-ready); rules scored on ``test``."""
    from sklearn.linear_model import Ridge

    from rtagger.pipeline.tagger import Tagger

    if not valid or not test:
        raise ConfigError("probes need valid songs (to fit the tempo regression) and test songs")
    rows, meta = [], {}
    for hop in hops:
        tagger = Tagger(model, hop_s=hop, aggregation="mean", batch_size=32)
        fit, _ = _songs(tagger, valid, f"valid, hop {hop:.2f} s", progress, False)
        songs, audio_tempo = _songs(tagger, test, f"test, hop {hop:.2f} s", progress,
                                    audio_tempo=hop == hops[0])
        ridge = Ridge(alpha=1.0).fit(np.concatenate([s.emb for s in fit]),
                                     np.concatenate([s.log2_bpm for s in fit]))
        pred = [ridge.predict(s.emb) for s in songs]
        truth = np.concatenate([s.log2_bpm for s in songs])
        resid = np.concatenate(pred) - truth
        meta[f"hop {hop:.2f} s"] = {
            "tempo_regression_r2": float(1 - np.mean(resid**2) / truth.var()),
            "tempo_regression_median_abs_error_pct":
                float(np.median(np.abs(2 ** np.abs(resid) - 1)) * 100),
            "test_windows": int(truth.size), "valid_windows": int(sum(len(s.emb) for s in fit))}
        y_bd = np.array([float("breakdown" in s.track.tags) for s in songs])
        y_tc = np.array([float("tempo_change" in s.track.tags) for s in songs])
        scorers = {
            ("breakdown", "true drum labels per window (the rule's ceiling)"):
                [breakdown_score(s.centres, s.drums_true, s.duration) for s in songs],
            ("breakdown", "tagger's drums probability"):
                [breakdown_score(s.centres, s.drums_prob, s.duration) for s in songs],
            ("tempo_change", "true tempo per window (the rule's ceiling)"):
                [change_score(s.centres, s.log2_bpm, s.duration) for s in songs],
            ("tempo_change", "tempo regressed from the embedding"):
                [change_score(s.centres, p, s.duration) for s, p in zip(songs, pred, strict=True)],
            ("tempo_change", "tagger's slow and fast probabilities"):
                [change_score(s.centres, np.stack([s.slow, s.fast], 1), s.duration)
                 for s in songs],
        }
        if hop == hops[0]:
            scorers[("tempo_change", "onset-autocorrelation tempo of the audio")] = audio_tempo
        for (tag, signal), scores in scorers.items():
            y = y_bd if tag == "breakdown" else y_tc
            rows.append({"tag": tag, "signal": signal, "hop_s": round(hop, 3),
                         "positives": int(y.sum()), "songs": len(y),
                         **roc_with_ci(y, np.array(scores))})
    info = tagger.model_info()
    return {"model": {k: info[k] for k in ("name", "weights_sha256")},
            "valid_songs": len(valid), "test_songs": len(test), "tempo": meta, "rows": rows}


def report_markdown(report: dict) -> str:
    m = report["model"]
    lines = [f"Model `{m['name']}` ({m['weights_sha256'][:12]}), {report['test_songs']} test "
             f"songs (tempo regression fitted on {report['valid_songs']} valid songs).", "",
             "| tag | signal | hop | positives | song ROC-AUC [95% CI] |",
             "|---|---|---:|---:|---|"]
    for r in report["rows"]:
        lo, hi = r["ci95"]
        lines.append(f"| {r['tag']} | {r['signal']} | {r['hop_s']:.2f} s | {r['positives']} of "
                     f"{r['songs']} | {r['roc_auc']:.3f} [{lo:.3f}, {hi:.3f}] |")
    lines += ["", "| hop | tempo regression R^2 | median abs error |", "|---|---:|---:|"]
    for hop, t in report["tempo"].items():
        lines.append(f"| {hop} | {t['tempo_regression_r2']:.3f} | "
                     f"{t['tempo_regression_median_abs_error_pct']:.1f} % |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "probe.json", out / "probe.md"]
    atomic_write(paths[0], json.dumps(report, indent=1).encode())
    atomic_write(paths[1], report_markdown(report).encode())
    return paths
