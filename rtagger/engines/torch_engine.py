"""Eager PyTorch engine (CPU or CUDA)."""

from __future__ import annotations

import numpy as np
import torch

from rtagger.audio import WINDOW_SAMPLES
from rtagger.checkpoint import TaggingModel
from rtagger.errors import EngineUnavailable


class TorchEngine:
    name = "torch"

    def __init__(self, model: TaggingModel, device: str = "cpu") -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"device {device!r} requested but CUDA is not available")
        self.device = device
        self.tagger = model.tagger.to(device).eval()

    @torch.inference_mode()
    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if windows.ndim != 2 or windows.shape[1] != WINDOW_SAMPLES:
            raise ValueError(f"expected (batch, {WINDOW_SAMPLES}) windows, got {windows.shape}")
        x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.device)
        logits, emb = self.tagger(x)
        return (torch.sigmoid(logits).float().cpu().numpy(),
                emb.float().cpu().numpy())
