"""Recipes: every training stage is one TOML file read into frozen dataclasses.

What varies between experiments (dataset, model size, augmentation, a noisy-student round)
lives in ``train/recipes/*.toml``; the loop in :mod:`rtagger.train.fit.loop` never changes per run.
Values can be overridden from the command line as ``--set optim.lr=3e-4``.

Paths in a recipe are relative to the working directory (the repository root when run as
documented), so the same recipe runs on a laptop, in CI and on a GPU host.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from rtagger.audio.decode import WINDOW_S
from rtagger.errors import ConfigError

STAGES = ("tagger", "aggregator")


@dataclass(frozen=True)
class ModelSection:
    size: str = "small"  # large | small | tiny | debug (rtagger.model.network.SIZES)
    dropout: float = 0.1
    drop_path: float = 0.0  # stochastic depth: noise for the noisy student
    init: str | None = None  # checkpoint: the aggregator's frozen tagger, or a tagger's warm start
    arch: dict[str, Any] = field(default_factory=dict)  # Tagger- or AggregatorConfig overrides


@dataclass(frozen=True)
class DataSection:
    labelled: str = ""  # manifest of labelled songs (train split)
    labelled_fraction: float = 1.0  # deterministic subset of `labelled` used with labels
    valid: str = ""  # manifest for validation / early stopping
    cache: str = "data/cache"  # feature cache folder (rtagger data cache)
    pseudo: tuple[str, ...] = ()  # folders of pseudo-label shards (rtagger train pseudo)
    pseudo_ratio: float = 0.0  # fraction of each batch drawn from pseudo-labelled windows
    valid_windows_per_song: int = 8
    subset_seed: int = 0
    # "" = the labelled manifest's tags (v1 for the synthetic benchmark); "v2" = vocabulary v2,
    # whose tags the labelled songs do not define come from `labelled_pseudo` or are masked
    vocabulary: str = ""
    labelled_pseudo: tuple[str, ...] = ()  # shard folders over the labelled songs (teachers)


@dataclass(frozen=True)
class OptimSection:
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_steps: int = 5000
    grad_clip: float = 1.0
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)


@dataclass(frozen=True)
class EvalSection:
    every_steps: int = 250
    patience: int = 8  # evaluations without improvement before stopping
    metric: str = "macro_pr_auc"


@dataclass(frozen=True)
class AggregatorSection:
    max_windows: int = 64
    min_windows: int = 1  # sequences are cut at random lengths in [min, max] for live use
    hop_s: float = WINDOW_S  # window hop used to embed the songs
    # Targets of a cut sequence: what its audio holds (from the synthetic songs' timelines:
    # no breakdown before it is heard), not the whole song's tags.
    prefix_targets: bool = True
    # The frozen tagger's embedding gains each window's chroma profile (key and mode; see
    # rtagger.model.features.Chroma) and the aggregator its tonal features.
    chroma: bool = False
    # ... and each window's tempo profile (its onset periodicity, for tempo changes; see
    # rtagger.model.features.Tempo).
    tempo: bool = False


@dataclass(frozen=True)
class Recipe:
    name: str
    stage: str = "tagger"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    aggregator: AggregatorSection = field(default_factory=AggregatorSection)
    augment: dict[str, Any] = field(default_factory=dict)  # rtagger.train.fit.augment.AugmentConfig
    source: str = ""  # the file it was read from

    def digest(self) -> str:
        """Hash of everything that changes results (not the recipe's name or file)."""
        d = asdict(self)
        d.pop("source")
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
             "eval": EvalSection, "aggregator": AggregatorSection}


def _section(cls, raw: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    if "arch" in kw:
        kw["arch"] = dict(kw["arch"])
    return cls(**kw)


_TOP_KEYS = ("name", "stage", "seed")


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    """A checked :class:`Recipe`: unknown keys anywhere (sections, ``[model.arch]``,
    ``[augment]``) are a :class:`ConfigError` naming the key and the allowed ones."""
    raw = dict(raw)
    top = {k: raw.pop(k) for k in _TOP_KEYS if k in raw}
    augment = raw.pop("augment", {})
    for key, value in raw.items():
        if key in _SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table, got {value!r:.40}")
    sections = {}
    for key, cls in _SECTIONS.items():
        sections[key] = _section(cls, raw.pop(key, {}), f"{source} [{key}]")
    if raw:
        allowed = sorted({*_TOP_KEYS, "base", "augment", *_SECTIONS})
        raise ConfigError(f"{source}: unknown keys or sections {sorted(raw)}; "
                          f"allowed: {allowed}")
    if "name" not in top:
        raise ConfigError(f"{source}: a recipe needs a name")
    recipe = Recipe(**top, **sections, augment=augment, source=source)
    validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
    where = r.source or r.name
    if r.stage not in STAGES:
        raise ConfigError(f"{where}: stage must be one of {STAGES}, got {r.stage!r}")
    if not 0 < r.data.labelled_fraction <= 1:
        raise ConfigError(f"{where}: data.labelled_fraction must be in (0, 1]")
    if not 0 <= r.data.pseudo_ratio < 1:
        raise ConfigError(f"{where}: data.pseudo_ratio must be in [0, 1)")
    if r.data.pseudo_ratio > 0 and not r.data.pseudo:
        raise ConfigError(f"{where}: data.pseudo_ratio > 0 needs data.pseudo shard folders")
    if r.optim.batch_size < 1 or r.optim.max_steps < 1 or r.optim.lr <= 0:
        raise ConfigError(f"{where}: batch_size, max_steps and lr must be positive")
    if r.eval.every_steps < 1 or r.eval.patience < 1:
        raise ConfigError(f"{where}: eval.every_steps and eval.patience must be >= 1")
    _validate_arch(r, where)
    from rtagger.train.fit.augment import (
        AugmentConfig,  # torch-heavy; recipes are read to train anyway
    )

    table = dict(r.augment)
    if not isinstance(table.pop("enabled", True), bool):  # see augment.augmenters
        raise ConfigError(f"{where}: augment.enabled must be true or false")
    try:
        AugmentConfig.from_dict(table)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


# Set by the training task itself (from the recipe, the tag list or the frozen tagger).
_ARCH_FIXED = {"tagger": {"n_tags", "dropout", "drop_path"},
               "aggregator": {"n_tags", "d_in", "dropout", "max_windows"}}


def _validate_arch(r: Recipe, where: str) -> None:
    from rtagger.model.aggregator import AggregatorConfig
    from rtagger.model.network import SIZES, TaggerConfig, tagger_config

    if r.model.size not in SIZES:
        try:
            tagger_config(r.model.size, 1)  # says what the size is called now, or lists sizes
        except ConfigError as e:
            raise ConfigError(f"{where}: model.size: {e}") from None
    cls = TaggerConfig if r.stage == "tagger" else AggregatorConfig
    allowed = sorted({f.name for f in fields(cls)} - _ARCH_FIXED[r.stage])
    unknown = sorted(set(r.model.arch) - set(allowed))
    if unknown:
        raise ConfigError(f"{where} [model.arch]: unknown keys {unknown} for the {r.stage} "
                          f"stage (set elsewhere or not a {cls.__name__} field); "
                          f"allowed: {allowed}")


def portable_source(source: str) -> str:
    """``source`` without this machine's folders, for checkpoints that travel.

    A recipe inside the repository (or the installed package) becomes its path from there
    (``train/recipes/teacher.toml``); a relative path stays; any other absolute path is
    reduced to the file's name.
    """
    p = Path(source)
    if not p.is_absolute():
        return source
    root = Path(__file__).resolve().parents[2]
    try:
        return p.resolve().relative_to(root).as_posix()
    except ValueError:
        return p.name


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe and apply ``section.key=value`` overrides (values parsed as TOML)."""
    path = Path(path)
    raw = _read_with_base(path, seen=())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return recipe_from_dict(raw, str(path))


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict; ConfigError naming the file for missing or invalid files."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {path}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path}: invalid TOML ({e})") from e


def _read_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    """A recipe may start from another: ``base = "teacher.toml"`` (relative to itself).

    Tables are merged key by key, so a variant states only what differs.
    """
    raw = read_toml(path, "recipe")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"recipe {path}: circular base {base}")
    return _merge(_read_with_base(base_path, (*seen, path.resolve())), raw)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
