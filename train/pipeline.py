"""Pipelines: the whole semi-supervised recipe as a list of resumable steps in one TOML file.

``rtagger train pipeline train/recipes/pipeline.toml`` runs, in order: building the
synthetic benchmark and the unlabelled pool, the feature cache, the teacher, pseudo-labels,
the noisy students, the aggregator and the evaluations. Every step resumes on its own (data
builds skip finished songs, training continues from ``last.pt``, pseudo-labelling skips
finished shards, a finished evaluation is not redone), so the pipeline can be killed at any
moment and started again; ``--only NAME[,NAME...]`` runs just those steps, in the file's order.

Step kinds (``[[steps]]`` tables, each with a ``name`` and ``run``):

- ``synth``: ``split``, ``songs``, ``out``, optional ``seed``, ``min_seconds``, ``max_seconds``
- ``pool``: ``out`` and optional ``sources``
- ``cache``: ``manifests``, ``out``, optional ``jobs``
- ``train``: ``recipe``, ``out``, optional ``set`` (overrides)
- ``pseudo``: ``manifests``, ``out``, a ``teacher`` checkpoint and/or ``musicnn`` (converted
  musicnn teacher files, ``bundled:MTT_vgg`` for the one the package carries: labels are
  then the multi-source ensemble's, vocabulary v2), optional ``cache``, ``hop_s``, and
  ``exclude_labelled = {manifest, fraction, seed}`` to leave the labelled songs out
- ``evaluate``: ``model``, ``manifest``, ``out``, optional ``cache``, ``hop_s``

A top-level ``set = [...]`` applies recipe overrides to every train step (the debug pipeline
shrinks the real recipes this way). Relative paths resolve against ``--root`` (default: the
working directory), except recipe files, which resolve against the pipeline file's folder.

Keys are checked when the file is read: an unknown key (a typo would otherwise become a
default) or a missing required one is a :class:`ConfigError` naming the step and the keys
that step kind accepts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rtagger.audio.decode import WINDOW_S
from rtagger.errors import ConfigError

log = logging.getLogger(__name__)

# Per step kind: (required keys, optional keys), besides ``name`` and ``run``.
STEP_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "synth": (frozenset({"split", "songs", "out"}),
              frozenset({"seed", "jobs", "min_seconds", "max_seconds"})),
    "pool": (frozenset({"out"}), frozenset({"sources"})),
    "cache": (frozenset({"manifests", "out"}), frozenset({"jobs"})),
    "train": (frozenset({"recipe", "out"}), frozenset({"set"})),
    "pseudo": (frozenset({"manifests", "out"}),
               frozenset({"teacher", "musicnn", "cache", "hop_s", "exclude_labelled",
                          "only_subset"})),
    "evaluate": (frozenset({"model", "manifest", "out"}), frozenset({"cache", "hop_s"})),
    "fidelity": (frozenset({"model", "pseudo", "out"}), frozenset({"cache"})),
}
STEP_KINDS = tuple(STEP_KEYS)
TOP_KEYS = frozenset({"steps", "set"})
EXCLUDE_KEYS = (frozenset({"manifest", "fraction"}), frozenset({"seed"}))


def _check_keys(table: dict, keys: tuple[frozenset[str], frozenset[str]], where: str) -> None:
    """ConfigError naming unknown or missing keys and the allowed ones."""
    required, optional = keys
    allowed = sorted(required | optional)
    unknown = sorted(set(table) - required - optional)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {allowed}")
    missing = sorted(required - set(table))
    if missing:
        raise ConfigError(f"{where}: missing required keys {missing}; allowed: {allowed}")


def load_pipeline(path: str | Path) -> list[dict]:
    """The steps of a pipeline file, checked: kinds, unique names, keys of every step."""
    from rtagger.train.fit.recipe import load_recipe, read_toml

    path = Path(path)
    raw = read_toml(path, "pipeline")
    _check_keys(raw, (frozenset(), TOP_KEYS), f"pipeline {path}")
    steps = raw.get("steps", [])
    common = list(raw.get("set", []))  # overrides for every train step (e.g. debug sizes)
    names = set()
    for i, step in enumerate(steps):
        kind, name = step.get("run"), step.get("name")
        if kind not in STEP_KINDS:
            raise ConfigError(f"{path} step {i}: run must be one of {STEP_KINDS}, got {kind!r}")
        if not name or name in names:
            raise ConfigError(f"{path} step {i}: every step needs a unique name")
        names.add(name)
        required, optional = STEP_KEYS[kind]
        where = f"pipeline {path} step {name!r} (run = {kind!r})"
        _check_keys(step, (required | {"name", "run"}, optional), where)
        for key in ("exclude_labelled", "only_subset"):
            if kind == "pseudo" and key in step:
                ex = step[key]
                if not isinstance(ex, dict):
                    raise ConfigError(f"{where}: {key} must be a table "
                                      f"{{manifest, fraction, seed}}")
                _check_keys(ex, EXCLUDE_KEYS, f"{where} {key}")
        if kind == "train":
            step["recipe"] = str((path.parent / step["recipe"]).resolve())
            step["set"] = common + list(step.get("set", []))
            # Read now, so a typo in a recipe or an override fails before hours of earlier steps.
            load_recipe(step["recipe"], step["set"])
    return steps


def run_pipeline(path: str | Path, root: str | Path = ".", only: str | None = None,
                 progress: bool = True) -> None:
    steps = load_pipeline(path)
    chosen = None if only is None else [n.strip() for n in only.split(",") if n.strip()]
    if chosen is not None:
        unknown = [n for n in chosen if n not in {s["name"] for s in steps}]
        if unknown or not chosen:
            raise ConfigError(f"no step named {', '.join(map(repr, unknown or [only]))} in {path}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(root)  # every relative data/run path of the steps and recipes lands in root
    try:
        for step in steps:
            if chosen is not None and step["name"] not in chosen:
                continue
            log.info("pipeline step %s (%s)", step["name"], step["run"])
            _STEPS[step["run"]](step, progress)
    finally:
        os.chdir(here)


def _synth(step: dict, progress: bool) -> None:
    from rtagger.train.synth.build import run_build

    run_build(step["out"], step["split"], step["songs"], seed=step.get("seed", 0),
                jobs=step.get("jobs"), min_s=step.get("min_seconds", 40.0),
                max_s=step.get("max_seconds", 120.0), progress=progress)


def _pool(step: dict, progress: bool) -> None:
    from rtagger.train.data.pool import build_pool

    build_pool(step["out"], step.get("sources"), progress=progress)


def _cache(step: dict, progress: bool) -> None:
    from rtagger.train.data.cache import build_cache
    from rtagger.train.data.manifest import read_manifest

    tracks = [t for m in step["manifests"] for t in read_manifest(m)]
    build_cache(tracks, step["out"], jobs=step.get("jobs", 1), progress=progress)


def _train(step: dict, progress: bool) -> None:
    from rtagger.train.fit.loop import train
    from rtagger.train.fit.recipe import load_recipe
    from rtagger.train.fit.tasks import make_task

    recipe = load_recipe(step["recipe"], step.get("set", []))
    out = Path(step["out"])
    # A finished run returns at once: train() resumes from last.pt, which says so.
    train(make_task(recipe, out), recipe, out, progress=progress)


def _pseudo(step: dict, progress: bool) -> None:
    from rtagger.train.data.manifest import read_manifest
    from rtagger.train.data.windows import labelled_subset
    from rtagger.train.fit.pseudo import pseudo_label

    tracks = [t for m in step["manifests"] for t in read_manifest(m)]

    def subset(table: dict) -> set[str]:
        return {t.id for t in labelled_subset(read_manifest(table["manifest"]),
                                              table["fraction"], table.get("seed", 0))}
    # exclude_labelled: leave a subset out (the labelled songs, a held-out tenth);
    # only_subset: label just that subset (the held-out tenth, for the fidelity check).
    if "exclude_labelled" in step:
        skip = subset(step["exclude_labelled"])
        tracks = [t for t in tracks if t.id not in skip]
    if "only_subset" in step:
        keep = subset(step["only_subset"])
        tracks = [t for t in tracks if t.id in keep]
    pseudo_label(step.get("teacher"), tracks, step.get("cache", "data/cache"), step["out"],
                 hop_s=step.get("hop_s", WINDOW_S), progress=progress,
                 musicnn=tuple(_teacher_file(m) for m in step.get("musicnn", ())))


def _teacher_file(ref: str) -> str:
    """A musicnn teacher file; ``bundled:NAME`` is one the package carries (MTT_vgg)."""
    if not ref.startswith("bundled:"):
        return ref
    from importlib import resources

    name = ref.removeprefix("bundled:")
    path = resources.files("rtagger.train.teachers").joinpath(f"{name}.safetensors")
    if not path.is_file():
        raise ConfigError(f"{ref}: the package carries no teacher {name!r} (only MTT_vgg); "
                          f"convert the others with `rtagger data teachers`")
    return str(path)


def _evaluate(step: dict, progress: bool) -> None:
    from rtagger.train.data.manifest import read_manifest
    from rtagger.train.evaluation.scoring import score_and_report

    out = Path(step["out"])
    if _finished(out, step["model"]):
        return
    score_and_report(step["model"], read_manifest(step["manifest"]),
                     step.get("cache", "data/cache"), out, hop_s=step.get("hop_s", WINDOW_S),
                     progress=progress)
    _mark_finished(out, step["model"])


def _fidelity(step: dict, progress: bool) -> None:
    from rtagger.train.evaluation.fidelity import fidelity

    out = Path(step["out"])
    if _finished(out, step["model"]):
        return
    pseudo = step["pseudo"] if isinstance(step["pseudo"], list) else [step["pseudo"]]
    fidelity(step["model"], pseudo, step.get("cache", "data/cache"), out, progress=progress)
    _mark_finished(out, step["model"])


# A report step writes done.json last: its presence, for the same weights, means the report
# in that folder is complete and the step is skipped.
def _finished(out: Path, model: str) -> bool:
    from rtagger.model.checkpoint import load_model

    done = out / "done.json"
    return (done.exists() and json.loads(done.read_text()).get("weights_sha256")
            == load_model(model).weights_sha256)


def _mark_finished(out: Path, model: str) -> None:
    from rtagger.atomic import atomic_write
    from rtagger.model.checkpoint import load_model

    atomic_write(out / "done.json", json.dumps(
        {"model": model, "weights_sha256": load_model(model).weights_sha256}))


_STEPS = {"synth": _synth, "pool": _pool, "cache": _cache, "train": _train,
          "pseudo": _pseudo, "evaluate": _evaluate, "fidelity": _fidelity}
