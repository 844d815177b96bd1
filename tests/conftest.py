"""Shared fixtures: generated signals, encoded audio files, tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.signals import music_like

# (extension, codec, encoder sample format); all are FFmpeg encoders that PyAV ships.
FORMATS = [
    ("wav", "pcm_s16le", "s16"),
    ("flac", "flac", "s16"),
    ("ogg", "vorbis", "fltp"),
    ("opus", "libopus", "fltp"),
    ("mp3", "libmp3lame", "fltp"),
    ("m4a", "aac", "fltp"),
]


def cli_with(register) -> typer.Typer:
    """A typer app holding the commands that ``register(app)`` adds (e.g. bench, export)."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keeps a single command a named subcommand
        pass

    return app


def write_audio(path: Path, samples: np.ndarray, sr: int, codec: str, sample_fmt: str,
                channels: int = 1) -> Path:
    """Encode ``samples`` ((n,) or (channels, n) float32) with PyAV's FFmpeg encoders."""
    import av

    layout = "mono" if channels == 1 else "stereo"
    planar = samples.reshape(channels, -1).astype(np.float32)
    opts = {"strict": "experimental"} if codec == "vorbis" else {}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sr, layout=layout, options=opts)
        stream.codec_context.options = opts
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, planar.shape[1], frame_size):
            chunk = planar[:, start : start + frame_size]
            if sample_fmt == "s16":
                data = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
            else:
                data = np.ascontiguousarray(chunk)
            frame = av.AudioFrame.from_ndarray(data, format=sample_fmt, layout=layout)
            frame.sample_rate = sr
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def song() -> np.ndarray:
    """9 s of music-like audio at 16 kHz: 2 full windows and a partial one."""
    return music_like(9.0)


@pytest.fixture(scope="session")
def encoded(tmp_path_factory, song) -> dict[str, Path]:
    """The same song encoded in every supported format (44.1 kHz stereo; opus at 48 kHz)."""
    import av

    d = tmp_path_factory.mktemp("encoded")
    files = {}
    for ext, codec, fmt in FORMATS:
        sr = 48_000 if codec == "libopus" else 44_100
        # Upsample mono, then duplicate the channel (an FFmpeg mono->stereo upmix would
        # scale by 1/sqrt(2)).
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=sr)
        frame = av.AudioFrame.from_ndarray(song[None, :], format="fltp", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = 0
        up = np.concatenate([f.to_ndarray() for f in resampler.resample(frame)]
                            + [f.to_ndarray() for f in resampler.resample(None)], axis=1)
        up = np.concatenate([up, up])
        files[ext] = write_audio(d / f"song.{ext}", up, sr, codec, fmt, channels=2)
    return files


@pytest.fixture(scope="session")
def debug_model():
    from rtagger.model.checkpoint import build_untrained

    return build_untrained("debug", seed=0)


def pretend_tensorrt_fails(monkeypatch, error: Exception, cache_dir) -> None:
    """Make TensorRT look installed for any device, with a compile that raises ``error``.

    TensorRT cannot be installed here; this runs the real TensorRTEngine constructor up to
    the compile (no engine in ``cache_dir``), as on a GPU whose compile fails.
    """
    import types

    from rtagger.engines import tensorrt_engine as trt

    monkeypatch.setattr(trt, "tensorrt_unavailable_reason", lambda device: None)
    monkeypatch.setattr(trt, "_torch_tensorrt", lambda: types.SimpleNamespace(
        __version__="0.0-test"))
    monkeypatch.setattr(trt, "tensorrt_version", lambda: "0.0-test")
    monkeypatch.setattr(trt.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setenv("RTAGGER_CACHE_DIR", str(cache_dir))

    def compile_fails(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(trt.TensorRTEngine, "_compile_and_save", compile_fails)


def toy_song(kind: str, seconds: float, seed: int) -> np.ndarray:
    """'piano': sustained tones; 'drums': noise bursts. Trivially separable."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if kind == "piano":
        f = 220 * 2 ** (rng.integers(0, 12) / 12)
        x = 0.3 * np.sin(2 * np.pi * f * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    else:
        x = np.zeros(n)
        for s in range(0, n, SAMPLE_RATE // 4):
            x[s : s + 800] = rng.uniform(-0.5, 0.5, min(800, n - s))
    return x.astype(np.float32)


def _have_synth_tools() -> bool:
    """mido, MMA's groove library, mma, fluidsynth and the two GM soundfonts."""
    import shutil

    try:
        from rtagger.train.synth import grooves

        grooves.mma_lib_dir()
    except Exception:  # ModuleNotFoundError (mido) or SynthError (no MMA library)
        return False
    return (shutil.which("mma") is not None and shutil.which("fluidsynth") is not None
            and all(p.is_file() for p in grooves.default_soundfonts()))


needs_synth_tools = pytest.mark.skipif(
    not _have_synth_tools(),
    reason="apt packages mma fluidsynth fluid-soundfont-gm timgm6mb-soundfont (and mido)")
