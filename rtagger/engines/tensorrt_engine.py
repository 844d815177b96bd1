"""TensorRT engine: torch-tensorrt (dynamo path), fp16, dynamic batch, cached on disk.

The log-mel front end runs in torch fp32 on the GPU (cuFFT; fp16 power spectra overflow
and TensorRT has no complex FFT); TensorRT compiles the rest (``forward_mel``: CNN,
transformer, head, sigmoid) for a batch range ``1..max_batch`` optimised at ``opt_batch``.

Compiling takes minutes, so the compiled module is saved (``torch_tensorrt.save`` as an
ExportedProgram) under a key made of the model's weight checksum, the GPU name, the
TensorRT version, the precision and the batch range, and later engines load it without
recompiling. A different GPU or TensorRT version gets its own entry: engines are not
portable between them. The cache lives in ``$RTAGGER_CACHE_DIR/tensorrt`` (default
``$XDG_CACHE_HOME/rtagger`` or ``~/.cache/rtagger``); an export folder written by
``rtagger export --format tensorrt`` is searched first.

torch_tensorrt is imported lazily: without it (or without a GPU) ``create_engine(...,
"tensorrt")`` raises :class:`~rtagger.errors.EngineUnavailable`; when it is there but the
build or compile fails (any exception), ``create_engine`` falls back to torch on the same
device and reports why in ``fallback_reason``. ``auto`` does not pick TensorRT until a GPU
run has measured it.

Thread safety: one thread owns an engine.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtagger.atomic import atomic_path
from rtagger.engines import check_windows
from rtagger.errors import ConfigError, EngineUnavailable
from rtagger.model.checkpoint import TaggingModel, weights_sha256
from rtagger.model.network import ChunkTagger

log = logging.getLogger(__name__)

PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    if importlib.util.find_spec("torch_tensorrt") is None:
        return ("torch-tensorrt is not installed (pip install 'rtagger[tensorrt]' on a "
                "machine with an NVIDIA GPU and driver)")
    try:
        import torch_tensorrt  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # missing/mismatched TensorRT libs
        return f"torch_tensorrt is installed but failed to import ({e})"
    return None


def tensorrt_unavailable_reason(device: str) -> str | None:
    """Why TensorRT cannot run on ``device`` here, or None when it can."""
    if not device.startswith("cuda"):
        return f"TensorRT needs a CUDA device (got {device!r}; pass --device cuda)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _import_error()


def _torch_tensorrt():
    reason = _import_error()
    if reason is not None:
        raise EngineUnavailable(reason)
    import torch_tensorrt

    return torch_tensorrt


def tensorrt_version() -> str:
    """The TensorRT library version (torch-tensorrt's own when tensorrt is not importable)."""
    trt = _torch_tensorrt()
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return f"torch_tensorrt-{trt.__version__}"


def default_cache_dir() -> Path:
    root = os.environ.get("RTAGGER_CACHE_DIR")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "rtagger")
    return Path(root) / "tensorrt"


def cache_key(model_sha256: str, gpu_name: str, trt_version: str, precision: str,
              opt_batch: int, max_batch: int) -> str:
    """File stem of a compiled engine: everything the compiled code depends on."""
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    ver = re.sub(r"[^A-Za-z0-9.]+", "-", trt_version)
    return f"{model_sha256[:16]}_{gpu}_trt{ver}_{precision}_b1-{opt_batch}-{max_batch}"


class MelTagger(nn.Module):
    """``(batch, n_mels, frames)`` dB log-mels -> ``(probs, embedding)``: the TensorRT part."""

    def __init__(self, tagger: ChunkTagger) -> None:
        super().__init__()
        self.tagger = tagger

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, emb = self.tagger.forward_mel(mel)
        return torch.sigmoid(logits), emb


class TensorRTEngine:
    """torch-tensorrt engine on ``cuda[:N]``.

    ``precision``: ``fp16`` (default) or ``fp32``; ``max_batch``/``opt_batch``: the dynamic
    batch range and the size TensorRT tunes for; ``cache_dir``: where compiled engines are
    kept (default :func:`default_cache_dir`); ``search_dirs``: read-only folders searched
    first (an export folder).
    """

    name = "tensorrt"

    def __init__(self, model: TaggingModel, device: str = "cuda", *, precision: str = "fp16",
                 max_batch: int = 64, opt_batch: int = 16, cache_dir: str | Path | None = None,
                 search_dirs: tuple[str | Path, ...] = ()) -> None:
        reason = tensorrt_unavailable_reason(device)
        if reason is not None:
            raise EngineUnavailable(f"tensorrt: {reason}")
        if precision not in PRECISIONS:
            raise ConfigError(f"tensorrt precision must be fp16 or fp32, got {precision!r}")
        if not 1 <= opt_batch <= max_batch:
            raise ConfigError(f"need 1 <= opt_batch <= max_batch, got {opt_batch}, "
                              f"{max_batch}")
        from rtagger.engines.torch_engine import inference_copy

        trt = _torch_tensorrt()
        self.device = device
        self._device = torch.device(device)
        self.precision = precision
        self.max_batch = max_batch
        self.fallback_reason: str | None = None
        tagger = inference_copy(model.tagger).to(self._device)
        self.mel = tagger.mel  # fp32 torch front end on the same GPU
        self.tagger = tagger  # for its chroma and tempo profiles, computed in torch
        sha = model.weights_sha256 or weights_sha256(model.state_dict())
        self.gpu_name = torch.cuda.get_device_name(self._device)
        self.trt_version = tensorrt_version()
        self.key = cache_key(sha, self.gpu_name, self.trt_version, precision, opt_batch,
                             max_batch)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        found = [Path(d) / f"{self.key}.ep" for d in (*search_dirs, self.cache_dir)]
        found = [p for p in found if p.is_file()]
        self.compiled_now = not found
        if found:
            self.path = found[0]
            log.info("loading TensorRT engine %s", self.path)
            self.module = trt.load(str(self.path)).module()
        else:
            self.path = self.cache_dir / f"{self.key}.ep"
            log.warning("compiling a TensorRT engine for %s (%s); this takes minutes once, "
                        "later runs load %s", self.gpu_name, precision, self.path)
            self.module = self._compile_and_save(trt, tagger, opt_batch)

    def _compile_and_save(self, trt, tagger: ChunkTagger, opt_batch: int):
        cfg = tagger.cfg
        shape = (cfg.n_mels, cfg.frames)
        spec = trt.Input(min_shape=(1, *shape), opt_shape=(opt_batch, *shape),
                         max_shape=(self.max_batch, *shape), dtype=torch.float32)
        example = torch.zeros(opt_batch, *shape, device=self._device)
        batch = torch.export.Dim("batch", min=1, max=self.max_batch)
        with torch.no_grad():
            program = torch.export.export(MelTagger(tagger).eval(), (example,),
                                          dynamic_shapes={"mel": {0: batch}})
            module = trt.dynamo.compile(program, inputs=[spec],
                                        enabled_precisions={PRECISIONS[self.precision]})
        with atomic_path(self.path) as tmp:  # a killed compile leaves no half file
            trt.save(module, str(tmp), output_format="exported_program", arg_inputs=[spec])
        self.path.with_suffix(".json").write_text(json.dumps({
            "key": self.key, "gpu": self.gpu_name, "tensorrt": self.trt_version,
            "torch_tensorrt": trt.__version__, "torch": torch.__version__,
            "precision": self.precision, "batch": [1, opt_batch, self.max_batch]}, indent=2))
        return module

    @torch.inference_mode()
    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(check_windows(windows)).to(self._device)
        out_p, out_e = [], []
        for start in range(0, x.shape[0], self.max_batch):
            batch = x[start : start + self.max_batch]
            mel = self.mel(batch)
            probs, emb = self.module(mel)
            # The chroma and tempo profiles (a tagger that has them) are computed in torch,
            # like the mel.
            emb = self.tagger.with_features(emb.float(), batch, mel)
            out_p.append(probs.float().cpu().numpy())
            out_e.append(emb.float().cpu().numpy())
        return np.concatenate(out_p), np.concatenate(out_e)

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "precision": self.precision,
                "gpu": self.gpu_name, "tensorrt": self.trt_version, "cache": str(self.path),
                "compiled_now": self.compiled_now, "max_batch": self.max_batch,
                "fallback_reason": self.fallback_reason}
