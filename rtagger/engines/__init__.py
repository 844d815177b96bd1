"""Inference engines: one tiny interface, several backends.

An engine runs the window tagger on a batch: ``run(windows)`` takes ``(batch,
WINDOW_SAMPLES)`` float32 samples at 16 kHz and returns ``(probs, embeddings)`` as float32
numpy arrays of shapes ``(batch, n_tags)`` (sigmoid applied) and ``(batch, d_model)``. The
log-mel front end is part of every engine and runs on the engine's device.

Backends:

- ``torch`` (:mod:`.torch_engine`): eager PyTorch on CPU or CUDA; on CUDA optionally
  fp16/bf16 autocast and CUDA graphs for fixed batch sizes.
- ``onnx`` (:mod:`.onnx_engine`): ONNX Runtime on an exported graph (CPU, or CUDA with
  ``onnxruntime-gpu``). The fastest engine on CPU (see docs/performance.md).
- ``tensorrt`` (:mod:`.tensorrt_engine`): torch-tensorrt fp16, compiled once per
  (model, GPU, TensorRT version) and cached on disk.

``create_engine(model, "auto", device)`` picks the best *measured* engine available for
the device (:data:`AUTO_ORDER`); when the first choice (or the device itself) is missing or
fails to build, it falls back, logs a warning and records why in the engine's
``fallback_reason``: a fallback is never silent. ``auto`` never picks TensorRT: no GPU run
has measured it yet (docs/performance.md), so on CUDA it takes torch.

Asking for a named engine that cannot run here at all (not installed, no GPU) raises
:class:`~rtagger.errors.EngineUnavailable` with the reason. A requested TensorRT engine
that can run but fails to build (its compile can fail in many ways: an unsupported op, a
library mismatch, out of memory; any exception type) is replaced by torch on the same
device, with a warning and the reason in ``fallback_reason``. Invalid settings
(:class:`~rtagger.errors.ConfigError`) are always raised, never fallen back from.

Optional backends are imported lazily, so ``import rtagger`` never needs onnxruntime or
TensorRT.

Thread safety: engines are not thread-safe. One thread (the inference worker) owns an
engine and is the only one to call ``run``; other threads hand it windows through a queue.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Protocol

import numpy as np

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.errors import ConfigError, EngineUnavailable
from rtagger.model.checkpoint import TaggingModel

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx", "tensorrt")
# Preference of ``auto`` per device kind, best first: only engines a benchmark run has
# measured on that kind of device (docs/performance.md). TensorRT joins the CUDA order once
# a GPU run of `rtagger bench --device cuda` has measured it against torch.
AUTO_ORDER = {"cuda": ("torch", "onnx"), "cpu": ("onnx", "torch")}
_GPU_ONLY_OPTIONS = {"precision", "cuda_graph_batch_sizes"}


class Engine(Protocol):
    name: str
    device: str
    fallback_reason: str | None

    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> dict: ...


def check_windows(windows: np.ndarray) -> np.ndarray:
    """Validate a batch of windows; return it as C-contiguous float32 ``(batch, samples)``."""
    a = np.asarray(windows)
    if a.ndim != 2 or a.shape[1] != WINDOW_SAMPLES or a.shape[0] == 0:
        raise ConfigError(f"expected (batch >= 1, {WINDOW_SAMPLES}) windows, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unavailable_reason(engine: str, device: str = "cpu") -> str | None:
    """Why ``engine`` cannot run on ``device`` here, or None when it can."""
    if engine not in ENGINES:
        return f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)} or auto"
    on_cuda = device.startswith("cuda")
    if on_cuda and not cuda_available():
        return f"device {device!r} requested but CUDA is not available"
    if engine == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'rtagger[onnx]')"
        if on_cuda:
            from rtagger.engines.onnx_engine import cuda_provider_available

            if not cuda_provider_available():
                return ("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu "
                        "instead of onnxruntime)")
    if engine == "tensorrt":
        from rtagger.engines.tensorrt_engine import tensorrt_unavailable_reason

        return tensorrt_unavailable_reason(device)
    return None


def available_engines(device: str = "cpu") -> list[str]:
    """The engines that can run on ``device`` on this machine, in ``auto`` preference order."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    order = list(AUTO_ORDER[kind]) + [e for e in ENGINES if e not in AUTO_ORDER[kind]]
    return [e for e in order if unavailable_reason(e, device) is None]


def create_engine(model: TaggingModel, engine: str = "torch", device: str = "cpu",
                  **options) -> Engine:
    """Build engine ``engine`` (``torch``, ``onnx``, ``tensorrt`` or ``auto``) for ``model``.

    ``options`` go to the engine's constructor (``precision``, ``cuda_graph_batch_sizes``,
    ``threads``, ``max_batch``, ``cache_dir``, ...; see each engine). With ``auto``, options
    the chosen engine does not take are dropped (logged at debug level).

    Raises :class:`EngineUnavailable` when a named engine cannot run here, with the reason.
    A TensorRT engine that can run here but fails to build (any error but a ConfigError)
    is replaced by torch on the same device, with the reason in ``fallback_reason``.
    """
    if engine == "auto":
        return _create_auto(model, device, options)
    reason = unavailable_reason(engine, device)
    if reason is not None:
        raise EngineUnavailable(f"engine {engine!r} on {device}: {reason}; available here: "
                                f"{', '.join(available_engines('cpu')) or 'none'} (cpu)"
                                + _cuda_note())
    if engine == "tensorrt":
        return _tensorrt_or_torch(model, device, options)
    return _build(engine, model, device, options)


def _tensorrt_or_torch(model: TaggingModel, device: str, options: dict) -> Engine:
    _check_options("tensorrt", options)  # a bad option is the caller's error, not a fallback
    try:
        return _build("tensorrt", model, device, options)
    except ConfigError:
        raise
    except Exception as e:  # any build/compile failure: torch is the measured path
        reason = f"tensorrt failed to build on {device} ({type(e).__name__}: {e}); using torch"
        log.warning("engine tensorrt fell back to torch on %s: %s", device, reason,
                    exc_info=True)
        accepted = _accepted_options("torch")
        eng = _build("torch", model, device, {k: v for k, v in options.items()
                                              if k in accepted})
        eng.fallback_reason = reason
        return eng


def _create_auto(model: TaggingModel, device: str, options: dict) -> Engine:
    skipped: list[str] = []
    if device.startswith("cuda") and not cuda_available():
        skipped.append(f"device {device!r} requested but CUDA is not available; using cpu")
        device = "cpu"
        # GPU-only settings cannot follow the fallback; the CPU path runs fp32.
        options = {k: v for k, v in options.items() if k not in _GPU_ONLY_OPTIONS}
    kind = "cuda" if device.startswith("cuda") else "cpu"
    for name in AUTO_ORDER[kind]:
        reason = unavailable_reason(name, device)
        if reason is not None:
            skipped.append(f"{name}: {reason}")
            continue
        accepted = _accepted_options(name)
        dropped = sorted(set(options) - accepted)
        if dropped:
            log.debug("engine auto -> %s: ignoring options %s", name, dropped)
        try:
            eng = _build(name, model, device, {k: v for k, v in options.items()
                                               if k in accepted})
        except ConfigError:
            raise
        except Exception as e:  # unavailable after all, or failed to build: try the next
            log.debug("engine auto: %s failed to build on %s", name, device, exc_info=True)
            skipped.append(f"{name}: {e}" if isinstance(e, EngineUnavailable)
                           else f"{name} failed to build ({type(e).__name__}: {e})")
            continue
        if skipped:
            eng.fallback_reason = "; ".join(skipped)
            log.warning("engine auto fell back to %s on %s (%s)", name, device,
                        eng.fallback_reason)
        return eng
    raise EngineUnavailable("no engine can run here: " + "; ".join(skipped))


def _engine_class(name: str):
    if name == "torch":
        from rtagger.engines.torch_engine import TorchEngine

        return TorchEngine
    if name == "onnx":
        from rtagger.engines.onnx_engine import OnnxEngine

        return OnnxEngine
    from rtagger.engines.tensorrt_engine import TensorRTEngine

    return TensorRTEngine


def _accepted_options(name: str) -> set[str]:
    params = inspect.signature(_engine_class(name).__init__).parameters
    return {p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_options(name: str, options: dict) -> None:
    unknown = set(options) - _accepted_options(name)
    if unknown:
        raise ConfigError(f"engine {name!r} takes no options {sorted(unknown)}; it takes "
                          f"{sorted(_accepted_options(name))}")


def _build(name: str, model: TaggingModel, device: str, options: dict) -> Engine:
    _check_options(name, options)
    return _engine_class(name)(model, device, **options)


def _cuda_note() -> str:
    return ", " + ", ".join(available_engines("cuda")) + " (cuda)" if cuda_available() else ""
