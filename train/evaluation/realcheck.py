"""Score rtagger models against musicnn's teachers on the real checks, tracks resampled.

``rtagger train realcheck --checks data/realchecks/manifest.jsonl --model M --musicnn T``
decodes every check track once (:func:`rtagger.audio.decode.load_audio`) and tags it whole
with each system:

- an rtagger model: the track-level probabilities of :class:`rtagger.pipeline.tagger.Tagger`
  (what ``rtagger tag`` reports: windows of 3.69 s, the model's aggregator when it has one);
- a musicnn teacher: the mean over the track's 3 s patches of its probabilities
  (:meth:`~rtagger.train.teachers.musicnn.Teacher.taggram`); a check tag is read from the
  teacher's own tag names that ``rtagger/data/tags_v2.csv`` maps onto it (the maximum of
  the track means where a tag has synonyms, e.g. MTT's choir and choral).

A system is scored on the check tags it knows that have at least ``min_per_class``
positive and negative tracks; a track whose label for a tag is unknown (the check leaves
it unlabelled) does not count for that tag. Per tag: ROC-AUC and PR-AUC (scikit-learn,
through :func:`rtagger.train.evaluation.evaluate.macro_auc`); macro: their mean over the
tags. The 95 % intervals are percentile bootstraps over tracks: the same resamples for
every system, so the difference of two systems (model minus teacher, on the tags both
know) gets a paired interval and the share of resamples in which the model is ahead.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_write
from rtagger.errors import ConfigError
from rtagger.jsonl import JsonlAppender, read_records
from rtagger.model.vocab import sources_v2, tags_v2
from rtagger.train.data.manifest import read_manifest
from rtagger.train.evaluation.evaluate import METRIC_NAMES, METRICS, macro_auc, weighted_scores
from rtagger.train.progress import Bar

log = logging.getLogger(__name__)

MIN_PER_CLASS = 5  # positives and negatives a tag needs before its AUC means something
ALPHA = 0.05


@dataclass
class Checks:
    """The labels of a check manifest: ``y`` and ``known`` are ``(n_tracks, n_tags)``."""

    ids: list[str]
    paths: list[str]
    seconds: list[float]
    tags: list[str]  # vocabulary v2 order
    y: np.ndarray  # 1.0 positive, 0.0 negative (and 0.0 where unknown)
    known: np.ndarray  # bool

    def counts(self, j: int) -> tuple[int, int]:
        pos = int(self.y[self.known[:, j], j].sum())
        return pos, int(self.known[:, j].sum()) - pos


def load_checks(manifest: str | Path) -> Checks:
    """Tracks and their ``labels`` (tag -> 1/0) from a ``rtagger data realchecks`` manifest."""
    tracks = read_manifest(manifest)
    if not tracks:
        raise ConfigError(f"{manifest}: no tracks")
    missing = [t.id for t in tracks if not isinstance(t.extra.get("labels"), dict)]
    if missing:
        raise ConfigError(f"{manifest}: {len(missing)} track(s) without a 'labels' object, "
                          f"e.g. {missing[0]}; is this a real-check manifest?")
    seen = {tag for t in tracks for tag in t.extra["labels"]}
    order = tags_v2()
    unknown = sorted(seen - set(order))
    if unknown:
        raise ConfigError(f"{manifest}: labels outside vocabulary v2: {unknown}")
    tags = [t for t in order if t in seen]
    y = np.zeros((len(tracks), len(tags)))
    known = np.zeros((len(tracks), len(tags)), bool)
    for i, t in enumerate(tracks):
        for j, tag in enumerate(tags):
            if tag in t.extra["labels"]:
                y[i, j], known[i, j] = float(t.extra["labels"][tag]), True
    return Checks([t.id for t in tracks], [t.path for t in tracks],
                  [t.duration or 0.0 for t in tracks], tags, y, known)


# --- The systems ----------------------------------------------------------------------------
@dataclass
class System:
    """One tagger's track scores on the check tags: ``(n_tracks, n_tags)``, NaN where it
    does not know the tag."""

    name: str
    kind: str  # "rtagger" or "musicnn"
    source: str
    scores: np.ndarray

    def knows(self, j: int) -> bool:
        return bool(np.isfinite(self.scores[:, j]).all())


def teacher_columns(teacher_name: str, teacher_tags: tuple[str, ...],
                    tags: list[str]) -> dict[str, list[int]]:
    """Check tag -> the teacher's output indices that ``tags_v2.csv`` maps onto it.

    A teacher named ``MTT_...`` reads the ``MTT:`` sources, ``MSD_...`` the ``MSD:`` ones.
    """
    family = teacher_name.split("_", 1)[0]
    sources = sources_v2()
    out = {}
    for tag in tags:
        names = [s.split(":", 1)[1] for s in sources.get(tag, ()) if s.startswith(family + ":")]
        idx = [teacher_tags.index(n) for n in names if n in teacher_tags]
        if idx:
            out[tag] = idx
    return out


class _Runner:
    """Track -> that system's scores on the check tags (NaN for tags it does not know).

    With a cache folder, the system's whole probability vector per track is appended to
    ``<cache>/<kind>-<name>-<key>.jsonl`` (``key``: its weights and settings) and reused while
    the track's audio file keeps its size and modification time.
    """

    def __init__(self, name: str, kind: str, source: str, fn, columns: dict[str, list[int]],
                 tags: list[str], key: str, cache_dir: Path | None) -> None:
        self.name, self.kind, self.source, self.fn = name, kind, source, fn
        self.plan = [columns.get(t) for t in tags]
        self.rows: list[np.ndarray] = []
        self.cached: dict[str, tuple[list, np.ndarray]] = {}
        self.log = None
        if cache_dir is not None:
            path = Path(cache_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_",
                                            f"{kind}-{name}-{key}.jsonl")
            for _, r in read_records(path):
                self.cached[r["id"]] = (r["audio"], np.asarray(r["probs"], np.float64))
            self.log = JsonlAppender(path)

    def needs(self, track_id: str, stamp: list) -> bool:
        hit = self.cached.get(track_id)
        return hit is None or hit[0] != stamp

    def add(self, track_id: str, stamp: list, wave: np.ndarray | None) -> None:
        if not self.needs(track_id, stamp):
            probs = self.cached[track_id][1]
        else:
            probs = np.asarray(self.fn(wave, track_id), np.float64)
            if self.log is not None:
                self.log.write({"id": track_id, "audio": stamp,
                                "probs": [float(v) for v in probs]})
        self.rows.append(np.array([np.nan if idx is None else float(np.max(probs[idx]))
                                   for idx in self.plan]))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _model_runner(spec: str, tags: list[str], device: str, cache: Path | None) -> _Runner:
    from rtagger.model.checkpoint import bundled_model_path
    from rtagger.pipeline.tagger import Tagger

    if spec == "default" and bundled_model_path() is None:
        raise ConfigError("no trained default model is bundled; pass --model PATH")
    tagger = Tagger(spec, device=device)
    index = {t: [i] for i, t in enumerate(tagger.tags) if t in tags}
    key = (f"{tagger.model.weights_sha256[:16]}-{tagger.engine.name}-{device}-"
           f"{tagger.aggregation}")
    return _Runner(tagger.model.name, "rtagger", str(spec),
                   lambda wave, tid: tagger.tag_array(wave, source=tid).track_probs, index, tags,
                   key, cache)


def _teacher_runner(path: str | Path, tags: list[str], device: str,
                    cache: Path | None) -> _Runner:
    import torch

    from rtagger.train.teachers.musicnn import PATCH_FRAMES, load_teacher, read_description

    teacher = load_teacher(path, device=device)
    min_samples = (PATCH_FRAMES - 1) * 256 + 1

    def run(wave: np.ndarray, track_id: str) -> np.ndarray:
        if len(wave) < min_samples:
            raise ConfigError(f"{track_id}: shorter than one 3 s musicnn patch")
        return teacher.taggram(torch.from_numpy(wave)).mean(dim=0).cpu().numpy()

    key = f"{read_description(path)['weights_sha256'][:16]}-{device}"
    return _Runner(teacher.name, "musicnn", str(path), run,
                   teacher_columns(teacher.name, teacher.tags, tags), tags, key, cache)


def tag_checks(checks: Checks, models: list[str], teachers: list[str | Path],
               device: str = "cpu", cache_dir: str | Path | None = None,
               progress: bool = True) -> list[System]:
    """Every system's track scores; each track is decoded once for all systems that need it
    (none when every system has it in ``cache_dir``)."""
    from rtagger.audio.decode import load_audio

    cache = None if cache_dir is None else Path(cache_dir)
    runners = ([_model_runner(m, checks.tags, device, cache) for m in models]
               + [_teacher_runner(t, checks.tags, device, cache) for t in teachers])
    if not runners:
        raise ConfigError("nothing to score: give --model and/or --musicnn")
    names = [r.name for r in runners]
    for r in runners:  # two checkpoints of one name: tell them apart by their file
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({Path(r.source).stem})"
    if len({r.name for r in runners}) != len(runners):
        raise ConfigError(f"systems with the same name: {names}")
    try:
        bar = Bar("tagging checks", len(checks.ids), enabled=progress)
        for track_id, path in zip(checks.ids, checks.paths, strict=True):
            st = Path(path).stat() if Path(path).exists() else None
            stamp = [st.st_size, st.st_mtime_ns] if st else [0, 0]
            wave = (load_audio(path) if any(r.needs(track_id, stamp) for r in runners)
                    else None)
            for r in runners:
                r.add(track_id, stamp, wave)
            bar.advance()
        bar.close()
    finally:
        for r in runners:
            r.close()
    return [System(r.name, r.kind, r.source, np.stack(r.rows)) for r in runners]


# --- Scores and intervals -------------------------------------------------------------------
def resample_weights(n_items: int, n: int, seed: int) -> np.ndarray:
    """``(n, n_items)`` bootstrap counts: how often each track is drawn in each resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_items, size=(n, n_items))
    return np.stack([np.bincount(d, minlength=n_items) for d in draws]).astype(np.float64)


def resampled_auc(y: np.ndarray, s: np.ndarray, known: np.ndarray,
                  weights: np.ndarray) -> dict[str, np.ndarray]:
    """One tag's ROC-AUC and PR-AUC in every resample: metric -> ``(n_resamples,)``, NaN
    where a resample draws no positive or no negative labelled track."""
    return weighted_scores(y[known], s[known], weights[:, known])


def _ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    return [float(v) for v in np.quantile(values, [ALPHA / 2, 1 - ALPHA / 2])]


def _macro(per_tag: dict[str, np.ndarray], tags: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no tag scores
        return np.nanmean(np.stack([per_tag[t] for t in tags], axis=1), axis=1)


def score_systems(checks: Checks, systems: list[System], *, bootstrap: int = 1000,
                  seed: int = 0, min_per_class: int = MIN_PER_CLASS) -> dict:
    """The JSON-ready report: per system per tag and macro, and model-minus-teacher pairs."""
    scorable, skipped = [], {}
    for j, tag in enumerate(checks.tags):
        pos, neg = checks.counts(j)
        if min(pos, neg) < min_per_class:
            skipped[tag] = f"{pos} positive / {neg} negative tracks (< {min_per_class})"
        else:
            scorable.append(tag)
    col = {t: j for j, t in enumerate(checks.tags)}
    weights = resample_weights(len(checks.ids), bootstrap, seed)
    out_systems, draws = {}, {}
    for sysm in systems:
        known_tags = [t for t in scorable if sysm.knows(col[t])]
        per_tag, draws[sysm.name] = {}, {m: {} for m in METRICS}
        for tag in known_tags:
            j = col[tag]
            mask = checks.known[:, j]
            point = macro_auc(checks.y[mask, j][:, None], sysm.scores[mask, j][:, None])
            res = resampled_auc(checks.y[:, j], sysm.scores[:, j], mask, weights)
            pos, neg = checks.counts(j)
            per_tag[tag] = {"positives": pos, "negatives": neg}
            for m in METRICS:
                draws[sysm.name][m][tag] = res[m]
                per_tag[tag][m], per_tag[tag][f"{m}_95"] = point[m], _ci(res[m])
        out_systems[sysm.name] = {"kind": sysm.kind, "source": sysm.source, "tags": known_tags,
                                  "per_tag": per_tag,
                                  "macro": _macro_entry(per_tag, draws[sysm.name], known_tags)}
    common = [t for t in scorable if all(s.knows(col[t]) for s in systems)]
    report = {
        "checks": {"tracks": len(checks.ids), "hours": sum(checks.seconds) / 3600,
                   "labels": {t: dict(zip(("positives", "negatives"), checks.counts(j),
                                          strict=True)) for j, t in enumerate(checks.tags)}},
        "bootstrap": {"resamples": bootstrap, "seed": seed, "unit": "track",
                      "interval": f"{100 * (1 - ALPHA):.0f}% percentile"},
        "min_per_class": min_per_class, "scorable_tags": scorable, "skipped_tags": skipped,
        "systems": out_systems, "common_tags": common,
        "common": {s.name: _macro_entry(out_systems[s.name]["per_tag"], draws[s.name], common)
                   for s in systems},
        "comparisons": [],
        "scores": {"ids": checks.ids, "tags": checks.tags,
                   **{s.name: [[round(float(v), 6) if np.isfinite(v) else None for v in row]
                               for row in s.scores] for s in systems}},
    }
    for model in (s for s in systems if s.kind == "rtagger"):
        for teacher in (s for s in systems if s.kind == "musicnn"):
            report["comparisons"].append(_pair(model.name, teacher.name, out_systems, draws))
    return report


def _macro_entry(per_tag: dict, draws: dict[str, dict[str, np.ndarray]],
                 tags: list[str]) -> dict:
    entry: dict = {"tags": tags}
    for m in METRICS:
        entry[m] = float(np.mean([per_tag[t][m] for t in tags])) if tags else None
        entry[f"{m}_95"] = _ci(_macro(draws[m], tags)) if tags else None
    return entry


def _pair(model: str, teacher: str, systems: dict, draws: dict) -> dict:
    """Model minus teacher on the tags both are scored on, paired over the same resamples."""
    tags = [t for t in systems[model]["tags"] if t in systems[teacher]["tags"]]
    pair: dict = {"model": model, "teacher": teacher, "tags": tags, "per_tag": {}}
    if not tags:
        return pair
    for m in METRICS:
        a, b = (float(np.mean([systems[n]["per_tag"][t][m] for t in tags]))
                for n in (model, teacher))
        diff = _macro(draws[model][m], tags) - _macro(draws[teacher][m], tags)
        finite = diff[np.isfinite(diff)]
        pair[m] = {"model": a, "teacher": b, "delta": a - b, "delta_95": _ci(diff),
                   "model_ahead": float((finite > 0).mean()) if finite.size else None}
        for t in tags:
            d = draws[model][m][t] - draws[teacher][m][t]
            cell = pair["per_tag"].setdefault(t, {})
            cell[f"{m}_delta"] = (systems[model]["per_tag"][t][m]
                                  - systems[teacher]["per_tag"][t][m])
            cell[f"{m}_delta_95"] = _ci(d)
    return pair


# --- Report ---------------------------------------------------------------------------------
def _f(v: float | None, ci: list[float] | None = None, sign: bool = False) -> str:
    if v is None:
        return "-"
    fmt = "+.3f" if sign else ".3f"
    return f"{v:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def report_markdown(report: dict, title: str = "Real checks") -> str:
    """Macro table per system, model-minus-teacher table, and per-tag ROC-AUC."""
    c = report["checks"]
    lines = [f"# {title}", "",
             f"{c['tracks']} tracks, {c['hours']:.2f} h; {report['bootstrap']['resamples']} "
             f"bootstrap resamples of tracks, 95% percentile intervals. Tags need "
             f"{report['min_per_class']} positive and negative tracks; skipped: "
             + (", ".join(f"{t} ({why})" for t, why in report["skipped_tags"].items())
                or "none") + ".", "",
             f"Tags every system is scored on: {', '.join(report['common_tags']) or 'none'}.",
             "", "| system | tags | macro ROC-AUC [95% CI] | macro PR-AUC [95% CI] | "
             "common-tag ROC-AUC | common-tag PR-AUC |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["systems"].items():
        mac, com = s["macro"], report["common"][name]
        lines.append(f"| {name} | {len(s['tags'])} | {_f(mac['roc_auc'], mac['roc_auc_95'])} | "
                     f"{_f(mac['pr_auc'], mac['pr_auc_95'])} | "
                     f"{_f(com['roc_auc'], com['roc_auc_95'])} | "
                     f"{_f(com['pr_auc'], com['pr_auc_95'])} |")
    if report["comparisons"]:
        lines += ["", "## Model minus teacher (paired, same resamples)", "",
                  "| model | teacher | tags | " + " | ".join(
                      f"{METRIC_NAMES[m]} model / teacher | delta [95% CI] | P(model ahead)"
                      for m in METRICS) + " |", "|---|---|---|" + "---:|" * 3 * len(METRICS)]
        for p in report["comparisons"]:
            cells = []
            for m in METRICS:
                d = p.get(m)
                cells += (["-"] * 3 if d is None else [
                    f"{d['model']:.3f} / {d['teacher']:.3f}", _f(d["delta"], d["delta_95"],
                                                                 sign=True),
                    _f(d["model_ahead"])])
            lines.append(f"| {p['model']} | {p['teacher']} | {', '.join(p['tags']) or '-'} | "
                         + " | ".join(cells) + " |")
    names = list(report["systems"])
    lines += ["", "## ROC-AUC per tag [95% CI]", "",
              "| tag | pos / neg | " + " | ".join(names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for tag in report["scorable_tags"]:
        lab = c["labels"][tag]
        cells = [report["systems"][n]["per_tag"].get(tag) for n in names]
        lines.append(f"| {tag} | {lab['positives']} / {lab['negatives']} | " + " | ".join(
            "-" if e is None else _f(e["roc_auc"], e["roc_auc_95"]) for e in cells) + " |")
    return "\n".join(lines) + "\n"


def run_realcheck(checks_manifest: str | Path, models: list[str], teachers: list[str | Path],
                  out: str | Path, *, markdown: str | Path | None = None, device: str = "cpu",
                  cache_dir: str | Path | None = None,
                  bootstrap: int = 1000, seed: int = 0, min_per_class: int = MIN_PER_CLASS,
                  progress: bool = True) -> dict:
    """Tag, score and write ``out`` (JSON) and ``markdown`` (if given); returns the report.

    ``cache_dir``: where each system's track scores are kept between runs (None: nowhere).
    """
    checks = load_checks(checks_manifest)
    systems = tag_checks(checks, models, teachers, device=device, cache_dir=cache_dir,
                         progress=progress)
    report = score_systems(checks, systems, bootstrap=bootstrap, seed=seed,
                           min_per_class=min_per_class)
    report["checks"]["manifest"] = str(checks_manifest)
    atomic_write(out, json.dumps(report, indent=1, allow_nan=False) + "\n")
    if markdown is not None:
        atomic_write(markdown, report_markdown(report))
    return report
