"""Simulated DJ mixes and the evaluation of track-change detection on them.

``build_mixes`` joins songs (synthetic benchmark songs or real recordings) into continuous
mixes with equal-power crossfades of random length (0 = a hard cut), and writes each mix as
FLAC plus its true boundaries (the middle of each crossfade, in the mix's own timeline).
With ``tempo_match`` it works like a DJ's pitch fader: each incoming track is played faster
or slower (speed and pitch together, as on a turntable) so that its tempo, estimated by
:func:`estimate_tempo`, matches the outgoing track's when that takes at most +-8 %; beats are
not phase-aligned. ``evaluate_segmentation`` plays every mix through the live path's own
:class:`~rtagger.live.session.StreamSession` (window tags from
:class:`~rtagger.pipeline.tagger.Tagger` at the live hop) and scores the ``segment`` events
it emits:
boundary precision / recall / F-measure within a tolerance (default +-3 s of the crossfade's
middle, or with ``within_crossfade`` +-3 s of the crossfade itself) and false boundaries per
hour of audio.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_path
from rtagger.audio.decode import N_FFT, SAMPLE_RATE, WINDOW_SAMPLES, Resampler, load_audio
from rtagger.audio.encode import write_flac
from rtagger.errors import ConfigError
from rtagger.jsonl import JsonlAppender, read_records
from rtagger.live.protocol import Start
from rtagger.live.session import StreamSession
from rtagger.model.checkpoint import TaggingModel, load_model
from rtagger.pipeline.session import SegmenterConfig
from rtagger.pipeline.tagger import Tagger
from rtagger.train.data.manifest import Track
from rtagger.train.data.windows import labelled_subset
from rtagger.train.evaluation.separation import track_separation
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)

# --- tempo estimation and matching -------------------------------------------------------
TEMPO_HOP = 128  # samples between onset-envelope frames (8 ms)
TEMPO_FPS = SAMPLE_RATE / TEMPO_HOP  # onset-envelope frames per second
TEMPO_MIN_BPM, TEMPO_MAX_BPM = 60.0, 180.0
TEMPO_PRIOR_BPM = 120.0  # centre of the log-normal tempo prior
TEMPO_PRIOR_OCTAVES = 1.0  # its standard deviation in octaves (log2 of the tempo)
MAX_SPEED_CHANGE = 0.08  # a pitch fader's range: +-8 %
HARD_CUT_SHARE = 0.2  # of transitions, when the shortest crossfade allowed is 0

assert TEMPO_FPS == 125.0


@dataclass(frozen=True)
class Transition:
    """One change of track in a mix as it was made (index lines before these have none)."""

    crossfade_s: float  # as applied: a fade longer than a track is cut to the track
    tempo_out_bpm: float | None  # outgoing track as played (its estimate x its speed)
    tempo_in_bpm: float | None  # incoming track's estimate at its recorded speed
    speed: float  # varispeed factor applied to the incoming track; 1.0 = left as recorded


@dataclass(frozen=True)
class Mix:
    path: Path
    boundaries_s: list[float]
    duration_s: float
    track_ids: list[str]
    transitions: list[Transition] = field(default_factory=list)


PARTS = ("tune", "test")


def select_tracks(tracks: list[Track], *, subset_fraction: float = 1.0, subset_seed: int = 0,
                  min_track_s: float = 0.0, part: str | None = None) -> list[Track]:
    """``labelled_subset(tracks, subset_fraction, subset_seed)`` less tracks under ``min_track_s``.

    With fraction 0.1 and seed 7 on the pool this is its held-out tenth, never trained on.
    ``part`` ("tune" or "test") keeps one half of that subset, the halves split by another
    hash of the track id: segmentation settings tuned on mixes of one half are measured on
    mixes of the other, which share no track with them.
    A track whose manifest has no duration is decoded to measure it.
    """
    from rtagger.train.data.pool import load_track_audio

    if not 0 < subset_fraction <= 1:
        raise ConfigError(f"subset fraction must be in (0, 1], got {subset_fraction}")
    if min_track_s < 0:
        raise ConfigError(f"shortest track must be >= 0 s, got {min_track_s}")
    if part is not None and part not in PARTS:
        raise ConfigError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    subset = labelled_subset(tracks, subset_fraction, subset_seed)
    if part is not None:
        tune = {tr.id for tr in labelled_subset(subset, 0.5, subset_seed + 1)}
        subset = [tr for tr in subset if (tr.id in tune) == (part == "tune")]

    def seconds(tr: Track) -> float:
        return tr.duration if tr.duration is not None else len(load_track_audio(tr)) / SAMPLE_RATE
    kept = [tr for tr in subset if min_track_s == 0 or seconds(tr) >= min_track_s]
    log.info("mixing %d of %d tracks (subset %g seed %d%s: %d; %d shorter than %g s)",
             len(kept), len(tracks), subset_fraction, subset_seed,
             "" if part is None else f", {part} half", len(subset), len(subset) - len(kept),
             min_track_s)
    return kept


def onset_envelope(audio: np.ndarray) -> np.ndarray:
    """Spectral flux of ``(n,)`` 16 kHz audio: ``(frames,)`` at :data:`TEMPO_FPS`.

    The rise of log magnitude from one frame to the next, summed over frequency bins.
    """
    if len(audio) < N_FFT:
        return np.zeros(0, np.float32)
    win = np.hanning(N_FFT).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(audio, N_FFT)[::TEMPO_HOP]
    flux, prev = [], None
    for s in range(0, len(frames), 4096):  # blocks: a whole track's spectrum at once is large
        logmag = np.log1p(1000.0 * np.abs(np.fft.rfft(frames[s : s + 4096] * win, axis=1)))
        both = logmag if prev is None else np.concatenate([prev, logmag])
        flux.append(np.maximum(np.diff(both, axis=0), 0).sum(axis=1))
        prev = logmag[-1:]
    return np.concatenate(flux).astype(np.float32)


def estimate_tempo(audio: np.ndarray) -> float | None:
    """Beats per minute of ``(n,)`` 16 kHz audio in [60, 180]; None without a pulse to find.

    The autocorrelation of the onset envelope, weighted by a log-normal prior around 120
    BPM, picks the beat period; a parabola through the peak refines it between frames.
    Octave errors (half or double the felt tempo) remain possible, as for any such method.
    """
    lo = int(60 * TEMPO_FPS / TEMPO_MAX_BPM)
    hi = int(np.ceil(60 * TEMPO_FPS / TEMPO_MIN_BPM))
    env = onset_envelope(audio)
    if env.size < 2 * hi:  # two of the slowest beats at least
        return None
    kernel = np.exp(-0.5 * (np.arange(-8, 9) / 2.0) ** 2)  # smooth peaks for the parabola
    env = np.convolve(env, kernel / kernel.sum(), mode="same")
    env -= env.mean()
    acf = np.fft.irfft(np.abs(np.fft.rfft(env, 2 * env.size)) ** 2)[: hi + 2]
    lags = np.arange(lo, hi + 1)
    bpm = 60 * TEMPO_FPS / lags
    prior = np.exp(-0.5 * (np.log2(bpm / TEMPO_PRIOR_BPM) / TEMPO_PRIOR_OCTAVES) ** 2)
    score = np.where((bpm >= TEMPO_MIN_BPM) & (bpm <= TEMPO_MAX_BPM), acf[lags] * prior, -np.inf)
    lag = int(lags[np.argmax(score)])
    if acf[lag] <= 1e-6 * acf[0] or acf[0] <= 0:  # no periodicity (silence, a steady tone)
        return None
    a, b, c = acf[lag - 1], acf[lag], acf[lag + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else 0.0
    return float(60 * TEMPO_FPS / (lag + shift))


def match_speed(out_bpm: float | None, in_bpm: float | None,
                max_change: float = MAX_SPEED_CHANGE) -> float:
    """Speed for the incoming track so its tempo (or double, or half) meets ``out_bpm``.

    1.0 when no such speed is within ``max_change``, or a tempo is unknown. The speed is
    one the varispeed resampler plays exactly: an integer source rate over 16 kHz.
    """
    if out_bpm is None or in_bpm is None:
        return 1.0
    speed = min((out_bpm / (in_bpm * m) for m in (0.5, 1.0, 2.0)), key=lambda r: abs(np.log(r)))
    if abs(speed - 1.0) > max_change:
        return 1.0
    return round(SAMPLE_RATE * speed) / SAMPLE_RATE


def varispeed(audio: np.ndarray, speed: float) -> np.ndarray:
    """``(n,)`` 16 kHz audio played ``speed`` times faster, pitch with it: ``(~n / speed,)``.

    As a turntable does: the samples are taken as recorded at ``speed`` x 16 kHz and
    resampled to 16 kHz (FFmpeg's resampler).
    """
    rate = round(SAMPLE_RATE * speed)
    if rate == SAMPLE_RATE:
        return audio
    resample = Resampler(rate, source="<varispeed>")
    return np.concatenate([resample(audio), resample.flush()])


def _excerpt(audio: np.ndarray, max_samples: int | None) -> np.ndarray:
    if max_samples is None or len(audio) <= max_samples:
        return audio
    start = (len(audio) - max_samples) // 2  # the middle: no intro or fade-out
    return audio[start : start + max_samples]


def _crossfade(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    if n <= 0:
        return np.concatenate([a, b])
    t = np.linspace(0, np.pi / 2, n, dtype=np.float32)
    mid = a[-n:] * np.cos(t) + b[:n] * np.sin(t)  # equal power
    return np.concatenate([a[:-n], mid, b[n:]])


def _bpm(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def build_mixes(tracks: list[Track], out_dir: str | Path, n_mixes: int, *,
                tracks_per_mix: int = 4, min_crossfade_s: float = 0.0,
                max_crossfade_s: float = 8.0, max_track_s: float | None = None,
                tempo_match: bool = False, seed: int = 0, progress: bool = True) -> list[Mix]:
    """Write ``n_mixes`` mixes (``mix-XXX.flac`` + ``mixes.jsonl``); existing ones are kept.

    Crossfades are drawn uniformly in [``min_crossfade_s``, ``max_crossfade_s``] seconds;
    when the minimum is 0, a fifth of them are hard cuts instead. Each track contributes its
    middle ``max_track_s`` seconds (all of it by default). ``tempo_match``: see
    :func:`match_speed` and :func:`varispeed`; the boundaries are measured after the speed
    change. Resumable: a mix's index line is appended only after its audio file is complete
    (a resumed run keeps the mixes already there whatever settings made them).
    """
    from rtagger.train.data.pool import load_track_audio

    if not 0 <= min_crossfade_s <= max_crossfade_s:
        raise ConfigError(f"crossfades must satisfy 0 <= min <= max, got min "
                          f"{min_crossfade_s} s, max {max_crossfade_s} s")
    if max_track_s is not None and max_track_s <= 0:
        raise ConfigError(f"longest excerpt must be > 0 s, got {max_track_s}")
    if len(tracks) < 2:
        raise ConfigError(f"a mix needs at least 2 tracks, got {len(tracks)}")
    max_samples = None if max_track_s is None else int(max_track_s * SAMPLE_RATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {m.path.name: m for m in read_mixes(out)}
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(n_mixes):  # draw every plan first: the same mixes whatever was done
        picks = rng.choice(len(tracks), size=min(tracks_per_mix, len(tracks)), replace=False)
        fades = rng.uniform(min_crossfade_s, max_crossfade_s, len(picks) - 1)
        if min_crossfade_s == 0:  # the draws of mixes made before a minimum existed
            fades[rng.random(len(fades)) < HARD_CUT_SHARE] = 0.0
        plans.append((f"mix-{i:03d}.flac", [tracks[j] for j in picks], fades))
    bar = Bar("building mixes", n_mixes, enabled=progress)
    mixes = []
    with JsonlAppender(out / "mixes.jsonl") as index:
        for name, picked, fades in plans:
            if name in done:
                mixes.append(done[name])
                bar.advance()
                continue
            audio = _excerpt(load_track_audio(picked[0]), max_samples)
            played_bpm = estimate_tempo(audio)
            bounds, transitions = [], []
            for tr, fade_s in zip(picked[1:], fades, strict=True):
                nxt = _excerpt(load_track_audio(tr), max_samples)
                in_bpm = estimate_tempo(nxt)
                speed = match_speed(played_bpm, in_bpm) if tempo_match else 1.0
                nxt = varispeed(nxt, speed)
                n = min(int(fade_s * SAMPLE_RATE), len(audio), len(nxt))
                bounds.append((len(audio) - n / 2) / SAMPLE_RATE)
                transitions.append(Transition(round(n / SAMPLE_RATE, 3), _bpm(played_bpm),
                                              _bpm(in_bpm), speed))
                audio = _crossfade(audio, nxt, n)
                played_bpm = None if in_bpm is None else in_bpm * speed
            with atomic_path(out / name) as tmp:  # a mix file exists only when complete
                write_flac(tmp, audio)
            mix = Mix(out / name, [round(b, 3) for b in bounds], len(audio) / SAMPLE_RATE,
                      [t.id for t in picked], transitions)
            index.write({"path": name, "boundaries_s": mix.boundaries_s,
                         "duration_s": mix.duration_s, "track_ids": mix.track_ids,
                         "transitions": [asdict(t) for t in transitions]})
            mixes.append(mix)
            bar.advance()
    bar.close()
    return mixes


def boundary_scores(true_s: list[float], found_s: list[float], duration_s: float,
                    tolerance_s: float = 3.0, widths_s: list[float] | None = None) -> dict:
    """Greedy one-to-one matching within the tolerance -> hits, misses, false alarms.

    ``widths_s``: per true boundary, extra tolerance on each side (half its crossfade: a
    change found anywhere in the crossfade, or within ``tolerance_s`` of it, is a hit).
    ``offsets``: for every found boundary, found minus the nearest true one (seconds), to
    see whether detections are early or late.
    """
    offsets = [f - min(true_s, key=lambda t: abs(t - f)) for f in found_s] if true_s else []
    reach = dict(zip(true_s, widths_s or [0.0] * len(true_s), strict=True))
    unmatched = sorted(true_s)
    hits = 0
    for f in sorted(found_s):
        near = [t for t in unmatched if abs(t - f) <= tolerance_s + reach[t]]
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
                       tolerance_s: float = 3.0, cfg: SegmenterConfig | None = None,
                       within_crossfade: bool = False, dims: int | None = None) -> dict:
    """Play tagged mixes through the live session's segmenter and score its boundaries;
    ``within_crossfade``: the tolerance reaches past each side of the crossfade, not its
    middle (mixes that record their transitions); ``dims``: the embedding values the
    segmenter compares (see :class:`~rtagger.pipeline.session.Segmenter`)."""
    cfg = cfg or SegmenterConfig()
    totals = {"true": 0, "found": 0, "hits": 0, "false": 0, "duration_s": 0.0}
    offsets: list[float] = []
    for mix, windows in tagged:
        session = StreamSession("eval", Start(hop_s=hop_s, segment=True), tags, None,
                                segmenter=cfg, segment_dims=dims)
        found = []
        for w in windows:
            for event in session.add_window(_as_window(w), w.probs, w.embedding):
                found.append(event["start_s"])
        widths = ([t.crossfade_s / 2 for t in mix.transitions]
                  if within_crossfade and mix.transitions else None)
        s = boundary_scores(mix.boundaries_s, found, mix.duration_s, tolerance_s, widths)
        for k in totals:
            totals[k] += s[k]
        offsets += s["offsets"]
    near = np.array([o for o in offsets if abs(o) <= 15.0])  # detections of a real change
    p = totals["hits"] / totals["found"] if totals["found"] else 0.0
    r = totals["hits"] / totals["true"] if totals["true"] else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    hours = totals["duration_s"] / 3600
    return {"mixes": len(tagged), "tolerance_s": tolerance_s,
            "within_crossfade": within_crossfade, "hop_s": hop_s,
            "threshold": cfg.threshold, "confirm": cfg.confirm, "dims": dims,
            "min_segment_s": cfg.min_segment_s, "precision": round(p, 4),
            "recall": round(r, 4), "f_measure": round(f, 4),
            "false_per_hour": round(totals["false"] / hours, 2) if hours else None,
            "offset_s": ({q: round(float(np.percentile(near, v)), 2)
                          for q, v in (("p10", 10), ("median", 50), ("p90", 90))}
                         if near.size else None), **totals}


def segment_dims(model: TaggingModel, whole_embedding: bool = False) -> int | None:
    """The embedding values the live segmenter compares: the tagger's CLS embedding."""
    return None if whole_embedding else model.tagger.cfg.d_model


def evaluate_segmentation(model_path: str | Path, mixes: list[Mix], *, hop_s: float = 1.0,
                          tolerance_s: float = 3.0, cfg: SegmenterConfig | None = None,
                          within_crossfade: bool = False, whole_embedding: bool = False,
                          progress: bool = True) -> dict:
    """Boundary precision / recall / F-measure and false boundaries per hour on ``mixes``;
    ``whole_embedding`` compares the chroma and tempo profiles too, unlike the live
    segmenter."""
    model = load_model(model_path)
    dims = segment_dims(model, whole_embedding)
    tagged = tag_mixes(model, mixes, hop_s=hop_s, progress=progress)
    return {"model": str(model_path), **score_segmentation(
        tagged, model.tags, hop_s=hop_s, tolerance_s=tolerance_s, cfg=cfg,
        within_crossfade=within_crossfade, dims=dims),
        "separation": track_separation(tagged, dims)}


def sweep_segmentation(model_path: str | Path, mixes: list[Mix], thresholds: list[float],
                       confirms: list[int], *, hop_s: float = 1.0, tolerance_s: float = 3.0,
                       base: SegmenterConfig | None = None, within_crossfade: bool = False,
                       whole_embedding: bool = False, progress: bool = True) -> dict:
    """Every (threshold, confirm) pair on the same tagged mixes; the best by F-measure.

    Tune on mixes of the validation split, then report the chosen setting on the test
    split's mixes with :func:`evaluate_segmentation`.
    """
    from dataclasses import replace

    base = base or SegmenterConfig()
    model = load_model(model_path)
    dims = segment_dims(model, whole_embedding)
    tagged = tag_mixes(model, mixes, hop_s=hop_s, progress=progress)
    rows = [score_segmentation(tagged, model.tags, hop_s=hop_s, tolerance_s=tolerance_s,
                               cfg=replace(base, threshold=t, confirm=c),
                               within_crossfade=within_crossfade, dims=dims)
            for t in thresholds for c in confirms]
    best = max(rows, key=lambda r: (r["f_measure"], -r["false"]))
    return {"model": str(model_path), "best": best, "grid": rows,
            "separation": track_separation(tagged, dims)}


def _as_window(w):
    from rtagger.audio.ringbuffer import Window

    start = round(w.start_s * SAMPLE_RATE)
    valid = round((w.end_s - w.start_s) * SAMPLE_RATE)
    return Window(w.index, start, np.zeros(0, np.float32), min(valid, WINDOW_SAMPLES),
                  w.partial)


def read_mixes(out_dir: str | Path) -> list[Mix]:
    out = Path(out_dir)
    index = out / "mixes.jsonl"
    return [Mix(out / d["path"], d["boundaries_s"], d["duration_s"], d["track_ids"],
                [Transition(**t) for t in d.get("transitions", [])])
            for _, d in read_records(index) if (out / d["path"]).is_file()]
