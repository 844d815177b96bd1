"""Training augmentation: every transform measured on generated signals (tones, clicks, noise).

Signals are built so each property can be checked against the parameters the module drew
(``return_params=True``): SNR, gain, cutoff, semitones, echo times.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtagger.audio.decode import N_MELS, SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import ConfigError
from rtagger.train.fit.augment import WAVE_TRANSFORMS, Augment, AugmentConfig, SpecMask

SR = SAMPLE_RATE


def only(name: str, **overrides) -> AugmentConfig:
    """Just one transform, always applied."""
    return dataclasses.replace(AugmentConfig.none(), **{f"{name}_p": 1.0}, **overrides)


def tone(hz: float | list[float], n: int = WINDOW_SAMPLES, amp: float = 0.3) -> torch.Tensor:
    """``(len(hz), n)`` sines, one frequency per row."""
    hz = torch.tensor([hz] if isinstance(hz, (int, float)) else hz, dtype=torch.float64)
    t = torch.arange(n, dtype=torch.float64) / SR
    return (amp * torch.sin(2 * math.pi * hz[:, None] * t)).float()


def clicks(n: int = WINDOW_SAMPLES, period: int = SR // 2, first: int = 4000) -> torch.Tensor:
    x = torch.zeros(n)
    x[first::period] = 0.9
    return x


def hard_batch(n: int = WINDOW_SAMPLES) -> torch.Tensor:
    """Silence, full-scale noise, a click train, a tone, a constant and a square wave."""
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(n, generator=g) * 2 - 1
    return torch.stack([torch.zeros(n), noise, clicks(n), tone(440.0, n)[0],
                        torch.full((n,), 0.99), torch.sign(tone(50.0, n)[0])])


def db(x: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(x.double().square().mean(dim=-1) + 1e-30)


def band_db(y: torch.Tensor, hz: float) -> torch.Tensor:
    """Level of the ``hz`` component per row: dB of the FFT magnitude at that bin."""
    spec = torch.fft.rfft(y.double() * torch.hann_window(y.shape[-1], dtype=torch.float64))
    k = round(hz * y.shape[-1] / SR)
    return 20 * torch.log10(spec[:, k - 2 : k + 3].abs().amax(dim=-1) + 1e-30)


def peak_hz(y: torch.Tensor) -> torch.Tensor:
    n = 4 * y.shape[-1]  # zero padding: 0.07 Hz bins
    spec = torch.fft.rfft(y.double() * torch.hann_window(y.shape[-1], dtype=torch.float64), n)
    return spec.abs().argmax(dim=-1) * SR / n


@pytest.mark.parametrize("name", WAVE_TRANSFORMS)
def test_each_transform_keeps_shape_dtype_and_is_finite(name):
    x = hard_batch()
    y, params = Augment(only(name), seed=0)(x, return_params=True)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()
    assert y.abs().max() <= 1.0 + 1e-6  # clip guard
    assert params[name]["applied"].all()
    assert torch.equal(y[0], x[0]) or (name in ("pitch",) and y[0].abs().max() == 0)


def test_everything_at_once_float64_and_half():
    config = dataclasses.replace(AugmentConfig(), **{
        f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")})
    x = hard_batch(8000)
    for dtype in (torch.float64, torch.bfloat16):
        y = Augment(config, seed=3)(x.to(dtype))
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.isfinite(y).all() and y.abs().max() <= 1.0
        assert (y[0] == 0).all()  # silence stays silent: noise follows the example's RMS


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_any_valid_config_gives_finite_bounded_audio(data):
    """Random valid configs (every range edge reachable) on hard signals: finite, in [-1, 1]."""
    values = {}
    for f in dataclasses.fields(AugmentConfig):
        if f.name.endswith("_p"):
            values[f.name] = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    for name, (lo, hi) in {"pitch_max_semitones": (0.0, 12.0), "noise_snr_min_db": (-20, 0),
                           "gain_max_db": (6.0, 24.0), "reverb_rt60_max_s": (1.5, 4.0),
                           "delay_feedback_max": (0.5, 0.95), "lowpass_min_hz": (50, 2000),
                           "highpass_max_hz": (400, 8000)}.items():
        values[name] = data.draw(st.floats(lo, hi))
    x = hard_batch(3000)
    y = Augment(AugmentConfig(**values), seed=data.draw(st.integers(0, 2**31)))(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() <= 1.0


def test_same_seed_same_output_and_generator_argument():
    x = hard_batch(16000)
    config = dataclasses.replace(AugmentConfig(), **{
        f.name: 0.7 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")})
    a, b = Augment(config, seed=5)(x), Augment(config, seed=5)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, Augment(config, seed=6)(x))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(Augment(config)(x, generator=g1), Augment(config)(x, generator=g2))


def test_noise_snr_matches_drawn_value():
    x = tone([110.0, 220.0, 440.0, 880.0, 1760.0, 3520.0], n=16000, amp=0.2)
    aug = Augment(only("noise", noise_snr_min_db=0.0, noise_snr_max_db=30.0), seed=0)
    y, params = aug(x, return_params=True)
    snr = db(x) - db(y - x)
    assert torch.allclose(snr, params["noise"]["snr_db"].double(), atol=1.0)
    beta = params["noise"]["beta"]
    assert beta.min() >= 0.0 and beta.max() <= 2.0 and beta.std() > 0.1  # mixed colours


def test_noise_colour_slope():
    x = tone([1000.0] * 2, n=16000, amp=0.3)
    aug = Augment(only("noise", noise_beta_min=2.0, noise_beta_max=2.0), seed=0)
    brown = aug(x) - x
    white = Augment(only("noise", noise_beta_max=0.0), seed=0)(x) - x
    spec = torch.fft.rfft(torch.cat([brown, white]).double()).abs().square()
    bins = spec.shape[-1] * 2 * torch.tensor([100.0, 200.0, 3200.0, 6400.0]) / SR
    level = torch.stack([spec[:, int(k) - 50 : int(k) + 50].mean(-1) for k in bins], -1)
    slope = 10 * torch.log10(level[:, 3] / level[:, 0]) / 6  # dB per octave, 100 -> 6400 Hz
    assert slope[:2].sub(-6.0).abs().max() < 1.5  # brown: -6 dB/octave
    assert slope[2:].abs().max() < 1.5  # white: flat


def test_gain_is_the_drawn_db_and_clip_guard_rescales():
    x = tone([200.0, 300.0, 400.0, 500.0], amp=0.05)
    y, params = Augment(only("gain", gain_min_db=-20.0, gain_max_db=20.0), seed=0)(
        x, return_params=True)
    measured = db(y) - db(x)
    assert torch.allclose(measured, params["gain"]["db"].double(), atol=1e-3)
    loud = Augment(only("gain", gain_min_db=20.0, gain_max_db=20.0), seed=0)(10 * x)
    assert torch.allclose(loud.abs().amax(-1), torch.ones(4))  # rescaled, not clipped
    assert torch.allclose(loud / 2, x * 10, atol=1e-3)  # ... so the waveform shape is kept


def test_polarity():
    x = hard_batch(4000)
    assert torch.equal(Augment(only("polarity"), seed=0)(x), -x)


@pytest.mark.parametrize("kind,cutoff,passed,stopped", [
    ("lowpass", 2000.0, 1000.0, 4000.0), ("highpass", 400.0, 1600.0, 100.0)])
def test_filters_pass_below_and_stop_above_cutoff(kind, cutoff, passed, stopped):
    x = tone([passed, stopped], n=16000)
    config = only(kind, **{f"{kind}_min_hz": cutoff, f"{kind}_max_hz": cutoff})
    y = Augment(config, seed=0)(x)
    assert (band_db(y, passed) - band_db(x, passed))[0].abs() < 0.5
    assert (band_db(y, stopped) - band_db(x, stopped))[1] < -20.0  # order 4: -24 dB/octave


def test_random_lowpass_cutoffs_are_per_example():
    x = tone([6500.0] * 4, n=16000)
    y, params = Augment(only("lowpass", lowpass_min_hz=2000.0, lowpass_max_hz=6000.0),
                        seed=0)(x, return_params=True)
    cutoff = params["lowpass"]["cutoff_hz"].double()
    expected = -10 * torch.log10(1 + (6500.0 / cutoff) ** 8)  # the Butterworth-4 magnitude
    assert torch.allclose(band_db(y, 6500.0) - band_db(x, 6500.0), expected, atol=0.5)


def test_pitch_shift_moves_a_tone_and_keeps_length():
    x = tone([440.0] * 6, n=16000)
    y, params = Augment(only("pitch", pitch_max_semitones=4.0), seed=0)(x, return_params=True)
    assert y.shape == x.shape
    semitones = params["pitch"]["semitones"].double()
    assert semitones.abs().max() > 1.0  # a real shift was tested
    expected = 440.0 * 2 ** (semitones / 12)
    assert ((peak_hz(y) - expected).abs() / expected).max() < 0.02


def test_pitch_shift_keeps_click_positions_and_tempo():
    n = WINDOW_SAMPLES
    x = clicks(n).repeat(4, 1)  # 120 BPM, 7 clicks
    y, params = Augment(only("pitch", pitch_max_semitones=3.0), seed=0)(x, return_params=True)
    assert params["pitch"]["semitones"].abs().max() > 1.0
    frame = 32  # 2 ms energy frames
    energy = y.double().square().unfold(-1, frame, frame).sum(-1)
    starts = torch.arange(4000, n - 2000, SR // 2)
    centroids = []
    for s in starts.tolist():  # energy centre of each click (the vocoder spreads it)
        lo, hi = (s - 1600) // frame, (s + 1600) // frame
        seg = energy[:, lo:hi]
        pos = (torch.arange(lo, hi, dtype=torch.float64) + 0.5) * frame
        centroids.append((seg * pos).sum(-1) / seg.sum(-1))
    centroids = torch.stack(centroids, -1)
    error_ms = (centroids - starts) * 1000 / SR
    # A 64 ms vocoder frame smears a click by about one 16 ms log-mel hop (15 ms at worst
    # over 30 seeds); the clicks do not drift, so the beat period (tempo) is kept to < 0.6%.
    assert error_ms.abs().max() < 20.0 and error_ms.abs().mean() < 10.0
    period_ms = (centroids[:, -1] - centroids[:, 0]) / (len(starts) - 1) * 1000 / SR
    assert (period_ms - 500.0).abs().max() < 3.0


def test_delay_puts_echoes_at_the_drawn_time():
    x = torch.zeros(2, 8000)
    x[:, 100] = 0.5
    config = only("delay", delay_min_ms=100.0, delay_max_ms=100.0, delay_feedback_min=0.5,
                  delay_feedback_max=0.5, delay_mix_min=0.4, delay_mix_max=0.4)
    y = Augment(config, seed=0)(x)
    expected = x.clone()
    expected[:, 1700], expected[:, 3300], expected[:, 4900], expected[:, 6500] = (
        0.2, 0.1, 0.05, 0.025)
    assert torch.allclose(y, expected, atol=1e-5)


def test_reverb_lengthens_the_decay():
    x = torch.zeros(4, 40000)  # room for the default 1.5 s RT60 after the click
    x[:, 8000] = 0.9
    y, params = Augment(only("reverb", reverb_mix_min=0.3), seed=0)(x, return_params=True)
    tail = slice(8000 + SR // 50, 8000 + SR // 5)  # 20..200 ms after the click
    assert (y[:, tail].square().sum(-1) > 1e-3 * y.square().sum(-1)).all()
    assert y[:, :8000].abs().max() < 1e-6  # causal: nothing before the click (FFT round-off)
    # The wet part is the impulse response: its energy after 100 ms follows the drawn RT60.
    mix, rt60 = params["reverb"]["mix"][:, None], params["reverb"]["rt60_s"].double()
    ir = (y - (1 - mix) * x)[:, 8000:].double() / mix
    late = ir[:, SR // 10 :].square().sum(-1) / ir.square().sum(-1)
    expected = torch.exp(-2 * math.log(1000.0) * 0.1 / rt60)
    assert (10 * torch.log10(late / expected)).abs().max() < 1.0


def test_probability_zero_is_exactly_the_identity():
    x = hard_batch(8000)
    assert torch.equal(Augment(AugmentConfig.none(), seed=0)(x), x)
    mel = torch.randn(3, N_MELS, 50)
    assert torch.equal(SpecMask(AugmentConfig.none(), seed=0)(mel), mel)


def test_examples_are_augmented_independently():
    x = tone([300.0 + 10 * i for i in range(64)], n=1024, amp=0.1)
    config = dataclasses.replace(AugmentConfig(), **{
        f.name: 0.5 if f.name in ("gain_p", "noise_p") else 0.0
        for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")})
    config = dataclasses.replace(config, gain_min_db=-6.0, gain_max_db=-3.0)
    y, params = Augment(config, seed=0)(x, return_params=True)
    changed = (y != x).any(dim=-1)
    for name in ("gain", "noise"):
        assert 20 <= int(params[name]["applied"].sum()) <= 44
    assert torch.equal(changed, params["gain"]["applied"] | params["noise"]["applied"])
    assert torch.equal(y[~changed], x[~changed])


def test_specmask_masks_spans_with_the_mean():
    mel = torch.randn(8, N_MELS, 231) * 10 - 40
    config = only("time_mask", time_mask_count=2, time_mask_max_frames=30,
                  freq_mask_p=1.0, freq_mask_count=1, freq_mask_max_bands=20)
    out, params = SpecMask(config, seed=0)(mel, return_params=True)
    assert out.shape == mel.shape and torch.isfinite(out).all()
    masked = out != mel
    t_mask, f_mask = params["time"]["mask"], params["freq"]["mask"]
    assert torch.equal(masked, t_mask[:, None, :] | f_mask[:, :, None])
    assert t_mask.sum(-1).max() <= 60 and f_mask.sum(-1).max() <= 20 and masked.any()
    fill = mel.mean(dim=(1, 2))
    assert torch.allclose(out[masked], fill[:, None, None].expand_as(mel)[masked])
    assert torch.equal(SpecMask(config, seed=0)(mel), out)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="batch, samples"):
        Augment()(torch.zeros(10))
    with pytest.raises(ValueError, match="n_mels"):
        SpecMask()(torch.zeros(2, 10))


def test_config_from_dict_and_validation():
    assert AugmentConfig.from_dict({}) == AugmentConfig()
    cfg = AugmentConfig.from_dict({"gain_p": 1, "gain_min_db": -6, "time_mask_count": 3})
    assert cfg.gain_p == 1.0 and isinstance(cfg.gain_min_db, float)
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    assert all(getattr(AugmentConfig.none(), f.name) == 0.0
               for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p"))
    with pytest.raises(ConfigError, match=r"gain_mn_db \(did you mean gain_min_db\?\)"):
        AugmentConfig.from_dict({"gain_mn_db": -3})
    with pytest.raises(ConfigError, match="above"):
        AugmentConfig.from_dict({"noise_snr_min_db": 30, "noise_snr_max_db": 10})
    for bad in ({"pitch_p": 1.5}, {"lowpass_max_hz": 9000}, {"delay_feedback_max": 1.0},
                {"reverb_rt60_min_s": float("nan")}, {"gain_p": "0.5"}, {"noise_p": True},
                {"time_mask_count": 1.5}):
        with pytest.raises(ValueError):  # ConfigError is a ValueError
            AugmentConfig.from_dict(bad)
