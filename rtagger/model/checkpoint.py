"""Self-describing checkpoints: one ``.safetensors`` file holds weights and their description.

The safetensors header's metadata carries one JSON document (key ``rtagger``) with the
architecture configs, the tag list and groups, audio/mel parameters, training recipe and
metrics, package version, and two checksums: ``weights_sha256`` of the tensors (the weights'
identity, quoted by model cards, export manifests and engine caches) and ``tags_sha256`` of
the tag names in output order (an edited or reordered tag list would silently relabel every
output). :func:`load_model` rebuilds everything from the file alone and refuses files that
are corrupt or do not match this code, naming what is wrong.

Model names: ``default`` is the model bundled in ``rtagger/model/weights/``; ``untrained:SIZE``
(``SIZE`` in teacher/student/debug) builds a randomly initialised model, flagged
``trained=False`` everywhere it is reported, for tests, benchmarks and plumbing checks.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from rtagger.atomic import atomic_path
from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import CheckpointError, ConfigError
from rtagger.model.aggregator import AggregatorConfig, ContextAggregator, aggregator_config
from rtagger.model.features import LogMel
from rtagger.model.network import (
    ChunkTagger,
    TaggerConfig,
    config_from_dict,
    config_to_dict,
    tagger_config,
)
from rtagger.model.vocab import tag_groups, tags_v1, vocabulary_version

FORMAT = "rtagger-checkpoint"
FORMAT_VERSION = 2  # 2: tags_sha256 (format 1 files load with a warning, tags unverified)
DEFAULT_MODEL_FILE = "default.safetensors"
UNTRAINED_PREFIX = "untrained:"


def _version() -> str:
    from rtagger import __version__

    return __version__


@dataclass
class TaggingModel:
    """A window tagger, its optional track aggregator, and their description."""

    tagger: ChunkTagger
    aggregator: ContextAggregator | None
    tags: list[str]
    tag_groups: dict[str, str] = field(default_factory=dict)
    name: str = "unnamed"
    trained: bool = True
    recipe: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    source: str | None = None  # where it was loaded from
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        if len(self.tags) != self.tagger.cfg.n_tags:
            raise ConfigError(f"{len(self.tags)} tags for a model with "
                              f"{self.tagger.cfg.n_tags} outputs")
        if self.aggregator is not None and self.aggregator.cfg.n_tags != self.tagger.cfg.n_tags:
            raise ConfigError("aggregator and tagger predict different numbers of tags")

    def to(self, device: str | torch.device) -> TaggingModel:
        self.tagger.to(device)
        if self.aggregator is not None:
            self.aggregator.to(device)
        return self

    def eval(self) -> TaggingModel:
        self.tagger.eval()
        if self.aggregator is not None:
            self.aggregator.eval()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"tagger.{k}": v for k, v in self.tagger.state_dict().items()}
        if self.aggregator is not None:
            sd.update({f"aggregator.{k}": v for k, v in self.aggregator.state_dict().items()})
        return sd

    def describe(self) -> dict:
        """The JSON description stored in (and reported from) the checkpoint."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "trained": self.trained,
            "tags": list(self.tags),
            "tag_groups": dict(self.tag_groups),
            "tagger": config_to_dict(self.tagger.cfg),
            "aggregator": config_to_dict(self.aggregator.cfg) if self.aggregator else None,
            "audio": {"sample_rate": SAMPLE_RATE, "window_samples": WINDOW_SAMPLES},
            "mel": self.tagger.mel.params(),
            "recipe": self.recipe,
            "metrics": self.metrics,
            "rtagger_version": _version(),
            "weights_sha256": self.weights_sha256,
            "tags_sha256": tags_sha256(self.tags),
            # "v1"/"v2" (rtagger.model.vocab) or None: a custom list, e.g. a platform's head
            "vocabulary": self.vocabulary,
        }

    @property
    def vocabulary(self) -> str | None:
        """The bundled vocabulary these tags are exactly (``"v1"``, ``"v2"``), else None."""
        return vocabulary_version(self.tags)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Checksum of the weights, independent of file layout: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tags_sha256(tags: list[str]) -> str:
    """Checksum of the tag names in output order (output ``i`` means ``tags[i]``)."""
    return hashlib.sha256(json.dumps(list(tags)).encode()).hexdigest()


def build_untrained(size: str, tags: list[str] | None = None, seed: int = 0,
                    with_aggregator: bool = True) -> TaggingModel:
    """A randomly initialised model of a named size (deterministic from ``seed``)."""
    tags = list(tags) if tags is not None else tags_v1()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        tagger = ChunkTagger(tagger_config(size, len(tags)))
        agg = None
        if with_aggregator:
            agg = ContextAggregator(aggregator_config(size, len(tags), tagger.cfg.embedding_dim,
                                                         chroma_bins=tagger.cfg.chroma_bins,
                                                         tempo_bins=tagger.cfg.tempo_bins))
    finally:
        torch.random.set_rng_state(gen_state)
    model = TaggingModel(tagger, agg, tags, tag_groups(tags),
                         name=f"{UNTRAINED_PREFIX}{size}", trained=False)
    model.weights_sha256 = weights_sha256(model.state_dict())
    return model.eval()


def save_model(model: TaggingModel, path: str | Path) -> Path:
    """Write ``model`` atomically (temp file + rename) and return the path."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    model.weights_sha256 = weights_sha256(state)
    # safetensors tools read `format` as the tensor framework ("pt"); rtagger's own keys
    # sit beside it.
    meta = {"format": "pt", "rtagger_format": FORMAT, "rtagger": json.dumps(model.describe())}
    with atomic_path(path) as tmp:  # readable by others: a checkpoint is meant to be shared
        save_file(state, str(tmp), metadata=meta)
    return path


def bundled_model_path() -> Path | None:
    p = Path(str(resources.files("rtagger.model.weights").joinpath(DEFAULT_MODEL_FILE)))
    return p if p.is_file() else None


def load_model(path_or_name: str | Path = "default", device: str = "cpu") -> TaggingModel:
    """Rebuild a model from a checkpoint file, the bundled ``default``, or ``untrained:SIZE``.

    Raises :class:`CheckpointError` naming the problem: missing file, not a safetensors
    file, not an rtagger checkpoint, newer format, corrupted weights (checksum), missing or
    unexpected tensors, a tag list that is not the one saved with the weights (names or
    order), mel parameters this code does not compute.
    """
    if isinstance(path_or_name, str) and path_or_name.startswith(UNTRAINED_PREFIX):
        size = path_or_name[len(UNTRAINED_PREFIX):]
        try:
            return build_untrained(size).to(device)
        except ConfigError as e:
            raise CheckpointError(path_or_name, str(e)) from e
    if path_or_name == "default":
        p = bundled_model_path()
        if p is None:
            raise CheckpointError(
                "default",
                "no trained default model is bundled with this version of rtagger; pass "
                "--model PATH to a checkpoint, or --model untrained:small to exercise "
                "the pipeline with random weights",
            )
        path_or_name = p
    return _load_file(Path(path_or_name), device)


def _load_file(path: Path, device: str) -> TaggingModel:
    from safetensors import SafetensorError, safe_open

    name = str(path)
    if not path.is_file():
        raise CheckpointError(name, "no such file")
    try:
        with safe_open(name, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(name, f"not a readable safetensors file ({e})") from e
    # Files written before rtagger_format existed put FORMAT under `format`.
    if FORMAT not in (meta.get("rtagger_format"), meta.get("format")) or "rtagger" not in meta:
        raise CheckpointError(name, "safetensors file without rtagger metadata "
                                    "(not an rtagger checkpoint)")
    try:
        desc = json.loads(meta["rtagger"])
    except json.JSONDecodeError as e:
        raise CheckpointError(name, f"metadata is not valid JSON ({e})") from e
    version = desc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(name, f"checkpoint format version {version!r} is newer than "
                                    f"this rtagger supports ({FORMAT_VERSION}); upgrade")
    expected = desc.get("weights_sha256")
    actual = weights_sha256(state)
    if expected != actual:
        raise CheckpointError(name, f"weights are corrupted: sha256 {actual[:12]}... does "
                                    f"not match the recorded {str(expected)[:12]}...")
    _check_tags(name, desc, version)
    mel_now = LogMel().params()
    if desc.get("mel") != mel_now:
        raise CheckpointError(name, f"mel parameters {desc.get('mel')} differ from this "
                                    f"front end's {mel_now}")
    try:
        tcfg = config_from_dict(TaggerConfig, desc["tagger"])
        acfg = (config_from_dict(AggregatorConfig, desc["aggregator"])
                if desc.get("aggregator") else None)
        tags = list(desc["tags"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(name, f"invalid architecture description ({e})") from e
    tagger = ChunkTagger(tcfg)
    agg = ContextAggregator(acfg) if acfg else None
    _load_part(tagger, state, "tagger.", name)
    if agg is not None:
        _load_part(agg, state, "aggregator.", name)
    extra = [k for k in state if not k.startswith(("tagger.", "aggregator."))]
    if extra or (agg is None and any(k.startswith("aggregator.") for k in state)):
        raise CheckpointError(name, f"unexpected tensors {sorted(extra)[:5]}")
    try:
        model = TaggingModel(
            tagger, agg, tags, desc.get("tag_groups", {}), name=desc.get("name", path.stem),
            trained=bool(desc.get("trained", True)), recipe=desc.get("recipe", {}),
            metrics=desc.get("metrics", {}), source=name, weights_sha256=actual,
        )
    except ConfigError as e:
        raise CheckpointError(name, str(e)) from e
    return model.eval().to(device)


def _check_tags(name: str, desc: dict, version: int) -> None:
    tags = desc.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise CheckpointError(name, f"tags must be a list of names, got {tags!r:.80}")
    expected = desc.get("tags_sha256")
    if expected is None and version < 2:
        warnings.warn(f"{name}: format {version} checkpoint has no tag-list checksum, so its "
                      f"tag names and order are not verified; re-save it with this rtagger "
                      f"(save_model(load_model(path), path)) to record one", stacklevel=4)
        return
    actual = tags_sha256(tags)
    if expected != actual:
        raise CheckpointError(name, f"the tag list was changed after saving: sha256 of the "
                                    f"{len(tags)} tag names in order is {actual[:12]}..., "
                                    f"the checkpoint recorded {str(expected)[:12]}...")


def _load_part(module: torch.nn.Module, state: dict, prefix: str, name: str) -> None:
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(part))
    unexpected = sorted(set(part) - set(own))
    if missing or unexpected:
        raise CheckpointError(name, f"{prefix[:-1]} weights do not match the architecture: "
                                    f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [k for k in own if own[k].shape != part[k].shape]
    if bad:
        raise CheckpointError(name, f"{prefix[:-1]} tensor shapes differ from the "
                                    f"architecture for {bad[:5]}")
    module.load_state_dict(part)
