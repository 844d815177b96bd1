"""PyTorch engines: eager (CPU or CUDA) and torch.export programs.

:class:`TorchEngine` runs its own inference copy of the window tagger:

- BatchNorm folded into the preceding convolutions (eval mode only, exact up to float
  rounding: ~1e-6 on logits) and channels-last convolution weights: the cheap CPU wins
  measured in docs/performance.md;
- on CUDA, optional fp16/bf16 autocast for the CNN and transformer (the log-mel front end
  always stays fp32: fp16 power spectra overflow);
- on CUDA, optional CUDA graphs captured for fixed batch sizes: a batch is padded with
  silent windows up to the smallest captured size (a larger batch is split), replayed, and
  the padding rows are dropped. Capture removes the per-kernel launch cost, which dominates
  a small model at batch 1.

:class:`ExportedProgramEngine` runs a ``torch.export`` program written by
``deploy/export.py`` (format ``exported-program``).

Thread safety: one thread owns an engine. ``TorchEngine.run`` reuses static CUDA-graph
buffers, and ``threads=`` sets torch's process-wide intra-op thread count.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.engines import check_windows
from rtagger.errors import ConfigError, EngineUnavailable
from rtagger.model.checkpoint import TaggingModel
from rtagger.model.network import ChunkTagger, ResBlock2d

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_CHUNK = 8  # windows per forward pass on CPU (see TorchEngine)


class WindowModel(nn.Module):
    """``(batch, WINDOW_SAMPLES)`` windows -> ``(probs, embedding)``: the graph engines run.

    ``mel`` replaces the tagger's own log-mel front end (an export-friendly equivalent, see
    :class:`rtagger.engines.onnx_engine.FourStepLogMel`); None keeps ``tagger.mel``.
    """

    def __init__(self, tagger: ChunkTagger, mel: nn.Module | None = None,
                 chroma: nn.Module | None = None) -> None:
        super().__init__()
        self.tagger = tagger
        # Not ``tagger.mel`` a second time: a module registered twice saves its buffers
        # twice in an exported program. ``chroma`` likewise replaces ``tagger.chroma``.
        self.mel = mel
        self.chroma = chroma

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel = (self.tagger.mel if self.mel is None else self.mel)(windows)
        logits, emb = self.tagger.forward_mel(mel)
        emb = self.tagger.with_features(emb.float(), windows, mel, self.chroma)
        return torch.sigmoid(logits.float()), emb


def inference_copy(tagger: ChunkTagger, fold_batchnorm: bool = True) -> ChunkTagger:
    """An eval-mode copy of ``tagger``, BatchNorm folded into the convolutions before it.

    The input BatchNorm is kept: it comes before a zero-padded convolution, so folding it
    would change the border outputs (padding would no longer see normalised zeros).
    """
    t = copy.deepcopy(tagger).eval()
    if not fold_batchnorm:
        return t
    for blk in t.frontend:
        if not isinstance(blk, ResBlock2d):
            continue
        blk.conv1 = fuse_conv_bn_eval(blk.conv1, blk.bn1)
        blk.bn1 = nn.Identity()
        blk.conv2 = fuse_conv_bn_eval(blk.conv2, blk.bn2)
        blk.bn2 = nn.Identity()
        blk.shortcut = nn.Sequential(fuse_conv_bn_eval(blk.shortcut[0], blk.shortcut[1]))
    return t


def check_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineUnavailable(f"device {device!r} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"invalid device {device!r} ({e})") from e


class _CapturedBatch:
    """One CUDA graph of ``fn`` for a fixed batch size, with its static input and outputs."""

    def __init__(self, fn, batch: int, device: torch.device) -> None:
        self.batch = batch
        self.input = torch.zeros(batch, WINDOW_SAMPLES, device=device)
        # Warm-up on a side stream before capture: cuFFT plans, cuBLAS workspaces and lazy
        # initialisation must not happen inside the captured region.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.probs, self.emb = fn(self.input)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        self.input[:n].copy_(x)
        self.input[n:].zero_()  # silent padding windows: finite log-mel (-100 dB)
        self.graph.replay()
        return self.probs[:n], self.emb[:n]


class TorchEngine:
    """Eager PyTorch on ``cpu`` or ``cuda[:N]``.

    ``precision``: ``fp32`` (default), or on CUDA ``fp16``/``bf16`` autocast.
    ``cuda_graph_batch_sizes``: capture CUDA graphs for these batch sizes (CUDA only).
    ``threads``: torch intra-op threads (process-wide; default: torch's choice).
    ``optimize``: fold BatchNorm into the convolutions, channels-last weights (default True).
    ``chunk``: windows per forward pass; larger batches are split (default 8 on CPU, where
    that is faster per window; the whole batch on CUDA).
    """

    name = "torch"

    def __init__(self, model: TaggingModel, device: str = "cpu", *, precision: str = "fp32",
                 cuda_graph_batch_sizes: tuple[int, ...] | list[int] = (),
                 threads: int | None = None, optimize: bool = True,
                 chunk: int | None = None) -> None:
        self.device = device
        self._device = check_device(device)
        on_cuda = self._device.type == "cuda"
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got "
                              f"{precision!r}")
        if precision != "fp32" and not on_cuda:
            raise ConfigError(f"precision {precision} needs a CUDA device; the CPU path runs "
                              "fp32")
        sizes = sorted({int(b) for b in cuda_graph_batch_sizes})
        if sizes and not on_cuda:
            raise ConfigError("CUDA graphs need a CUDA device")
        if sizes and sizes[0] < 1:
            raise ConfigError(f"CUDA graph batch sizes must be >= 1, got {sizes}")
        if chunk is not None and chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {chunk}")
        # On CPU a large batch runs slower per window than a small one: the CNN's
        # activations (~1 MB per window in the first block) stop fitting in cache.
        # Measured on 2 cores: 275 windows/s at batch 8, 142 at batch 64.
        self.chunk = chunk or (CPU_CHUNK if not on_cuda else None)
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.precision = precision
        self.optimize = optimize
        self.fallback_reason: str | None = None
        self.tagger = inference_copy(model.tagger, optimize).to(self._device)
        if optimize:
            # channels-last activations: oneDNN (CPU) and cuDNN (tensor cores) convolutions
            # avoid layout conversions; measured equal or faster on CPU.
            self.tagger.frontend.to(memory_format=torch.channels_last)
        self._graphs: dict[int, _CapturedBatch] = {}
        if sizes:
            with torch.inference_mode():
                for b in sizes:
                    self._graphs[b] = _CapturedBatch(self._forward, b, self._device)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = PRECISIONS[self.precision]
        # cache_enabled=False: cached weight casts would outlive a CUDA-graph capture.
        with torch.autocast(self._device.type, dtype=dtype, enabled=dtype != torch.float32,
                            cache_enabled=False):
            logits, emb = self.tagger(x)
        return torch.sigmoid(logits.float()), emb.float()

    @torch.inference_mode()
    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(check_windows(windows))
        if not self._graphs:
            step = self.chunk or x.shape[0]
            outs = [self._forward(x[i : i + step].to(self._device))
                    for i in range(0, x.shape[0], step)]
            return (torch.cat([p for p, _ in outs]).cpu().numpy(),
                    torch.cat([e for _, e in outs]).cpu().numpy())
        largest = max(self._graphs)
        out_p, out_e = [], []
        for start in range(0, x.shape[0], largest):
            chunk = x[start : start + largest]
            size = min(b for b in self._graphs if b >= chunk.shape[0])
            probs, emb = self._graphs[size](chunk.to(self._device, non_blocking=True))
            out_p.append(probs.cpu().numpy())
            out_e.append(emb.cpu().numpy())
        return np.concatenate(out_p), np.concatenate(out_e)

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "precision": self.precision,
                "cuda_graph_batch_sizes": sorted(self._graphs), "chunk": self.chunk,
                "optimized": self.optimize, "threads": torch.get_num_threads(),
                "fallback_reason": self.fallback_reason}


class ExportedProgramEngine:
    """Runs a ``torch.export`` program of :class:`WindowModel` saved as ``.pt2``."""

    name = "exported-program"

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.device = device
        self._device = check_device(device)
        self.path = Path(path)
        self.fallback_reason: str | None = None
        try:
            program = torch.export.load(str(self.path))
        except (OSError, RuntimeError, ValueError) as e:
            raise EngineUnavailable(f"cannot load exported program {self.path} ({e})") from e
        self.module = program.module().to(self._device)

    @torch.inference_mode()
    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(check_windows(windows)).to(self._device)
        probs, emb = self.module(x)
        return probs.float().cpu().numpy(), emb.float().cpu().numpy()

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "path": str(self.path),
                "threads": torch.get_num_threads(), "fallback_reason": self.fallback_reason}


def export_program(model: TaggingModel, path: str | Path,
                   max_batch: int = 1024) -> Path:
    """``torch.export`` the window model (torch.stft front end) with a dynamic batch axis."""
    tagger = copy.deepcopy(model.tagger).eval().cpu()
    # torch.hann_window(periodic=True) is a view into a longer storage; the .pt2 writer
    # warns about such partial tensors, so the copy gets a compact window.
    tagger.mel.window = tagger.mel.window.clone()
    if tagger.chroma is not None:
        tagger.chroma.window = tagger.chroma.window.clone()
    wm = WindowModel(tagger).eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = torch.zeros(2, WINDOW_SAMPLES)
    with torch.no_grad():
        program = torch.export.export(wm, (example,), dynamic_shapes={"windows": {0: batch}})
    path = Path(path)
    torch.export.save(program, str(path))
    return path
