"""Log-mel front end against librosa, the reference implementation of the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtagger.audio.decode import FRAMES_PER_WINDOW, N_MELS, WINDOW_SAMPLES
from rtagger.audio.signals import music_like
from rtagger.model.features import LogMel, mel_filterbank

librosa = pytest.importorskip("librosa")

# Tolerance: float32 torch STFT vs float64-accumulating librosa; measured max 2e-4 dB.
DB_ATOL = 2e-3


def _librosa_db(x: np.ndarray) -> np.ndarray:
    mel = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=512, hop_length=256, n_mels=128,
                                         fmin=0.0, fmax=8000.0, center=True, pad_mode="reflect",
                                         power=2.0)
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)


def test_filterbank_matches_librosa():
    ours = mel_filterbank().numpy()
    ref = librosa.filters.mel(sr=16000, n_fft=512, n_mels=128, fmin=0.0, fmax=8000.0)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("signal", ["music", "noise", "quiet"])
def test_log_mel_matches_librosa(signal):
    rng = np.random.default_rng(0)
    x = {
        "music": music_like(WINDOW_SAMPLES / 16000 + 0.01)[:WINDOW_SAMPLES],
        "noise": rng.uniform(-1, 1, WINDOW_SAMPLES).astype(np.float32),
        "quiet": (1e-4 * rng.standard_normal(WINDOW_SAMPLES)).astype(np.float32),
    }[signal]
    ours = LogMel()(torch.from_numpy(x)[None])[0].numpy()
    ref = _librosa_db(x)
    assert ours.shape == ref.shape == (N_MELS, FRAMES_PER_WINDOW)
    np.testing.assert_allclose(ours, ref, atol=DB_ATOL)


def test_silence_is_floored_not_infinite():
    out = LogMel()(torch.zeros(2, WINDOW_SAMPLES))
    assert torch.isfinite(out).all()
    assert float(out.max()) == pytest.approx(-100.0)


def test_batch_items_are_independent():
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((3, WINDOW_SAMPLES))).float()
    mel = LogMel()
    np.testing.assert_allclose(mel(x)[1].numpy(), mel(x[1:2])[0].numpy(), atol=1e-4)


def test_chroma_profile_finds_the_pitch_classes_of_a_chord():
    from rtagger.model.features import Chroma

    t = np.arange(WINDOW_SAMPLES) / 16000
    triad = sum(np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0))  # C E G
    chroma = Chroma()
    with torch.no_grad():
        profile = chroma(torch.from_numpy(triad.astype(np.float32))[None])[0].numpy()
        silent = chroma(torch.zeros(1, WINDOW_SAMPLES))[0].numpy()
    assert abs(profile.sum() - 1) < 1e-5
    assert set(np.argsort(profile)[-3:]) == {0, 4, 7}
    assert profile[[0, 4, 7]].sum() > 0.75
    assert not silent.any()


def test_tempo_profile_peaks_at_the_beat_period_of_a_click_track():
    from rtagger.model.features import (
        TEMPO_BINS,
        TEMPO_MAX_BPM,
        TEMPO_MIN_BPM,
        LogMel,
        Tempo,
        tempo_lag_filters,
    )

    lags, weights = tempo_lag_filters()
    assert weights.shape == (TEMPO_BINS, len(lags))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(TEMPO_BINS, dtype=torch.float64))
    bins_bpm = np.geomspace(TEMPO_MAX_BPM, TEMPO_MIN_BPM, TEMPO_BINS)
    rng = np.random.default_rng(0)
    mel, tempo = LogMel(), Tempo()

    def clicks(bpm: float) -> np.ndarray:
        x = np.zeros(WINDOW_SAMPLES, np.float32)
        for start in np.arange(0, WINDOW_SAMPLES - 200, 16000 * 60 / bpm).astype(int):
            x[start : start + 200] = rng.normal(0, 0.5, 200)
        return x

    batch = torch.from_numpy(np.stack([clicks(b) for b in (90.0, 120.0, 150.0)]
                                      + [np.zeros(WINDOW_SAMPLES, np.float32)]))
    with torch.no_grad():
        out = tempo(mel(batch)).numpy()
        alone = tempo(mel(batch[1:2])).numpy()
    for row, bpm in zip(out[:3], (90.0, 120.0, 150.0), strict=True):
        assert abs(np.log2(bins_bpm[row.argmax()] / bpm)) < 0.1  # the nearest bin or next
        assert row.max() > 0.3
    assert not out[3].any()  # silence has no onsets to correlate
    np.testing.assert_allclose(alone[0], out[1], atol=1e-5)  # a window's own, whatever the batch
