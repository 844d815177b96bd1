"""Reading an export folder (``rtagger export``): its manifest, model and engine.

An export folder holds ``rtagger.json`` (what the folder holds), ``checkpoint.safetensors``
(the full model: tags, aggregator, checksummed weights) and the exported graph
(``model.onnx``, ``model.pt2``, or a TensorRT engine). Writing one is deployment's job
(:mod:`rtagger.deploy.export`); reading one belongs with the engines, so the runtime never
imports deployment code.

``load_exported(folder, device)`` returns ``(engine, manifest)``; ``load_exported_model``
returns the :class:`~rtagger.model.checkpoint.TaggingModel` (tag names, aggregator) a
:class:`~rtagger.pipeline.tagger.Tagger` needs beside the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

from rtagger.errors import CheckpointError, ConfigError
from rtagger.model.checkpoint import TaggingModel, load_model

FORMAT = "rtagger-export"
FORMAT_VERSION = 1
MANIFEST = "rtagger.json"
CHECKPOINT = "checkpoint.safetensors"
FORMATS = ("onnx", "exported-program", "tensorrt")


def is_export_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`export_model`."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict:
    """The folder's ``rtagger.json``, checked; :class:`CheckpointError` names what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(str(folder), f"no {MANIFEST} (not an rtagger export folder)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(str(path), f"unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(str(path), f"not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(str(path), f"export format version {version!r} is newer than "
                                         f"this rtagger reads ({FORMAT_VERSION}); upgrade")
    if manifest.get("artifact") not in FORMATS:
        raise CheckpointError(str(path), f"unknown artifact {manifest.get('artifact')!r}")
    for key in ("file", "checkpoint"):
        if not (folder / str(manifest.get(key, ""))).is_file():
            raise CheckpointError(str(folder), f"missing {manifest.get(key)!r} named by "
                                               f"{MANIFEST}")
    return manifest


def load_exported_model(folder: str | Path) -> TaggingModel:
    """The full model of an export folder (tags, groups, aggregator), checksum-verified."""
    manifest = read_manifest(folder)
    model = load_model(Path(folder) / manifest["checkpoint"])
    expected = manifest.get("model", {}).get("weights_sha256")
    if expected != model.weights_sha256:
        raise CheckpointError(str(folder), "checkpoint does not match the exported graph "
                                           "(weights checksum differs from rtagger.json)")
    return model


def load_exported(folder: str | Path, device: str = "cpu", **engine_options):
    """``(engine, manifest)`` for an export folder; the engine runs the exported artefact.

    ``engine_options`` go to the engine (``threads`` for ONNX, ``cache_dir`` for TensorRT).
    A TensorRT folder compiled for another GPU or TensorRT version is recompiled into the
    TensorRT cache (logged); the folder itself is never written. If that build fails, the
    engine is torch on the folder's checkpoint, with the reason in ``fallback_reason``.
    """
    manifest = read_manifest(folder)
    return engine_for(Path(folder), manifest, device, **engine_options), manifest


def engine_for(folder: Path, manifest: dict, device: str, **options):
    """The engine for the artefact that ``manifest`` (already read) describes in ``folder``."""
    fmt = manifest["artifact"]
    if fmt == "onnx":
        from rtagger.engines.onnx_engine import OnnxEngine

        return OnnxEngine(folder / manifest["file"], device, **options)
    if fmt == "exported-program":
        from rtagger.engines.torch_engine import ExportedProgramEngine

        if options:
            raise ConfigError(f"exported-program engines take no options, got {sorted(options)}")
        return ExportedProgramEngine(folder / manifest["file"], device)
    from rtagger.engines import create_engine

    trt = manifest["tensorrt"]
    model = load_model(folder / manifest["checkpoint"])
    # Through create_engine: a TensorRT build that fails here falls back to torch, reported.
    return create_engine(model, "tensorrt", device, precision=trt["precision"],
                         max_batch=trt["max_batch"], opt_batch=trt["opt_batch"],
                         search_dirs=(folder,), **options)
