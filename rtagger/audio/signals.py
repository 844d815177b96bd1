"""Generated music-like signals: the one test signal of tests, benchmarks and the GPU check.

Kick, snare and hi-hat on an eighth-note grid at 80-160 BPM, a bass line and chords of
decaying partials in one random key and mode, over a faint noise floor. Real music spreads
its energy over the whole mel range like this, so a benchmark or a precision check measures
where real audio puts it (a single sine leaves most mel bands at the floor). Everything is
deterministic from ``seed``.
"""

from __future__ import annotations

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES


def music_like(seconds: float, sr: int = SAMPLE_RATE, seed: int = 0, *,
               peak_dbfs: float = -6.0) -> np.ndarray:
    """One 'song' of ``seconds`` at ``sr`` Hz: ``(n,)`` float32 peaking at ``peak_dbfs``."""
    return _song(np.random.default_rng(seed), int(seconds * sr), sr, peak_dbfs)


def music_windows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` windows, ``(n, WINDOW_SAMPLES)`` float32 at 16 kHz, each its own song.

    Levels vary from -20 to -1 dBFS peak, as windows of real recordings do.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, WINDOW_SAMPLES), np.float32)
    for i in range(n):
        out[i] = _song(rng, WINDOW_SAMPLES, SAMPLE_RATE, float(rng.uniform(-20, -1)))
    return out


def _song(rng: np.random.Generator, n: int, sr: int, peak_dbfs: float) -> np.ndarray:
    x = 0.003 * rng.standard_normal(n)
    beat_s = 60.0 / rng.uniform(80, 160)
    root_hz = 55.0 * 2 ** (rng.integers(0, 12) / 12)
    third = 4 if rng.random() < 0.5 else 3  # major or minor
    scale = np.array([0, 2, third, 5, 7, 9 if third == 4 else 8, 10 if third == 3 else 11])

    def add(start_s: float, sig: np.ndarray) -> None:
        s = int(start_s * sr)
        if s >= n:
            return
        seg = sig[: n - s]
        x[s : s + seg.size] += seg

    def tone(freq_hz: float, dur_s: float, decay_s: float, partials: int,
             amp: float) -> np.ndarray:
        t = np.arange(int(dur_s * sr)) / sr
        wave = sum(np.sin(2 * np.pi * freq_hz * (k + 1) * t) / (k + 1)
                   for k in range(partials) if freq_hz * (k + 1) < sr / 2)
        return amp * np.exp(-t / decay_s) * wave

    def noise(dur_s: float, decay_s: float, amp: float, bright: bool) -> np.ndarray:
        m = int(dur_s * sr)
        z = rng.standard_normal(m + 1)
        z = np.diff(z) if bright else z[:m]  # differencing tilts the noise to high bands
        return amp * np.exp(-np.arange(m) / (decay_s * sr)) * z

    offset_s = rng.uniform(0, beat_s)
    for k, start_s in enumerate(np.arange(-offset_s, n / sr, beat_s / 2)):  # eighth notes
        s = max(float(start_s), 0.0)
        add(s, noise(0.05, 0.015, 0.08, bright=True))  # hi-hat
        if k % 2:  # off-beat: hi-hat only
            continue
        t = np.arange(int(0.25 * sr)) / sr
        add(s, 0.7 * np.exp(-t / 0.08) * np.sin(2 * np.pi * (50 + 70 * np.exp(-t / 0.03)) * t))
        if (k // 2) % 2 == 1:
            add(s, noise(0.2, 0.06, 0.25, bright=False))  # snare
        add(s, tone(root_hz * 2 ** (scale[rng.integers(0, 7)] / 12), beat_s, 0.3, 4, 0.25))
        if (k // 2) % 2 == 0:  # a chord every two beats
            degree = int(rng.integers(0, 7))
            for j in (0, 2, 4):
                semis = scale[(degree + j) % 7] + 12 * ((degree + j) // 7) + 24
                add(s, tone(root_hz * 2 ** (semis / 12), 2 * beat_s, 0.8, 3, 0.08))
    peak = float(np.max(np.abs(x))) if n else 1.0
    return (x / (peak or 1.0) * 10 ** (peak_dbfs / 20)).astype(np.float32)

