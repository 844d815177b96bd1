"""Inference engines: one tiny interface, several backends.

An engine runs the window tagger on a batch: ``run(windows)`` takes ``(batch,
WINDOW_SAMPLES)`` float32 samples at 16 kHz and returns ``(probs, embeddings)`` as float32
numpy arrays of shapes ``(batch, n_tags)`` and ``(batch, d_model)``. Engines are not
thread-safe: one thread (the inference worker) owns an engine.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from rtagger.checkpoint import TaggingModel
from rtagger.errors import EngineUnavailable


class Engine(Protocol):
    name: str
    device: str

    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def create_engine(model: TaggingModel, engine: str = "torch", device: str = "cpu") -> Engine:
    """Build a named engine for ``model``. Only ``torch`` exists so far."""
    if engine in ("torch", "auto"):
        from rtagger.engines.torch_engine import TorchEngine

        return TorchEngine(model, device)
    raise EngineUnavailable(f"unknown engine {engine!r}; available: torch")
