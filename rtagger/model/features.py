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
