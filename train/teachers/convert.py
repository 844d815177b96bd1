"""``rtagger data teachers``: musicnn 0.1.0's TensorFlow checkpoints -> torch safetensors, once.

Only :func:`read_tf_variables` needs TensorFlow (the ``teachers`` extra); the mapping of
TensorFlow variables onto the torch modules (:func:`tf_to_torch`) is plain numpy, so tests
check it without TensorFlow. The checkpoints are read from the installed musicnn package
(``pip install --no-deps musicnn==0.1.0``: its own pins cannot be installed today).

Output folder::

    MTT_musicnn.safetensors ...  one file per teacher; its header holds the description
    teachers.json                index: per teacher the file, its sha256 and size, the
                                 architecture, tags, provenance and weights sha256
    LICENSE-musicnn              musicnn's ISC licence, which the weights are under
    parity.json                  with --parity: max |delta prob| of torch vs TensorFlow
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtagger.errors import RtaggerError
from rtagger.train.teachers.musicnn import (
    META_KEY,
    TEACHER_NAMES,
    Teacher,
    teacher_config,
    teacher_tags,
)

SOURCE_PACKAGE = "musicnn"
SOURCE_VERSION = "0.1.0"
LICENCE = "ISC"
COPYRIGHT = ("Copyright (c) Music Technology Group, Universitat Pompeu Fabra 2019. "
             "Code developed by Jordi Pons.")
LICENCE_FILE = "LICENSE-musicnn"
INDEX_FILE = "teachers.json"
TRAINED_ON = {"MTT": "MagnaTagATune, top-50 tags", "MSD": "Million Song Dataset, top-50 tags"}
EXTRA_HINT = ("needs TensorFlow and musicnn's checkpoints: pip install --no-deps "
              "musicnn==0.1.0 && pip install 'rtagger[teachers]' (see docs/teachers.md)")


class ConversionError(RtaggerError):
    """musicnn or TensorFlow is missing, or a checkpoint is not what this code expects."""


def _bn(tf: str, pt: str) -> list[tuple[str, str, str]]:
    return [(f"{tf}/{a}", f"{pt}.{b}", "copy") for a, b in
            (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
             ("moving_variance", "running_var"))]


def _layer(tf: str, pt: str, kind: str) -> list[tuple[str, str, str]]:
    return [(f"{tf}/kernel", f"{pt}.weight", kind), (f"{tf}/bias", f"{pt}.bias", "copy")]


def variable_map(arch: str) -> list[tuple[str, str, str]]:
    """``(tensorflow name, torch name, kind)`` for every weight of ``arch``, in musicnn's
    order of layer creation (TensorFlow numbers unnamed layers ``conv2d``, ``conv2d_1``...)."""
    if arch == "musicnn":
        convs = ([("timbral.0", "conv2d"), ("timbral.1", "conv2d"), ("temporal.0", "conv2d"),
                  ("temporal.1", "conv2d"), ("temporal.2", "conv2d")]
                 + [(f"midend.{i}", "conv1d") for i in range(3)])
        bns = (["bn_input", "bn_timbral.0", "bn_timbral.1"]
               + [f"bn_temporal.{i}" for i in range(3)] + [f"bn_midend.{i}" for i in range(3)]
               + ["bn_pool", "bn_dense"])
        rows = []
        for i, (pt, kind) in enumerate(convs):
            rows += _layer("conv2d" + (f"_{i}" if i else ""), pt, kind)
        for i, pt in enumerate(bns):
            rows += _bn("batch_normalization" + (f"_{i}" if i else ""), pt)
        return rows + _layer("dense", "dense", "dense") + _layer("dense_1", "out", "dense")
    if arch == "vgg":
        rows = _bn("batch_normalization", "bn_input")
        for i in range(5):
            rows += _layer(f"{i + 1}CNN", f"convs.{i}", "conv2d")
            rows += _bn(f"batch_normalization_{i + 1}", f"bns.{i}")
        return rows + _layer("dense", "out", "dense")
    raise ConversionError(f"unknown architecture {arch!r}")


def _to_torch(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv2d":  # (kh, kw, in, out) -> (out, in, kh, kw)
        return a.transpose(3, 2, 0, 1)
    if kind == "conv1d":  # (7, in, 1, out): a conv as wide as its input -> (out, in, 7)
        return a[:, :, 0, :].transpose(2, 1, 0)
    if kind == "dense":  # (in, out) -> (out, in)
        return a.T
    return a


def _to_tf(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv2d":
        return a.transpose(2, 3, 1, 0)
    if kind == "conv1d":
        return a.transpose(2, 1, 0)[:, :, None, :]
    if kind == "dense":
        return a.T
    return a


def is_optimizer_slot(name: str) -> bool:
    """Adam's moments and power accumulators, saved beside the weights but not needed."""
    return "/Adam" in name or name in ("beta1_power", "beta2_power")


def tf_to_torch(arch: str, variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map TensorFlow variables ``{name: array}`` onto the torch network's state dict.

    Every weight must be present with its expected layout and nothing but optimizer slots
    may be left over; anything else raises :class:`ConversionError` naming it.
    """
    rows = variable_map(arch)
    missing = [tf for tf, _, _ in rows if tf not in variables]
    if missing:
        raise ConversionError(f"{arch}: checkpoint lacks {', '.join(missing)}")
    used = {tf for tf, _, _ in rows}
    extra = [n for n in variables if n not in used and not is_optimizer_slot(n)]
    if extra:
        raise ConversionError(f"{arch}: unexpected variables {', '.join(sorted(extra))}")
    state = {pt: torch.from_numpy(np.ascontiguousarray(_to_torch(variables[tf], kind),
                                                       dtype=np.float32))
             for tf, pt, kind in rows}
    for pt in [p for _, p, _ in rows if p.endswith(".running_mean")]:
        state[pt.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    return state


def tf_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """The TensorFlow shape of every weight, derived from the torch network's shapes."""
    net = Teacher("shapes", teacher_config(f"MTT_{arch}"), teacher_tags("MTT_x")).net
    state = net.state_dict()
    return {tf: tuple(_to_tf(state[pt].numpy(), kind).shape)
            for tf, pt, kind in variable_map(arch)}


def musicnn_package_dir() -> Path:
    """The installed musicnn package folder (found without importing it: that would
    import TensorFlow)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"musicnn is not installed; {EXTRA_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_tf_variables(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Every variable of one musicnn checkpoint folder (its files are ``.index``,
    ``.data-00000-of-00001``: the prefix is the folder itself)."""
    tf = import_tensorflow()
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(str(checkpoint_dir) + "/")
    except (tf.errors.OpError, ValueError) as e:
        raise ConversionError(f"{checkpoint_dir.name}: unreadable checkpoint ({e})") from e
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}


def import_tensorflow() -> Any:
    """TensorFlow with the Keras 2 layers that musicnn's graph code needs (tf-keras)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ConversionError(f"TensorFlow is not installed; {EXTRA_HINT}") from e
    return tf


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_version() -> str:
    try:
        return metadata.version(SOURCE_PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def provenance(name: str, checkpoint_dir: Path) -> dict:
    result = checkpoint_dir / "experiment.result"
    tf = import_tensorflow()

    return {
        "source_package": SOURCE_PACKAGE,
        "source_version": _source_version(),
        "source_checkpoint": f"{SOURCE_PACKAGE}/{name}/",
        "source_data_sha256": _sha256(checkpoint_dir / ".data-00000-of-00001"),
        "licence": LICENCE,
        "licence_file": LICENCE_FILE,
        "copyright": COPYRIGHT,
        "trained_on": TRAINED_ON[name.split("_")[0]],
        "experiment_result": result.read_text().strip() if result.is_file() else None,
        "converted_with": {"tensorflow": tf.__version__, "torch": torch.__version__},
    }


def convert_teacher(name: str, out_dir: Path, package_dir: Path | None = None) -> Path:
    """Convert one shipped model to ``OUT/NAME.safetensors`` and return the path."""
    from safetensors.torch import save

    from rtagger.atomic import atomic_write

    ckpt = (package_dir or musicnn_package_dir()) / name
    if not (ckpt / ".index").is_file():
        raise ConversionError(f"{ckpt.name}: no checkpoint in the musicnn package; {EXTRA_HINT}")
    cfg = teacher_config(name)
    teacher = Teacher(name, cfg, teacher_tags(name), provenance(name, ckpt))
    teacher.net.load_state_dict(tf_to_torch(cfg.arch, read_tf_variables(ckpt)), strict=True)
    state = {k: v.contiguous() for k, v in teacher.net.state_dict().items()}
    meta = {"format": "pt", META_KEY: json.dumps(teacher.describe())}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write(out_dir / f"{name}.safetensors", save(state, metadata=meta))
    path.chmod(0o644)  # the temporary file was owner-only; teachers are meant to be shared
    return path


def write_index(out_dir: Path, names: Iterable[str]) -> Path:
    """``teachers.json`` over the converted files, and the licence beside them."""
    from rtagger.atomic import atomic_write
    from rtagger.train.teachers.musicnn import read_description

    entries = []
    for name in names:
        path = out_dir / f"{name}.safetensors"
        desc = read_description(path)
        entries.append({"file": path.name, "sha256": _sha256(path),
                        "bytes": path.stat().st_size, **desc})
    licence = resources.files("rtagger.train.teachers").joinpath(LICENCE_FILE)
    shutil.copyfile(str(licence), out_dir / LICENCE_FILE)
    text = json.dumps({"teachers": entries}, indent=2) + "\n"
    path = atomic_write(out_dir / INDEX_FILE, text.encode())
    path.chmod(0o644)
    return path


def convert_teachers(out_dir: Path, names: Sequence[str] = TEACHER_NAMES,
                     package_dir: Path | None = None) -> list[Path]:
    """Convert ``names`` (default: all four) into ``out_dir`` and write the index."""
    for n in names:
        teacher_config(n)  # unknown names fail before any work
    paths = [convert_teacher(n, out_dir, package_dir) for n in names]
    write_index(out_dir, names)
    return paths
