"""Log-mel front end in plain torch: waveform windows -> dB mel spectrograms.

Matches librosa's ``melspectrogram`` (Slaney mel scale and area normalisation, periodic Hann
window, centred reflect-padded STFT, power 2) followed by ``power_to_db`` without the
signal-dependent ``top_db`` clipping, so a window's features depend on that window alone:
this is what makes streaming equal offline. The filterbank is built once and kept as a
buffer, so the module moves to the model's device and exports (ONNX, TensorRT) with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rtagger.audio.decode import F_MAX_HZ, F_MIN_HZ, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE

AMIN = 1e-10  # power floor before log: -100 dB


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    lin = hz / f_sp
    log = min_log_mel + torch.log(torch.clamp(hz, min=min_log_hz) / min_log_hz) / logstep
    return torch.where(hz >= min_log_hz, log, lin)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    lin = f_sp * mel
    log = min_log_hz * torch.exp(logstep * (mel - min_log_mel))
    return torch.where(mel >= min_log_mel, log, lin)


def mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    f_min: float = F_MIN_HZ,
    f_max: float = F_MAX_HZ,
) -> torch.Tensor:
    """Triangular Slaney-normalised filters, shape ``(n_mels, n_fft // 2 + 1)``, float64."""
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_pts = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64))),
        n_mels + 2,
        dtype=torch.float64,
    )
    hz_pts = mel_to_hz(mel_pts)
    widths = torch.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    enorm = 2.0 / (hz_pts[2:] - hz_pts[:-2])  # equal area per filter
    return weights * enorm[:, None]


class LogMel(nn.Module):
    """``(batch, samples)`` float waveform at 16 kHz -> ``(batch, n_mels, frames)`` in dB.

    ``frames = 1 + samples // hop_length`` (centred STFT); for one 59,049-sample window
    that is :data:`rtagger.audio.decode.FRAMES_PER_WINDOW` = 231 frames.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        n_mels: int = N_MELS,
        f_min: float = F_MIN_HZ,
        f_max: float = F_MAX_HZ,
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.f_min = f_min
        self.f_max = f_max
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max).to(torch.float32)
        self.register_buffer("fbank", fb, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # The STFT runs in fp32 even under autocast: fp16 power spectra overflow/underflow.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()  # (B, n_fft//2+1, frames)
            mel = torch.matmul(self.fbank, power)  # (B, n_mels, frames)
            return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))

    def params(self) -> dict:
        """The parameters a checkpoint records so a loader can check it matches."""
        return {
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "f_min": self.f_min,
            "f_max": self.f_max,
            "window": "hann",
            "center": True,
            "scale": "power_db",
            "amin": AMIN,
        }


# --- Chroma: the pitch classes a window holds ---------------------------------------------
# The log-mel's 512-point STFT has 31 Hz bins: a semitone apart only above ~500 Hz, and the
# CNN pools frequency away. Key and mode need pitch, so a tagger can carry a chroma summary
# of each window beside its embedding, from a 4096-point STFT (3.9 Hz bins: a semitone
# apart from C2 up).
CHROMA_BINS = 12
CHROMA_N_FFT = 4096  # 256 ms at 16 kHz
CHROMA_HOP = 2048  # 29 frames per window
CHROMA_F_MIN_HZ = 65.41  # C2
CHROMA_F_MAX_HZ = 2093.0  # C7


def chroma_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = CHROMA_N_FFT,
                      f_min: float = CHROMA_F_MIN_HZ, f_max: float = CHROMA_F_MAX_HZ,
                      ) -> torch.Tensor:
    """``(12, n_fft // 2 + 1)`` float64: each STFT bin in ``[f_min, f_max]`` shared between
    its two nearest pitch classes (triangles one semitone wide; class 0 is C)."""
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    inside = (fft_hz >= f_min) & (fft_hz <= f_max)
    pitch = 12.0 * torch.log2(fft_hz.clamp(min=1.0) / 440.0) + 69.0  # MIDI note number
    classes = torch.arange(CHROMA_BINS, dtype=torch.float64)[:, None]
    dist = torch.remainder(pitch[None, :] - classes + 6.0, 12.0) - 6.0  # circular semitones
    return torch.clamp(1.0 - dist.abs(), min=0.0) * inside


class Chroma(nn.Module):
    """``(batch, samples)`` at 16 kHz -> ``(batch, 12)``: the window's pitch-class profile.

    STFT magnitudes (Hann, centred, reflect-padded) summed over the window's frames into
    pitch classes and normalised to sum 1 (all zeros for silence). No learned parameters.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = CHROMA_N_FFT,
                 hop_length: int = CHROMA_HOP) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        fb = chroma_filterbank(sample_rate, n_fft).to(torch.float32)
        self.register_buffer("fbank", fb, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(wave.float(), n_fft=self.n_fft, hop_length=self.hop_length,
                              window=self.window, center=True, pad_mode="reflect",
                              return_complex=True)
            return chroma_profile(self.fbank, spec.abs())


def chroma_profile(fbank: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``(batch, bins, frames)`` STFT magnitudes -> ``(batch, 12)`` normalised profile."""
    total = torch.matmul(fbank, magnitude).sum(dim=-1)  # (B, 12)
    return total / total.sum(dim=-1, keepdim=True).clamp(min=1e-6)


# --- Tempo: how often a window's onsets repeat ---------------------------------------------
# The CNN sees 3.69 s at once but has no reason to keep the beat period in its embedding
# (a ridge regression from it to bpm explains R^2 0.13 on the synthetic test songs), while
# the autocorrelation of the audio's onsets finds the tempo (docs/experiment.md section 4).
# So a tagger can carry that autocorrelation beside its embedding, read at log-spaced beat
# periods: a tempo change shows as a shifted profile between the windows before and after.
TEMPO_BINS = 16
TEMPO_MIN_BPM = 40.0
TEMPO_MAX_BPM = 240.0
TEMPO_RANGE_DB = 80.0  # mel cells more than this below the window's loudest are floored
ONSET_SMOOTHING = (1 / 9, 2 / 9, 3 / 9, 2 / 9, 1 / 9)


def tempo_lag_filters(frame_rate: float = SAMPLE_RATE / HOP_LENGTH, bins: int = TEMPO_BINS,
                      min_bpm: float = TEMPO_MIN_BPM, max_bpm: float = TEMPO_MAX_BPM,
                      ) -> tuple[list[int], torch.Tensor]:
    """Integer autocorrelation lags (mel frames) and ``(bins, lags)`` float64 weights.

    Bin ``k`` is a triangle in log-lag centred on the beat period of the ``k``-th of
    ``bins`` log-spaced tempi from ``max_bpm`` down to ``min_bpm`` (so lags grow with
    ``k``), reaching zero at its neighbours' centres; each bin's weights sum to 1.
    """
    log_lo = math.log(60.0 * frame_rate / max_bpm)
    log_hi = math.log(60.0 * frame_rate / min_bpm)
    step = (log_hi - log_lo) / (bins - 1)
    centres = torch.linspace(log_lo, log_hi, bins, dtype=torch.float64)
    lags = list(range(max(1, math.floor(math.exp(log_lo - step))),
                      math.ceil(math.exp(log_hi + step)) + 1))
    log_lags = torch.log(torch.tensor(lags, dtype=torch.float64))
    weights = torch.clamp(1.0 - (log_lags[None, :] - centres[:, None]).abs() / step, min=0.0)
    return lags, weights / weights.sum(dim=1, keepdim=True)


class Tempo(nn.Module):
    """``(batch, n_mels, frames)`` dB log-mel -> ``(batch, 16)``: the window's onset periodicity.

    The onset strength is the mean over bands of each frame's rise in dB (cells floored
    :data:`TEMPO_RANGE_DB` below the window's loudest), smoothed; its autocorrelation, normalised by
    its energy (1 at lag 0, all zeros without onsets), is averaged over each tempo bin of
    :func:`tempo_lag_filters`. No learned parameters and no STFT of its own: it reads the
    tagger's log-mel, with slices, sums and one matmul, so every engine exports it as is.
    """

    def __init__(self, frame_rate: float = SAMPLE_RATE / HOP_LENGTH) -> None:
        super().__init__()
        self.lags, weights = tempo_lag_filters(frame_rate)
        self.register_buffer("weights_t", weights.t().to(torch.float32).contiguous(),
                             persistent=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=mel.device.type, enabled=False):
            mel = mel.float()
            floor = mel.amax(dim=(1, 2), keepdim=True) - TEMPO_RANGE_DB
            mel = torch.maximum(mel, floor)
            onset = torch.relu(mel[:, :, 1:] - mel[:, :, :-1]).mean(dim=1)  # (B, frames - 1)
            # Smoothed (a 5-frame triangle, 80 ms) so that a beat period between two whole
            # lags still correlates.
            k = len(ONSET_SMOOTHING) - 1
            onset = sum(w * onset[:, i : onset.shape[1] - k + i]
                        for i, w in enumerate(ONSET_SMOOTHING))
            x = onset - onset.mean(dim=-1, keepdim=True)
            energy = (x * x).sum(dim=-1, keepdim=True).clamp(min=1e-6)
            acf = torch.stack([(x[:, :-lag] * x[:, lag:]).sum(dim=-1) for lag in self.lags],
                              dim=-1)
            return torch.matmul(acf / energy, self.weights_t)
