"""Export a model to a self-contained folder that an engine loads without the training code.

``export_model(model, fmt, out_dir)`` writes::

    out_dir/
      rtagger.json             what the folder holds: format, inputs/outputs, the model's
                               description (TaggingModel.describe()), versions, parity
      checkpoint.safetensors   the full model (tags, aggregator, checksummed weights)
      model.onnx               fmt "onnx": ONNX graph, log-mel front end included
      model.pt2                fmt "exported-program": torch.export program
      <key>.ep                 fmt "tensorrt": compiled engine for this GPU + TensorRT

Reading a folder back is the engines' job (:mod:`rtagger.engines.exported`). The folder is
written to a temporary sibling and renamed into place, so a killed export never leaves half
a folder.

Every ONNX and ExportedProgram export is checked against eager torch fp32 on generated
windows before it is kept (``parity`` in rtagger.json).
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.engines.exported import (
    CHECKPOINT,
    FORMAT,
    FORMAT_VERSION,
    FORMATS,
    MANIFEST,
    engine_for,
)
from rtagger.errors import CheckpointError, ConfigError
from rtagger.model.checkpoint import TaggingModel, load_model, save_model

log = logging.getLogger(__name__)

_FILES = {"onnx": "model.onnx", "exported-program": "model.pt2"}
# Largest |difference| to eager torch fp32 an export may show on the check windows. The
# measured values are ~1e-6 (fp32 graphs) and ~1e-3 (TensorRT fp16).
PARITY_TOLERANCE = {"onnx": 1e-4, "exported-program": 1e-5, "tensorrt": 2e-2}
PARITY_WINDOWS = 4


def export_model(model_or_path: TaggingModel | str | Path, fmt: str, out_dir: str | Path, *,
                 device: str | None = None, max_batch: int = 64, overwrite: bool = False
                 ) -> Path:
    """Write ``model_or_path`` (a model, checkpoint path or name) as an ``fmt`` folder.

    ``device``: where TensorRT compiles (default ``cuda``); ONNX and ExportedProgram are
    exported on the CPU and run anywhere. ``max_batch``: TensorRT's batch range (ONNX and
    ExportedProgram take any batch). Returns ``out_dir``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    model = (model_or_path if isinstance(model_or_path, TaggingModel)
             else load_model(model_or_path))
    out = Path(out_dir)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, tmp / CHECKPOINT)
        manifest = _manifest(model, fmt)
        if fmt == "tensorrt":
            engine, info = _export_tensorrt(model, tmp, device or "cuda", max_batch)
            manifest.update(info)
        else:
            manifest["file"] = _FILES[fmt]
            _write_graph(model, fmt, tmp / _FILES[fmt])
            engine = engine_for(tmp, manifest, "cpu")  # checks the file as it will be read
        manifest["parity"] = _parity(model, engine, fmt)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("exported %s as %s to %s", model.name, fmt, out)
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ConfigError(f"{out} is a non-empty folder that is not an rtagger export; "
                              "refusing to replace it")
        if not overwrite:
            raise ConfigError(f"{out} already holds an export; pass overwrite=True "
                              "(--force) to replace it")


def _manifest(model: TaggingModel, fmt: str) -> dict:
    from rtagger import __version__

    d_model = model.tagger.cfg.embedding_dim
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": fmt,
        "checkpoint": CHECKPOINT,
        "inputs": {"windows": {"shape": ["batch", WINDOW_SAMPLES], "dtype": "float32",
                               "sample_rate": SAMPLE_RATE}},
        "outputs": {"probs": {"shape": ["batch", len(model.tags)], "dtype": "float32",
                              "activation": "sigmoid"},
                    "embedding": {"shape": ["batch", d_model], "dtype": "float32"}},
        "model": model.describe(),
        "exported_with": {"rtagger": __version__, "torch": torch.__version__,
                          "python": platform.python_version(),
                          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def _write_graph(model: TaggingModel, fmt: str, path: Path) -> None:
    if fmt == "onnx":
        from rtagger.engines.onnx_engine import OPSET, export_onnx

        export_onnx(model, path)
        log.debug("ONNX opset %d written to %s", OPSET, path)
    else:
        from rtagger.engines.torch_engine import export_program

        export_program(model, path)


def _export_tensorrt(model: TaggingModel, folder: Path, device: str,
                     max_batch: int) -> tuple[object, dict]:
    from rtagger.engines.tensorrt_engine import TensorRTEngine

    engine = TensorRTEngine(model, device, max_batch=max_batch,
                            opt_batch=min(16, max_batch), cache_dir=folder)
    return engine, {"file": engine.path.name,
                    "tensorrt": {"key": engine.key, "gpu": engine.gpu_name,
                                 "version": engine.trt_version, "precision": engine.precision,
                                 "max_batch": max_batch, "opt_batch": min(16, max_batch)}}


def _check_windows(seed: int = 0) -> np.ndarray:
    """Deterministic check input: decaying tones over noise, one quiet window."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW_SAMPLES) / SAMPLE_RATE
    out = []
    for i in range(PARITY_WINDOWS):
        f = 110.0 * 2 ** (i * 5 / 12)
        x = 0.3 * np.sin(2 * np.pi * f * t) * np.exp(-t) + 0.05 * rng.standard_normal(t.size)
        out.append(x * (0.01 if i == PARITY_WINDOWS - 1 else 1.0))
    return np.stack(out).astype(np.float32)


def _parity(model: TaggingModel, engine, fmt: str) -> dict:
    x = _check_windows()
    reference = copy.deepcopy(model.tagger).cpu().eval()  # the caller's model stays put
    with torch.inference_mode():
        logits, emb = reference(torch.from_numpy(x))
    probs, emb_e = engine.run(x)
    result = {"reference": "eager torch fp32", "windows": len(x),
              "max_abs_diff_probs": float(np.abs(probs - torch.sigmoid(logits).numpy()).max()),
              "max_abs_diff_embedding": float(np.abs(emb_e - emb.numpy()).max()),
              "tolerance_probs": PARITY_TOLERANCE[fmt]}
    if result["max_abs_diff_probs"] > PARITY_TOLERANCE[fmt]:
        raise CheckpointError(str(model.source or model.name),
                              f"{fmt} export differs from eager torch by "
                              f"{result['max_abs_diff_probs']:.2e} in probabilities "
                              f"(tolerance {PARITY_TOLERANCE[fmt]:.0e}); not written")
    return result


# --- loading ------------------------------------------------------------------------------
