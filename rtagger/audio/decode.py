"""Audio constants and decoding: any file or URL FFmpeg reads -> mono float32 PCM at 16 kHz.

Everything downstream (ring buffer, log-mel, models) works on mono float32 samples in
[-1, 1] at :data:`SAMPLE_RATE`. This module is the only place that turns encoded audio or
foreign sample rates into that form, through PyAV (FFmpeg bindings).

Two ways in:

- :func:`load_audio` decodes a whole file or URL into one array;
- :func:`iter_audio` yields PCM blocks as they are decoded (streaming a long file or an
  http/Icecast stream without holding it all);
- :class:`Resampler` converts arbitrary float/int PCM blocks (a sound card at 48 kHz, a
  websocket client) to the same form, keeping filter state across blocks.

Errors are :class:`~rtagger.errors.AudioError` naming the source and the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rtagger.errors import AudioError

# --- DSP constants (the single source of truth; everything else imports these) -----------
SAMPLE_RATE = 16_000  # Hz
WINDOW_SAMPLES = 59_049  # 3**10 samples: the short-chunk length of the tagging literature
WINDOW_S = WINDOW_SAMPLES / SAMPLE_RATE  # 3.69 s
N_FFT = 512  # samples (32 ms)
HOP_LENGTH = 256  # samples between mel frames (16 ms)
N_MELS = 128
F_MIN_HZ = 0.0
F_MAX_HZ = 8_000.0
FRAMES_PER_WINDOW = 1 + WINDOW_SAMPLES // HOP_LENGTH  # centred STFT frames per window
DEFAULT_LIVE_HOP_S = 1.0  # live streams: a fresh window every second

assert abs(WINDOW_S - 3.69) < 0.005
assert FRAMES_PER_WINDOW == 231
assert F_MAX_HZ <= SAMPLE_RATE / 2

_URL_SCHEMES = ("http://", "https://", "rtmp://", "rtsp://", "icecast://", "udp://", "tcp://")
# A decoded file shorter than its header promises by more than this is called truncated.
_TRUNCATION_TOLERANCE_S = 0.5


def is_url(source: str | Path) -> bool:
    return isinstance(source, str) and source.lower().startswith(_URL_SCHEMES)


def _av():
    # PyAV is a hard dependency, but importing it lazily keeps `import rtagger` light for
    # processes that only run the model (inference workers, export).
    import av

    return av


class Resampler:
    """Streaming conversion of PCM blocks to mono float32 at :data:`SAMPLE_RATE`.

    Feed ``(channels, samples)`` or ``(samples,)`` arrays (float in [-1, 1] or int16/int32)
    at ``sample_rate``; get mono float32 16 kHz blocks back. Channels are averaged (equal
    weight downmix). The FFmpeg resampler keeps its filter state between calls, so the
    output does not depend on how the input was cut into blocks. Call :meth:`flush` at the
    end of the stream for the samples still inside the filter.
    """

    def __init__(self, sample_rate: int, channels: int = 1, source: str = "<pcm>") -> None:
        if sample_rate <= 0 or sample_rate > 768_000:
            raise AudioError(source, f"unsupported sample rate {sample_rate} Hz")
        if channels <= 0 or channels > 64:
            raise AudioError(source, f"unsupported channel count {channels}")
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.source = source
        self._swr = None
        self._pts = 0
        if self.sample_rate != SAMPLE_RATE:
            av = _av()
            self._swr = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)

    def __call__(self, block: np.ndarray) -> np.ndarray:
        mono = _to_mono_float(block, self.channels, self.source)
        if self._swr is None or mono.size == 0:
            return mono  # already 16 kHz, or nothing to resample
        av = _av()
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += mono.size
        return _frames_to_mono(self._swr.resample(frame))

    def flush(self) -> np.ndarray:
        if self._swr is None:
            return np.zeros(0, np.float32)
        return _frames_to_mono(self._swr.resample(None))


def _to_mono_float(block: np.ndarray, channels: int, source: str) -> np.ndarray:
    """``(samples,)``, ``(channels, samples)`` or interleaved ints -> finite mono float32."""
    a = np.asarray(block)
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    elif a.dtype == np.int32:
        a = a.astype(np.float32) / 2147483648.0
    elif a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    else:
        raise AudioError(source, f"unsupported sample dtype {a.dtype}")
    if a.ndim == 2:
        if a.shape[0] != channels:
            raise AudioError(source, f"block has {a.shape[0]} channels, expected {channels}")
        a = a.mean(axis=0, dtype=np.float32)
    elif a.ndim != 1:
        raise AudioError(source, f"block must be 1-D or (channels, samples), got {a.shape}")
    elif channels > 1:
        if a.size % channels:
            raise AudioError(source, f"{a.size} interleaved samples is not a multiple "
                                     f"of {channels} channels")
        a = a.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    check_finite(a, source)
    return np.ascontiguousarray(a, dtype=np.float32)


def check_finite(samples: np.ndarray, source: str) -> None:
    """Reject NaN/inf: they would silently turn every tag of a window into NaN."""
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(source, f"{bad} non-finite (NaN/inf) samples")


def _frames_to_mono(frames) -> np.ndarray:
    if not frames:
        return np.zeros(0, np.float32)
    parts = [f.to_ndarray().reshape(-1) for f in frames]
    return np.concatenate(parts).astype(np.float32, copy=False)


def iter_audio(
    source: str | Path,
    *,
    timeout_s: float = 10.0,
    check_truncation: bool = True,
) -> Iterator[np.ndarray]:
    """Decode ``source`` (path or URL) and yield mono float32 blocks at 16 kHz as decoded.

    Blocks have whatever size the codec produces (typically 10-100 ms). Raises
    :class:`AudioError` for sources that cannot be opened, have no audio stream, decode to
    nothing, stop decoding early (truncated), or contain NaN/inf.
    """
    av = _av()
    name = str(source)
    if not is_url(source):
        path = Path(source)
        if not path.exists():
            raise AudioError(name, "no such file")
        if path.is_dir():
            raise AudioError(name, "is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(name, "empty file")
    try:
        container = av.open(name, mode="r", timeout=timeout_s, metadata_errors="replace")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise AudioError(name, f"cannot open as audio ({_reason(e)})") from e
    with container:
        streams = container.streams.audio
        if not streams:
            raise AudioError(name, "contains no audio stream")
        stream = streams[0]
        ctx = stream.codec_context
        rate = ctx.sample_rate or 0
        if rate <= 0:
            raise AudioError(name, "audio stream reports no sample rate")
        expected_s = _expected_duration(container, stream, name)
        resampler = av.AudioResampler(format="fltp", layout=None, rate=SAMPLE_RATE)
        produced = 0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    frame.pts = None  # we count samples ourselves; ignore broken timestamps
                    for out in resampler.resample(frame):
                        block = _downmix(out.to_ndarray(), name)
                        produced += block.size
                        yield block
            for out in resampler.resample(None):
                block = _downmix(out.to_ndarray(), name)
                produced += block.size
                yield block
        except av.error.FFmpegError as e:
            raise AudioError(name, f"decoding failed after {produced / SAMPLE_RATE:.2f} s "
                                   f"({_reason(e)})") from e
    if produced == 0:
        raise AudioError(name, "decoded to zero samples (empty or not audio)")
    if check_truncation and expected_s is not None:
        got_s = produced / SAMPLE_RATE
        if got_s < expected_s - max(_TRUNCATION_TOLERANCE_S, 0.02 * expected_s):
            raise AudioError(name, f"truncated: header promises {expected_s:.2f} s, "
                                   f"only {got_s:.2f} s could be decoded")


def _downmix(planar: np.ndarray, name: str) -> np.ndarray:
    mono = planar.mean(axis=0, dtype=np.float32) if planar.ndim == 2 else planar.astype(
        np.float32)
    check_finite(mono, name)
    return mono


def _expected_duration(container, stream, name: str) -> float | None:
    """Duration the file's header promises, when the format states one reliably.

    FFmpeg estimates WAV durations from the file size, which hides truncation, so the RIFF
    ``data`` chunk size is read directly; FLAC (STREAMINFO) and other formats with a
    declared length report it as the stream duration.
    """
    if container.format.name == "wav" and not is_url(name):
        return _wav_declared_duration(Path(name))
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _wav_declared_duration(path: Path) -> float | None:
    with path.open("rb") as f:
        return wav_declared_duration(f.read(WAV_HEAD_BYTES))


WAV_HEAD_BYTES = 1 << 16  # where a WAV file's fmt and data chunk headers must be


def wav_declared_duration(head: bytes) -> float | None:
    """Seconds the ``data`` chunk of a RIFF/WAVE file's first bytes declares (None: unset)."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None  # RF64/W64 and friends: no cheap declared length
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        cid, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if cid == b"fmt " and pos + 24 <= len(head):
            rate = int.from_bytes(head[pos + 12 : pos + 16], "little")
            block_align = int.from_bytes(head[pos + 20 : pos + 22], "little")
            fmt = (rate, block_align)
        elif cid == b"data":
            if fmt is None or fmt[0] == 0 or fmt[1] == 0 or size in (0, 0xFFFFFFFF):
                return None  # streamed WAVs leave the size unset
            return size / fmt[1] / fmt[0]
        pos += 8 + size + (size & 1)
    return None


def _reason(e: BaseException) -> str:
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg.strip()


def load_audio(source: str | Path, **kwargs) -> np.ndarray:
    """Decode a whole file or URL: returns ``(samples,)`` float32 mono at 16 kHz."""
    blocks = list(iter_audio(source, **kwargs))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def pcm_blocks(samples: np.ndarray, block_samples: int) -> Iterator[np.ndarray]:
    """Cut an in-memory signal into consecutive blocks (the last may be shorter)."""
    for start in range(0, len(samples), block_samples):
        yield samples[start : start + block_samples]
