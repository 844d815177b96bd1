"""Decoding: every listed codec, downmix/resample, URLs, and bad input errors."""

from __future__ import annotations

import functools
import http.server
import threading
import wave

import numpy as np
import pytest
from conftest import FORMATS, write_audio

from rtagger.audio.decode import SAMPLE_RATE, Resampler, iter_audio, load_audio
from rtagger.errors import AudioError


@pytest.mark.parametrize("ext", [f[0] for f in FORMATS])
def test_every_format_decodes_to_the_same_16k_mono_signal(encoded, song, ext):
    x = load_audio(encoded[ext])
    assert x.dtype == np.float32 and x.ndim == 1
    # Codecs add up to a few ms of priming/padding; the length must still match to 30 ms.
    assert abs(len(x) - len(song)) < 0.03 * SAMPLE_RATE
    # Align by cross-correlation (codec delay), then compare the waveforms.
    n = min(len(x), len(song)) - 2000
    lags = range(-1200, 1201, 1) if ext in ("mp3", "m4a", "opus") else [0]
    best = max(lags, key=lambda lag: float(np.dot(x[1200 + lag : 1200 + lag + 8000],
                                                 song[1200 : 9200])))
    a = x[1200 + best : 1200 + best + n - 2400]
    b = song[1200 : 1200 + len(a)]
    snr_db = 10 * np.log10(np.sum(b**2) / np.sum((a - b) ** 2))
    # Lossless: limited by two resamplings near Nyquist (~31 dB measured); lossy: codec noise.
    assert snr_db > (25 if ext in ("wav", "flac") else 8), f"{ext}: SNR {snr_db:.1f} dB"


def test_iter_audio_blocks_concatenate_to_load_audio(encoded):
    blocks = list(iter_audio(encoded["flac"]))
    assert len(blocks) > 5
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(encoded["flac"]))


def test_stereo_is_averaged_to_mono(tmp_path):
    left = np.full(16000, 0.5, np.float32)
    right = np.full(16000, -0.1, np.float32)
    p = write_audio(tmp_path / "st.wav", np.stack([left, right]), SAMPLE_RATE, "pcm_s16le",
                    "s16", channels=2)
    x = load_audio(p)
    np.testing.assert_allclose(x[100:-100], 0.2, atol=1e-3)


def test_resampler_output_does_not_depend_on_block_sizes():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, (2, 44_100)).astype(np.float32)
    whole = Resampler(44_100, 2)
    ref = np.concatenate([whole(x), whole.flush()])
    cut = Resampler(44_100, 2)
    pieces, pos = [], 0
    for size in rng.integers(1, 3000, 100):
        pieces.append(cut(x[:, pos : pos + size]))
        pos += size
    pieces.append(cut(x[:, pos:]))
    pieces.append(cut.flush())
    got = np.concatenate(pieces)
    assert abs(len(got) - 16_000) <= 2
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_resampler_takes_interleaved_int16():
    r = Resampler(SAMPLE_RATE, channels=2)
    pcm = np.array([1000, 3000, -2000, 0], np.int16)
    np.testing.assert_allclose(r(pcm), [2000 / 32768, -1000 / 32768], rtol=1e-6)
    with pytest.raises(AudioError, match="multiple of 2 channels"):
        r(np.zeros(3, np.int16))


def test_http_url_is_decoded(encoded, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(encoded["ogg"].parent))

    class Quiet(handler.func):  # type: ignore[name-defined]
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(encoded["ogg"].parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/song.ogg"
        np.testing.assert_array_equal(load_audio(url), load_audio(encoded["ogg"]))
        with pytest.raises(AudioError, match=r"missing\.ogg"):
            load_audio(f"http://127.0.0.1:{server.server_address[1]}/missing.ogg")
    finally:
        server.shutdown()


# --- bad input -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.mp3"
    p.write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load_audio(p)


def test_directory(tmp_path):
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_text_file_is_not_audio(tmp_path):
    p = tmp_path / "notes.mp3"
    p.write_text("these are not the samples you are looking for\n" * 50)
    with pytest.raises(AudioError) as e:
        load_audio(p)
    assert "notes.mp3" in str(e.value)


def test_video_without_audio_stream(tmp_path):
    import av

    p = tmp_path / "silent.mkv"
    with av.open(str(p), "w") as c:
        s = c.add_stream("ffv1", rate=5)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        for i in range(3):
            f = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            f.pts = i
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(p)


def test_truncated_wav_is_reported(tmp_path, song):
    p = tmp_path / "full.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((song * 32767).astype(np.int16).tobytes())
    data = p.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])  # header still promises the full length
    with pytest.raises(AudioError, match="truncated"):
        load_audio(cut)
    assert len(load_audio(cut, check_truncation=False)) == pytest.approx(len(song) / 2, rel=0.01)


def test_nan_samples_are_rejected(tmp_path):
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    p = write_audio(tmp_path / "nan.wav", x, SAMPLE_RATE, "pcm_f32le", "flt")
    with pytest.raises(AudioError, match="non-finite"):
        load_audio(p)
    with pytest.raises(AudioError, match="non-finite"):
        Resampler(SAMPLE_RATE)(np.array([0.0, np.inf], np.float32))


def test_bad_resampler_settings():
    with pytest.raises(AudioError, match="sample rate"):
        Resampler(0)
    with pytest.raises(AudioError, match="channels"):
        Resampler(SAMPLE_RATE, channels=2)(np.zeros((3, 10), np.float32))


def test_truncated_flac_is_reported(tmp_path, song):
    p = write_audio(tmp_path / "full.flac", song, SAMPLE_RATE, "flac", "s16")
    data = p.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"truncated|decoding failed"):
        load_audio(cut)


def test_tags_in_another_encoding_do_not_stop_decoding(tmp_path):
    """Game soundtracks carry Vorbis comments in Latin-1 or Shift-JIS; the audio still decodes
    (PyAV's strict UTF-8 metadata decoding used to refuse such files)."""
    import av

    from rtagger.audio.decode import SAMPLE_RATE, load_audio
    from rtagger.audio.signals import music_like

    path = tmp_path / "cafe.flac"
    with av.open(str(path), "w", format="flac") as c:
        c.metadata["title"] = "caf\u00e9"
        s = c.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        x = (music_like(1.0) * 32767).astype("int16").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)
    data = path.read_bytes()
    assert data.count("caf\u00e9".encode()) == 1
    path.write_bytes(data.replace("caf\u00e9".encode(), b"caf\xe9 "))  # Latin-1, same length
    with pytest.raises(UnicodeDecodeError):
        av.open(str(path)).close()  # what PyAV does by default
    assert len(load_audio(path)) == SAMPLE_RATE
