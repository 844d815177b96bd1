"""Batch augmentation for training: waveform transforms (:class:`Augment`) and log-mel masks.

The noisy-student recipe (Won et al., "Semi-supervised music tagging transformer", ISMIR
2021) trains the student on noised audio while the teacher labels the clean audio, so the
student must give the same tags under other mixing and recording conditions. Everything here
works on a whole batch with pure torch ops on the batch's device (the GPU when training has
one): each example draws its own Bernoulli "apply" flag and its own parameters, so one batch
mixes clean and augmented examples, and no example is processed in a Python loop.

Waveform transforms, ``(batch, samples)`` at 16 kHz, in the order :class:`Augment` applies
them (the chain from the performance to the listener's file):

- **pitch shift** by a uniform number of semitones in [-n, n], duration and tempo kept. Songs
  are played in any key and tuning; genre, mood and instrument tags do not depend on it.
  Phase vocoder in the STFT domain: output bin ``k`` takes the magnitude of input bin
  ``k / ratio`` and that bin's true frequency times ``ratio``, with the phase accumulated
  frame by frame. This is a time stretch and a resampling folded into one step: frames stay
  where they are, so the length is exact, onsets and tempo (slow/fast tags) do not move, and
  no resampler is needed (bins that would come from above Nyquist are zero: no aliasing).
  Like any phase vocoder it smears transients over about a frame (64 ms): a click's energy
  centre moves by up to ~15 ms (about one log-mel hop), and never drifts.
- **delay** (echo): the dry signal plus copies every ``d`` ms, scaled ``mix * feedback**i``,
  a common production effect that must not change the tags.
- **reverb**: convolution with a synthetic room, exponentially decaying Gaussian noise with a
  random RT60 (the time to fall by 60 dB), mixed with the dry signal; live and room
  recordings are reverberant, studio masters less so.
- **noise** at a random SNR, measured per example against its own RMS (silence gets none),
  with a random spectral slope, power ~ 1/f**beta: 0 white (hiss), 1 pink, 2 brown (rumble).
- **low-pass / high-pass**: zero-phase FFT filtering with a Butterworth-shaped magnitude
  (order 4, 24 dB/octave, smooth so the filter's impulse response is short), one random
  cutoff per example. Small speakers, phone microphones and low-bitrate codecs cut the ends
  of the spectrum. FFT filtering rather than biquads: one batched rfft/irfft pair for both
  filters at any per-example cutoff, where a recursive filter would loop over samples.
- **polarity inversion**: ``-x``. Inaudible and invisible to the log-mel front end (power
  spectra ignore the sign); kept for waveform front ends and parity with the literature.
- **gain** in dB: the same music arrives at any level.

Then a clip guard: any augmented example whose peak exceeds 1 is rescaled to peak 1 (a
uniform rescale, not a soft limiter, because a limiter adds distortion that is itself a
timbre change). Examples no transform touched are returned bit for bit.

:class:`SpecMask` masks random time spans and mel bands of ``(batch, n_mels, frames)`` dB
log-mels (SpecAugment), filling with the example's mean so masks carry no level cue; the
model must tag from partial evidence.

Reproducibility: pass a ``torch.Generator`` per call (e.g. seeded from the run seed and the
step, which makes a resumed run augment exactly like an uninterrupted one), or a ``seed`` to
the constructor. Same generator state and same input give the same output on one device.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rtagger.audio.decode import FRAMES_PER_WINDOW, N_MELS, SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import ConfigError

_PV_N_FFT = 1024  # phase vocoder: 64 ms frames resolve low notes ...
_PV_HOP = _PV_N_FFT // 4  # ... and 75% overlap keeps the phase advance estimate unambiguous
_FILTER_ORDER = 4  # Butterworth-like: 24 dB/octave, steep yet with a short impulse response
_FILTER_PAD = 4096  # zero padding so the (non-causal) filter response does not wrap around
_NOISE_FLOOR_HZ = 20.0  # below this brown/pink noise stops rising: no DC drift, no blow-up
_LN_1000 = math.log(1000.0)  # RT60: amplitude falls by 1000x (60 dB)
_EPS = 1e-12


@dataclass(frozen=True)
class AugmentConfig:
    """The ``[augment]`` table of a recipe: per-transform probability ``*_p`` and ranges.

    Every range is drawn uniformly per example. Defaults are the noisy-student strength;
    :meth:`none` turns everything off. Values are checked on construction.
    """

    pitch_p: float = 0.3
    pitch_max_semitones: float = 2.0
    delay_p: float = 0.2
    delay_min_ms: float = 60.0
    delay_max_ms: float = 400.0
    delay_feedback_min: float = 0.0
    delay_feedback_max: float = 0.5
    delay_mix_min: float = 0.1
    delay_mix_max: float = 0.5
    reverb_p: float = 0.3
    reverb_rt60_min_s: float = 0.2
    reverb_rt60_max_s: float = 1.5
    reverb_mix_min: float = 0.1
    reverb_mix_max: float = 0.5
    noise_p: float = 0.3
    noise_snr_min_db: float = 5.0
    noise_snr_max_db: float = 30.0
    noise_beta_min: float = 0.0  # power spectrum ~ 1/f**beta: 0 white, 1 pink, 2 brown
    noise_beta_max: float = 2.0
    lowpass_p: float = 0.25
    lowpass_min_hz: float = 2000.0
    lowpass_max_hz: float = 7000.0
    highpass_p: float = 0.25
    highpass_min_hz: float = 40.0
    highpass_max_hz: float = 400.0
    polarity_p: float = 0.0
    gain_p: float = 0.5
    gain_min_db: float = -12.0
    gain_max_db: float = 6.0
    # SpecMask (log-mel masks), (batch, n_mels, frames)
    time_mask_p: float = 0.5
    time_mask_count: int = 2
    time_mask_max_frames: int = 20  # 20 frames = 0.32 s at a 16 ms hop
    freq_mask_p: float = 0.5
    freq_mask_count: int = 2
    freq_mask_max_bands: int = 12

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want_int = f.type in ("int", int)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    want_int and not isinstance(value, int)):
                kind = "an integer" if want_int else "a number"
                raise ConfigError(f"augment.{f.name} must be {kind}, got {value!r}")
            key = f.name.replace("_min", "").replace("_max", "")
            lo, hi = (0.0, 1.0) if f.name.endswith("_p") else _BOUNDS[key]
            if not lo <= value <= hi:  # also rejects NaN
                raise ConfigError(f"augment.{f.name} = {value} is outside [{lo}, {hi}]")
            if not want_int:  # TOML writes 6 for 6.0; store floats so to_dict round-trips
                object.__setattr__(self, f.name, float(value))
        for name in self.__dataclass_fields__:
            if "_min" in name:
                top = name.replace("_min", "_max")
                if getattr(self, name) > getattr(self, top):
                    raise ConfigError(f"augment.{name} = {getattr(self, name)} is above "
                                      f"augment.{top} = {getattr(self, top)}")

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Build from a parsed ``[augment]`` table; unknown keys and bad values are errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"[augment] must be a table, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1))
                     else k for k in unknown]
            raise ConfigError(f"unknown [augment] keys: {', '.join(hints)}")
        return cls(**d)

    @classmethod
    def none(cls) -> AugmentConfig:
        """Every transform off: :class:`Augment` and :class:`SpecMask` are the identity."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.endswith("_p")})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Physical limits per value, keyed by field name without "_min"/"_max" (probabilities: [0, 1]).
_BOUNDS: dict[str, tuple[float, float]] = {
    "pitch_semitones": (0.0, 12.0), "delay_ms": (1.0, 1000.0), "delay_feedback": (0.0, 0.95),
    "delay_mix": (0.0, 1.0), "reverb_rt60_s": (0.05, 4.0), "reverb_mix": (0.0, 1.0),
    "noise_snr_db": (-20.0, 80.0), "noise_beta": (0.0, 2.0),
    "lowpass_hz": (50.0, SAMPLE_RATE / 2), "highpass_hz": (1.0, SAMPLE_RATE / 2),
    "gain_db": (-60.0, 24.0), "time_mask_count": (0, 10), "time_mask_frames": (0, 1000),
    "freq_mask_count": (0, 10), "freq_mask_bands": (0, N_MELS),
}

Params = dict[str, dict[str, Tensor]]


class _Randomised(nn.Module):
    """Holds the config and a default generator, created lazily on the first batch's device."""

    def __init__(self, config: AugmentConfig | None = None, seed: int | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else AugmentConfig()
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _pick_generator(self, device: torch.device, generator: torch.Generator | None
                        ) -> torch.Generator:
        if generator is not None:
            return generator
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        return self._generator


def _rand(g: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    # Drawn where the generator lives, then moved: a CPU generator still works for GPU batches.
    return torch.rand(shape, generator=g, device=g.device).to(device)


def _uniform(g: torch.Generator, lo: float, hi: float, n: int, device: torch.device) -> Tensor:
    return lo + (hi - lo) * _rand(g, (n,), device)


def _flip(g: torch.Generator, p: float, n: int, device: torch.device) -> Tensor:
    # rand is in [0, 1): p = 0 never applies and p = 1 always does.
    return _rand(g, (n,), device) < p


def _on_subset(x: Tensor, on: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``fn(x[idx], idx)`` for the examples flagged ``on``; the others are left untouched."""
    idx = torch.nonzero(on).squeeze(1)
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = fn(x[idx], idx)
    return out


def _rms(x: Tensor) -> Tensor:
    """Per-example RMS, ``(batch, samples) -> (batch, 1)``."""
    return x.square().mean(dim=-1, keepdim=True).sqrt()


def _fast_len(n: int) -> int:
    """FFT size for ``n`` samples: the next power of two, fast on every backend."""
    return 1 << (n - 1).bit_length()


def fft_convolve(x: Tensor, ir: Tensor) -> Tensor:
    """Linear convolution of ``(batch, samples)`` with ``(batch, taps)``, cut to ``samples``."""
    n = x.shape[-1]
    size = _fast_len(n + ir.shape[-1] - 1)
    spec = torch.fft.rfft(x, size) * torch.fft.rfft(ir, size)
    return torch.fft.irfft(spec, size)[..., :n]


def pitch_shift(x: Tensor, semitones: Tensor) -> Tensor:
    """Shift ``(batch, samples)`` by ``(batch,)`` semitones; length, onsets and RMS kept."""
    n = x.shape[-1]
    # The end frames see the signal start abruptly and have fewer neighbours to overlap, so
    # their (inconsistent) modified spectra can spike: a frame of silence on each side takes
    # that, and is cut off again. (Reflect padding would put a kink there: worse.)
    pad = _PV_N_FFT
    window = torch.hann_window(_PV_N_FFT, device=x.device, dtype=x.dtype)
    padded = torch.nn.functional.pad(x[:, None], (pad, pad), mode="constant")[:, 0]
    spec = torch.stft(padded, _PV_N_FFT, _PV_HOP, window=window, return_complex=True)
    n_bins = spec.shape[1]
    ratio = torch.exp2(semitones / 12.0)[:, None]  # (B, 1)
    bins = torch.arange(n_bins, device=x.device, dtype=x.dtype)
    src = bins / ratio  # (B, F): the input bin each output bin reads from
    lo = src.floor().clamp(max=n_bins - 1)
    frac = (src - lo)[..., None]
    lo = lo.long()
    hi = (lo + 1).clamp(max=n_bins - 1)
    near = src.round().clamp(max=n_bins - 1).long()

    def take(a: Tensor, index: Tensor) -> Tensor:
        return a.gather(1, index[..., None].expand(-1, -1, a.shape[-1]))

    mag = spec.abs()
    mag = (take(mag, lo) * (1 - frac) + take(mag, hi) * frac) * (src <= n_bins - 1)[..., None]
    # True phase advance per hop of each input bin: expected advance of the bin centre plus
    # the measured deviation, wrapped to (-pi, pi].
    phase = spec.angle()
    expected = (2 * math.pi * _PV_HOP / _PV_N_FFT) * bins[:, None]  # (F, 1)
    dev = torch.diff(phase, dim=-1) - expected
    advance = expected + dev - 2 * math.pi * torch.round(dev / (2 * math.pi))
    # Scaling the frequency by `ratio` scales the advance; wrapping before the running sum
    # keeps the accumulated phase small, so float32 stays accurate over long windows.
    step = torch.remainder(take(advance, near) * ratio[..., None] + math.pi, 2 * math.pi) - math.pi
    out_phase = take(phase[..., :1], near) + torch.cat(
        [torch.zeros_like(step[..., :1]), torch.cumsum(step, dim=-1)], dim=-1)
    y = torch.istft(torch.polar(mag, out_phase), _PV_N_FFT, _PV_HOP, window=window,
                    length=n + 2 * pad)[:, pad : pad + n]
    return y * (_rms(x) / (_rms(y) + _EPS))


def coloured_noise(g: torch.Generator, beta: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """Unit-RMS noise ``(len(beta), n)`` with power spectrum ~ 1/f**beta per example."""
    white = torch.randn((beta.shape[0], n), generator=g, device=g.device, dtype=dtype)
    white = white.to(beta.device)
    freqs = torch.fft.rfftfreq(n, 1.0 / SAMPLE_RATE, device=beta.device, dtype=dtype)
    shape = (freqs.clamp(min=_NOISE_FLOOR_HZ) / 1000.0) ** (-beta[:, None] / 2)
    shape[:, 0] = 0.0  # no DC offset
    noise = torch.fft.irfft(torch.fft.rfft(white) * shape, n)
    return noise / (_rms(noise) + _EPS)


def filter_response(freqs: Tensor, lowpass_hz: Tensor, highpass_hz: Tensor) -> Tensor:
    """Zero-phase magnitude ``(batch, bins)``; ``inf`` low-pass / ``0`` high-pass = no filter."""
    f = freqs.clamp(min=1.0)  # (F,); a 0 Hz high-pass response is then ~0, not 0/0
    lp = 1.0 / torch.sqrt(1.0 + (f / lowpass_hz[:, None]) ** (2 * _FILTER_ORDER))
    hp = 1.0 / torch.sqrt(1.0 + (highpass_hz[:, None] / f) ** (2 * _FILTER_ORDER))
    return lp * hp


class Augment(_Randomised):
    """Random waveform augmentation of ``(batch, samples)`` float audio at 16 kHz.

    ``forward(wave, generator=None, return_params=False)`` returns a tensor of the input's
    shape, dtype and device (and with ``return_params`` the drawn parameters: per transform
    an ``applied`` bool mask ``(batch,)`` and its values ``(batch,)`` in the units of the
    config fields). Computation runs in float32 (float64 for float64 input), autocast off.
    """

    def forward(self, wave: Tensor, generator: torch.Generator | None = None,
                return_params: bool = False) -> Tensor | tuple[Tensor, Params]:
        if wave.ndim != 2 or not wave.is_floating_point():
            raise ValueError(f"expected a float (batch, samples) tensor, got {wave.dtype} "
                             f"{tuple(wave.shape)}")
        g = self._pick_generator(wave.device, generator)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            out, params = self._chain(wave, g)
        return (out, params) if return_params else out

    def _chain(self, wave: Tensor, g: torch.Generator) -> tuple[Tensor, Params]:
        c, dev = self.config, wave.device
        b, n = wave.shape
        x = wave.to(torch.promote_types(wave.dtype, torch.float32))
        p: Params = {}

        def draw(name: str, prob: float, **ranges: tuple[float, float]) -> Tensor:
            on = _flip(g, prob, b, dev)
            p[name] = {"applied": on} | {k: _uniform(g, lo, hi, b, dev).to(x.dtype)
                                         for k, (lo, hi) in ranges.items()}
            return on

        on = draw("pitch", c.pitch_p, semitones=(-c.pitch_max_semitones, c.pitch_max_semitones))
        x = _on_subset(x, on, lambda xs, i: pitch_shift(xs, p["pitch"]["semitones"][i]))

        on = draw("delay", c.delay_p, ms=(c.delay_min_ms, c.delay_max_ms),
                  feedback=(c.delay_feedback_min, c.delay_feedback_max),
                  mix=(c.delay_mix_min, c.delay_mix_max))
        x = _on_subset(x, on, lambda xs, i: fft_convolve(xs, self._echo_ir(p["delay"], i, n)))

        on = draw("reverb", c.reverb_p, rt60_s=(c.reverb_rt60_min_s, c.reverb_rt60_max_s),
                  mix=(c.reverb_mix_min, c.reverb_mix_max))
        x = _on_subset(x, on, lambda xs, i: self._reverb(xs, p["reverb"], i, g))

        on = draw("noise", c.noise_p, snr_db=(c.noise_snr_min_db, c.noise_snr_max_db),
                  beta=(c.noise_beta_min, c.noise_beta_max))
        x = _on_subset(x, on, lambda xs, i: self._noise(xs, p["noise"], i, g))

        lp_on = draw("lowpass", c.lowpass_p, cutoff_hz=(c.lowpass_min_hz, c.lowpass_max_hz))
        hp_on = draw("highpass", c.highpass_p, cutoff_hz=(c.highpass_min_hz, c.highpass_max_hz))
        x = _on_subset(x, lp_on | hp_on, lambda xs, i: self._filter(xs, p, i))

        x = _on_subset(x, draw("polarity", c.polarity_p), lambda xs, i: -xs)
        on = draw("gain", c.gain_p, db=(c.gain_min_db, c.gain_max_db))
        x = _on_subset(x, on, lambda xs, i: xs * 10.0 ** (p["gain"]["db"][i, None] / 20.0))

        touched = torch.stack([q["applied"] for q in p.values()]).any(dim=0)
        x = _on_subset(x, touched, lambda xs, i: xs / xs.abs().amax(-1, keepdim=True).clamp(
            min=1.0))
        return x.to(wave.dtype), p

    @staticmethod
    def _echo_ir(q: dict[str, Tensor], idx: Tensor, n: int) -> Tensor:
        """``(k, n)`` impulse responses: 1 at 0, ``mix * feedback**(i-1)`` at ``i * delay``."""
        delay = (q["ms"][idx] * (SAMPLE_RATE / 1000.0)).round().clamp(min=1).long()[:, None]
        taps = torch.arange(1, n // int(delay.min()) + 1, device=idx.device)
        pos = (taps * delay).clamp(max=n)  # echoes past the window land in a dropped column
        gains = q["mix"][idx, None] * q["feedback"][idx, None] ** (taps - 1)
        ir = torch.zeros(idx.numel(), n + 1, device=idx.device, dtype=gains.dtype)
        ir[:, 0] = 1.0
        ir.scatter_(1, pos, gains)
        return ir[:, :n]

    @staticmethod
    def _reverb(x: Tensor, q: dict[str, Tensor], idx: Tensor, g: torch.Generator) -> Tensor:
        rt60 = q["rt60_s"][idx, None]
        taps = min(x.shape[-1], math.ceil(float(rt60.max()) * SAMPLE_RATE))
        t = torch.arange(taps, device=x.device, dtype=x.dtype) / SAMPLE_RATE
        noise = torch.randn((idx.numel(), taps), generator=g, device=g.device, dtype=x.dtype)
        ir = noise.to(x.device) * torch.exp(-_LN_1000 * t / rt60)
        ir = ir / ir.square().sum(dim=-1, keepdim=True).sqrt()  # unit energy: level kept
        mix = q["mix"][idx, None]
        return (1 - mix) * x + mix * fft_convolve(x, ir)

    @staticmethod
    def _noise(x: Tensor, q: dict[str, Tensor], idx: Tensor, g: torch.Generator) -> Tensor:
        # Scaled to the example's own RMS, so the SNR is exact and silence stays silent.
        noise = coloured_noise(g, q["beta"][idx], x.shape[-1], x.dtype)
        return x + noise * _rms(x) * 10.0 ** (-q["snr_db"][idx, None] / 20.0)

    @staticmethod
    def _filter(x: Tensor, p: Params, idx: Tensor) -> Tensor:
        lp, hp = p["lowpass"], p["highpass"]
        lp_hz = torch.where(lp["applied"][idx], lp["cutoff_hz"][idx], math.inf)
        hp_hz = torch.where(hp["applied"][idx], hp["cutoff_hz"][idx], 0.0)
        n = x.shape[-1]
        size = _fast_len(n + _FILTER_PAD)
        freqs = torch.fft.rfftfreq(size, 1.0 / SAMPLE_RATE, device=x.device, dtype=x.dtype)
        spec = torch.fft.rfft(x, size) * filter_response(freqs, lp_hz, hp_hz)
        return torch.fft.irfft(spec, size)[..., :n]


class SpecMask(_Randomised):
    """SpecAugment time and frequency masks on ``(batch, n_mels, frames)`` dB log-mels.

    Per example, with probability ``time_mask_p`` it masks ``time_mask_count`` spans of
    0..``time_mask_max_frames`` frames (likewise bands), filling with the example's mean dB.
    """

    def forward(self, mel: Tensor, generator: torch.Generator | None = None,
                return_params: bool = False) -> Tensor | tuple[Tensor, Params]:
        if mel.ndim != 3 or not mel.is_floating_point():
            raise ValueError(f"expected a float (batch, n_mels, frames) tensor, got "
                             f"{mel.dtype} {tuple(mel.shape)}")
        c, dev = self.config, mel.device
        g = self._pick_generator(dev, generator)
        b, bands, frames = mel.shape
        t_on = _flip(g, c.time_mask_p, b, dev)
        t_mask = self._spans(g, c.time_mask_count, c.time_mask_max_frames, frames, b, dev)
        f_on = _flip(g, c.freq_mask_p, b, dev)
        f_mask = self._spans(g, c.freq_mask_count, c.freq_mask_max_bands, bands, b, dev)
        mask = (t_mask & t_on[:, None])[:, None, :] | (f_mask & f_on[:, None])[:, :, None]
        fill = mel.float().mean(dim=(1, 2), keepdim=True).to(mel.dtype)
        out = torch.where(mask, fill, mel)
        params = {"time": {"applied": t_on, "mask": t_mask},
                  "freq": {"applied": f_on, "mask": f_mask}}
        return (out, params) if return_params else out

    @staticmethod
    def _spans(g: torch.Generator, count: int, max_width: int, size: int, b: int,
               dev: torch.device) -> Tensor:
        """``(b, size)`` bool: the union of ``count`` random spans of 0..max_width cells."""
        width = (_rand(g, (b, count, 1), dev) * (min(max_width, size) + 1)).floor()
        start = (_rand(g, (b, count, 1), dev) * (size - width + 1)).floor()
        pos = torch.arange(size, device=dev)
        return ((pos >= start) & (pos < start + width)).any(dim=1)


def _only(name: str) -> AugmentConfig:
    return dataclasses.replace(AugmentConfig.none(), **{f"{name}_p": 1.0})


WAVE_TRANSFORMS = ("pitch", "delay", "reverb", "noise", "lowpass", "highpass", "polarity", "gain")


def benchmark(batch: int = 32, device: str = "cpu", repeats: int = 3) -> dict[str, float]:
    """Milliseconds per batch of ``batch`` windows for each transform at p = 1 (best of
    ``repeats``), for the default config (``"augment"``, one fixed draw of which examples
    get what) and for :class:`SpecMask` with both masks on."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    wave = 0.3 * torch.randn(batch, WINDOW_SAMPLES, generator=g, device=dev).clamp(-3, 3) / 3
    mel = torch.randn(batch, N_MELS, FRAMES_PER_WINDOW, generator=g, device=dev)
    jobs: dict[str, tuple[nn.Module, Tensor]] = {
        name: (Augment(_only(name)), wave) for name in WAVE_TRANSFORMS}
    jobs["augment"] = (Augment(AugmentConfig()), wave)
    jobs["specmask"] = (SpecMask(dataclasses.replace(AugmentConfig(), time_mask_p=1.0,
                                                     freq_mask_p=1.0)), mel)
    result = {}
    for name, (module, x) in jobs.items():
        best = math.inf
        for _ in range(repeats + 1):  # the first run warms up allocators and FFT plans
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            module(x, generator=torch.Generator(device=dev).manual_seed(1))  # the same draws
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - start)
        result[name] = round(1000.0 * best, 2)
    return result


def augmenters(table: dict) -> tuple[Augment | None, SpecMask | None]:
    """Waveform augmentation and log-mel masking from a recipe's ``[augment]`` table."""
    table = dict(table)
    if not table or not table.pop("enabled", True):
        return None, None
    cfg = AugmentConfig.from_dict(table)
    spec = SpecMask(cfg) if cfg.time_mask_p > 0 or cfg.freq_mask_p > 0 else None
    return Augment(cfg), spec


def augmented_logits(model: nn.Module, waves: Tensor, gen: torch.Generator,
                     augment: Augment | None, spec_mask: SpecMask | None) -> Tensor:
    """A window tagger's logits for ``(batch, samples)`` waves, augmented on the way in."""
    if augment is not None:
        waves = augment(waves, generator=gen)
    mask = None
    if spec_mask is not None:
        def mask(mel: Tensor) -> Tensor:
            return spec_mask(mel, generator=gen)
    logits, _ = model(waves, mel_transform=mask)
    return logits
