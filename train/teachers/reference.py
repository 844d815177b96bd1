"""Deterministic inputs and seeded weights behind the teachers' CI fixture (no TensorFlow).

``reference.json`` beside this file holds what TensorFlow computed, once, with musicnn
0.1.0's own graph code (``rtagger data teachers --fixture``):

- ``seeded``: for each architecture, musicnn's graph loaded with :func:`seeded_tf_variables`
  (TensorFlow layouts and names, values from a PCG64 stream) and fed :func:`seeded_patches`.
  Tests map the same arrays with :func:`~rtagger.train.teachers.convert.tf_to_torch` and
  compare logits: this checks both torch architectures and the conversion without any
  weights file.
- ``teachers``: each shipped model's probabilities on :func:`reference_signal` (musicnn's
  librosa mel, float32 compression), checked against converted teachers where present.
- ``librosa_band_mean``: the librosa mel of that signal, compressed, averaged over frames.

PCG64's raw stream is fixed across numpy versions (distribution methods are not), so the
arrays are built from :meth:`numpy.random.PCG64.random_raw` alone.
"""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np

from rtagger.train.teachers.musicnn import PATCH_FRAMES, SAMPLE_RATE, TeacherConfig

REFERENCE_FILE = "reference.json"
SIGNAL_S = 6.2  # two whole 3 s patches
SEED = 20190712  # the date of musicnn's MTT checkpoints


def uniform(seed: int, n: int) -> np.ndarray:
    """``n`` float64 values in [0, 1) from PCG64's raw stream (stable across numpy)."""
    raw = np.random.PCG64(seed).random_raw(n)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def reference_signal(seconds: float = SIGNAL_S) -> np.ndarray:
    """A loud, music-like test signal, float32 at 16 kHz: a four-note harmonic melody with
    vibrato, a kick every 0.5 s and noise bursts on the off-beats. Its mel exceeds 6.55
    (where musicnn's float16 cast overflows) in many cells."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    notes_hz = np.array([220.0, 277.18, 329.63, 440.0])
    f0 = notes_hz[(t // 0.75).astype(int) % len(notes_hz)] * (1 + 0.004 * np.sin(2 * np.pi
                                                                                  * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    melody = sum(0.3 / k * np.sin(k * phase) for k in range(1, 7))
    beat = t % 0.5
    kick = 0.8 * np.exp(-beat / 0.06) * np.sin(2 * np.pi * (50 + 80 * np.exp(-beat / 0.02))
                                               * beat)
    off = (t + 0.25) % 0.5
    noise = 2 * uniform(SEED, n) - 1
    hat = 0.25 * np.exp(-off / 0.02) * noise
    return (melody + kick + hat).astype(np.float32)


def seeded_patches(n: int = 2, cfg: TeacherConfig | None = None) -> np.ndarray:
    """``(n, 187, 96)`` float32 values in [0, 3), the range of compressed music mels."""
    cfg = cfg or TeacherConfig("musicnn")
    shape = (n, cfg.patch_frames, cfg.n_mels)
    return (3 * uniform(SEED + 1, math.prod(shape))).reshape(shape).astype(np.float32)


def seeded_tf_variables(arch: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Float32 values for TensorFlow variables ``{name: shape}`` of one architecture:
    kernels uniform with variance 1/fan_in, biases and shifts small, batch-norm scales and
    variances in [0.5, 1.5]."""
    out = {}
    for i, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        u = uniform(SEED + 100 + i + (0 if arch == "musicnn" else 1000), math.prod(shape))
        u = u.reshape(shape)
        leaf = name.rsplit("/", 1)[1]
        if leaf == "kernel":
            fan_in = math.prod(shape[:-1])
            v = (2 * u - 1) * math.sqrt(3.0 / fan_in)
        elif leaf in ("gamma", "moving_variance"):
            v = 0.5 + u
        else:  # bias, beta, moving_mean
            v = 0.2 * (2 * u - 1)
        out[name] = v.astype(np.float32)
    return out


def load_reference() -> dict:
    """The stored fixture (``reference.json``)."""
    text = resources.files("rtagger.train.teachers").joinpath(REFERENCE_FILE).read_text()
    return json.loads(text)


assert PATCH_FRAMES * 2 <= 1 + int(SIGNAL_S * SAMPLE_RATE) // 256
