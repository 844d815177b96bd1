"""Progressive decoding of an uploaded file, Sans-I/O: encoded bytes in, 16 kHz mono PCM out.

An artist's upload arrives as the bytes of the file they chose (MP3, FLAC, Ogg Vorbis/Opus,
M4A, WAV), in order, in pieces of any size. :class:`ProgressiveDecoder` takes those pieces
(:meth:`~ProgressiveDecoder.feed`) and returns the PCM they complete, so tags can be shown
while the file is still uploading; :meth:`~ProgressiveDecoder.finish` decodes the rest.
No sockets, threads or temporary files: FFmpeg (PyAV) reads from a bounded in-memory
buffer, and only ever reads bytes that have arrived.

Same samples as a file on disk: demuxer and decoder are the ones
:func:`rtagger.audio.decode.iter_audio` opens for that file, and frames go through the same
resampling and downmix, so an upload's windows equal ``rtagger tag FILE``'s windows.

How it reads
    The demuxer reads packet by packet from the buffer and is only asked for the next
    packet while at least :data:`LOOKAHEAD_BYTES` (or four times the largest packet so far)
    are buffered beyond its read position, so it never reaches the end of what has arrived
    mid-packet. Bytes it has read are dropped: memory stays at the look-ahead plus one
    piece. Until the container is open (headers, stream parameters) every byte is kept; an
    open that needs more than has arrived is retried from byte 0 once twice as many bytes
    are there.

Not streamable
    An MP4/M4A whose index (``moov``) comes after the audio (``mdat``) cannot be decoded
    before its last byte. :attr:`~ProgressiveDecoder.streamable` turns False as soon as the
    box order shows it; the file is then kept in memory (within ``max_bytes``) and decoded
    whole, seekable, by :meth:`~ProgressiveDecoder.finish`.

Untrusted input
    Only the demuxers in :data:`DEMUXERS`, chosen from the file's first bytes (no FFmpeg
    format probing), and the audio decoders in :data:`DECODERS` are used; other streams
    (cover art, video) are never decoded, and FFmpeg may open no protocol (nothing it
    reads can make it fetch a URL or another file). At most ``max_bytes`` encoded bytes and
    ``max_duration_s`` seconds of decoded audio are accepted: a small file that would
    decode to hours of silence is stopped at the limit, with :class:`DecodedTooLong`.
    Truncated and corrupt files raise :class:`~rtagger.errors.AudioError` with the reason.
"""

from __future__ import annotations

import io
from collections import deque

import numpy as np

from rtagger.audio.decode import (
    _TRUNCATION_TOLERANCE_S,
    SAMPLE_RATE,
    WAV_HEAD_BYTES,
    _av,
    _downmix,
    _reason,
    wav_declared_duration,
)
from rtagger.errors import AudioError

# Container kind (from the first bytes) -> the FFmpeg demuxer that reads it.
DEMUXERS = {"wav": "wav", "flac": "flac", "ogg": "ogg", "mp3": "mp3", "mp4": "mov"}
# FFmpeg audio decoders an upload may use; anything else is refused before decoding.
DECODERS = frozenset({
    "mp3", "mp3float", "flac", "vorbis", "opus", "libopus", "aac", "alac",
    "pcm_u8", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le", "pcm_s32be",
    "pcm_f32le", "pcm_f32be", "pcm_f64le", "pcm_f64be", "pcm_alaw", "pcm_mulaw",
})
LOOKAHEAD_BYTES = 96 * 1024  # > one Ogg page (65,307 bytes) + one FFmpeg I/O buffer (32 KiB)
FIRST_OPEN_BYTES = 32 * 1024  # bytes before the first try to open the container
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # an hour of 24-bit 48 kHz stereo WAV is ~1 GiB
DEFAULT_MAX_DURATION_S = 2 * 3600.0
_IO_BUFFER_BYTES = 32 * 1024
# MP3 end trim (below): decoded samples held back, at the file's rate; more than the
# largest padding an Info tag can declare (4,095) plus one frame (1,152).
_MP3_HOLD_SAMPLES = 8192
_MP3_HEAD_BYTES = 64 * 1024  # after any ID3v2 tag: the first frame, with the Info tag
_ID3_HEADER_BYTES = 10


class NotAllowed(AudioError):
    """The upload is not one of the allowed containers, or needs a decoder not allowed."""


class UploadTooLarge(AudioError):
    """More encoded bytes than the decoder's ``max_bytes``."""


class DecodedTooLong(AudioError):
    """The file decodes to more audio than the decoder's ``max_duration_s``."""


class _Received:
    """The file object FFmpeg reads: bytes that have arrived, read forward, never seeked.

    A read past the end before the upload is complete returns nothing (FFmpeg sees an end of
    file) and sets :attr:`starved`, so the caller knows the result of that read is void.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # read position in buf
        self.dropped = 0  # bytes before buf[0], already read and let go
        self.complete = False
        self.starved = False
        self.keep_all = True  # until the container is open: a retry reads from byte 0

    @property
    def received(self) -> int:
        return self.dropped + len(self.buf)

    @property
    def ahead(self) -> int:
        """Bytes buffered beyond the read position."""
        return len(self.buf) - self.pos

    def read(self, n: int = -1) -> bytes:
        if self.pos >= len(self.buf) and not self.complete:
            self.starved = True
            return b""
        end = len(self.buf) if n < 0 else self.pos + n
        out = bytes(self.buf[self.pos : end])
        self.pos += len(out)
        return out

    def rewind(self) -> None:
        assert self.keep_all and self.dropped == 0
        self.pos, self.starved = 0, False

    def drop_read(self) -> None:
        """Let go of bytes already read (once in a while: deleting a prefix copies the rest)."""
        if not self.keep_all and self.pos >= LOOKAHEAD_BYTES:
            del self.buf[: self.pos]
            self.dropped += self.pos
            self.pos = 0


class ProgressiveDecoder:
    """One upload's decoder. Not thread-safe: one caller at a time (any thread).

    ``feed(piece)`` and ``finish()`` return lists of ``(n,)`` float32 mono blocks at
    :data:`SAMPLE_RATE`. Raises :class:`~rtagger.errors.AudioError` (or its subclasses
    :class:`NotAllowed`, :class:`UploadTooLarge`, :class:`DecodedTooLong`); after an error
    the decoder is closed and takes nothing more.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_duration_s: float = DEFAULT_MAX_DURATION_S,
                 source: str = "<upload>") -> None:
        self.max_bytes = max_bytes
        self.max_duration_s = max_duration_s
        self.source = source
        self.kind: str | None = None  # a key of DEMUXERS once sniffed
        self.codec: str | None = None
        self.streamable: bool | None = None  # False: MP4 with its index after the audio
        self.decoded_s = 0.0  # seconds decoded, at the file's own rate
        self.produced = 0  # samples returned, at SAMPLE_RATE
        self.received = 0  # encoded bytes taken so far
        self._io = _Received()
        self._open_at = FIRST_OPEN_BYTES
        self._lookahead = LOOKAHEAD_BYTES
        self._container = None
        self._stream = None
        self._packets = None
        self._resampler = None
        self._expected_s: float | None = None
        self._done = False
        self._mp3_head: bytes | None = None  # MP3 only: the bytes the end trim is read from
        self._mp3_skip = 0  # MP3 only: bytes of the ID3v2 tag before the first frame
        self._held: deque = deque()  # MP3 only: decoded frames not yet resampled
        self._held_samples = 0
        self._passed_samples = 0  # decoded samples handed to the resampler

    def feed(self, data: bytes) -> list[np.ndarray]:
        """The next piece of the file -> the PCM blocks it completes (maybe none)."""
        if self._done:
            raise AudioError(self.source, "the decoder has finished")
        if self.received + len(data) > self.max_bytes:
            self.close()
            raise UploadTooLarge(self.source, f"more than {self.max_bytes} bytes "
                                              f"({self.max_bytes / 2**20:.0f} MiB)")
        self.received += len(data)
        self._io.buf += data
        return self._guarded(self._advance)

    def finish(self) -> list[np.ndarray]:
        """The file is complete: decode what is left; checks for truncation."""
        if self._done:
            raise AudioError(self.source, "the decoder has finished")
        self._io.complete = True
        blocks = self._guarded(self._advance)
        if self.streamable is False:
            blocks += self._guarded(self._decode_whole)
        elif self._packets is not None:
            raise AudioError(self.source, "the decoder stopped before the end of the file")
        self.close()
        if self.produced == 0:
            raise AudioError(self.source, "decoded to zero samples (empty or not audio)")
        got_s = self.produced / SAMPLE_RATE
        exp = self._expected_s
        if exp is not None and got_s < exp - max(_TRUNCATION_TOLERANCE_S, 0.02 * exp):
            raise AudioError(self.source, f"truncated: header promises {exp:.2f} s, only "
                                          f"{got_s:.2f} s could be decoded")
        return blocks

    def close(self) -> None:
        """Release FFmpeg's state and the buffer (idempotent)."""
        self._done = True
        self._packets = None
        if self._container is not None:
            self._container.close()
            self._container = None
        self._io = _Received()
        self._io.complete = True

    # --- steps ---------------------------------------------------------------------------

    def _guarded(self, step) -> list[np.ndarray]:
        av = _av()
        try:
            return step()
        except AudioError:
            self.close()
            raise
        except (av.error.FFmpegError, OSError, ValueError) as e:
            at = self.produced / SAMPLE_RATE
            self.close()
            raise AudioError(self.source, f"decoding failed after {at:.2f} s "
                                          f"({_reason(e)})") from e

    def _advance(self) -> list[np.ndarray]:
        io_ = self._io
        if self.kind is None:
            self.kind = sniff(bytes(io_.buf[:_sniff_bytes(io_.buf)]), io_.complete,
                              self.source)
            if self.kind is None:
                return []
        if self.kind == "mp4" and self.streamable is None:
            self.streamable = mp4_index_first(io_.buf, io_.complete, self.source)
            if self.streamable is None:
                return []
        if self.streamable is False:
            return []  # decoded whole by finish()
        if self._container is None:
            if not io_.complete and io_.received < self._open_at:
                return []
            if not self._open():
                self._open_at = 2 * io_.received
                return []
        return self._pump()

    def _open(self) -> bool:
        """Open the container on the bytes so far; False: it needs more of them."""
        av = _av()
        io_ = self._io
        io_.rewind()
        try:
            container = av.open(io_, mode="r", format=DEMUXERS[self.kind],
                                container_options=_CONTAINER_OPTIONS
                                | _KIND_OPTIONS.get(self.kind, {}),
                                buffer_size=_IO_BUFFER_BYTES, metadata_errors="replace")
        except (av.error.FFmpegError, OSError, ValueError) as e:
            if io_.starved:
                return False
            raise AudioError(self.source, f"cannot open as {self.kind} ({_reason(e)})") from e
        if io_.starved:
            container.close()
            return False
        self._container = container
        self._stream = self._check_stream(container)
        if self.kind == "mp3":
            skip = _sniff_bytes(io_.buf) - 4 if io_.buf[:3] == b"ID3" else 0
            self._mp3_head = bytes(io_.buf[skip : skip + _MP3_HEAD_BYTES])
            self._mp3_skip = skip
        io_.keep_all = False
        self._expected_s = self._expected_duration(container, self._stream)
        self._resampler = av.AudioResampler(format="fltp", layout=None, rate=SAMPLE_RATE)
        self._packets = container.demux(self._stream)
        return True

    def _check_stream(self, container):
        streams = container.streams.audio
        if not streams:
            raise AudioError(self.source, "contains no audio stream")
        stream = streams[0]
        ctx = stream.codec_context
        self.codec = ctx.name
        if ctx.name not in DECODERS:
            raise NotAllowed(self.source, f"audio codec {ctx.name!r} is not allowed (allowed: "
                                          f"{', '.join(sorted(DECODERS))})")
        if (ctx.sample_rate or 0) <= 0:
            raise AudioError(self.source, "audio stream reports no sample rate")
        return stream

    def _expected_duration(self, container, stream) -> float | None:
        """What the header promises (as :func:`~rtagger.audio.decode.iter_audio` reads it)."""
        if self.kind == "wav":
            return wav_declared_duration(bytes(self._io.buf[:WAV_HEAD_BYTES]))
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return None

    def _pump(self) -> list[np.ndarray]:
        """Decode packets while enough bytes are buffered ahead (all of them at the end)."""
        io_ = self._io
        out: list[np.ndarray] = []
        while self._packets is not None and (io_.complete or io_.ahead >= self._lookahead):
            packet = next(self._packets, None)
            if io_.starved:
                raise AudioError(self.source, f"a packet needed more than the decoder's "
                                              f"{self._lookahead} bytes of look-ahead")
            if packet is None:
                self._packets = None
                out += self._release_held(self._mp3_trimmed_length())
                out += self._resample(None)
                break
            self._lookahead = max(self._lookahead, 4 * packet.size)
            for frame in packet.decode():
                out += self._take(frame)
            io_.drop_read()
        return out

    def _take(self, frame) -> list[np.ndarray]:
        """A decoded frame: counted, then resampled (MP3: after the held-back tail)."""
        self.decoded_s += frame.samples / frame.sample_rate
        if self.decoded_s > self.max_duration_s:
            raise DecodedTooLong(self.source, f"decodes to more than "
                                 f"{self.max_duration_s:.0f} s of audio (from "
                                 f"{self._io.received} bytes so far)")
        frame.pts = None  # we count samples ourselves; ignore broken timestamps
        if self._mp3_head is None:
            return self._resample(frame)
        self._held.append(frame)
        self._held_samples += frame.samples
        out: list[np.ndarray] = []
        while self._held_samples - self._held[0].samples >= _MP3_HOLD_SAMPLES:
            first = self._held.popleft()
            self._held_samples -= first.samples
            out += self._resample(first)
        return out

    def _release_held(self, total: int | None) -> list[np.ndarray]:
        """The held-back frames, cut so that ``total`` decoded samples pass in all."""
        out: list[np.ndarray] = []
        while self._held:
            frame = self._held.popleft()
            if total is not None and self._passed_samples + frame.samples > total:
                keep = total - self._passed_samples
                if keep <= 0:
                    break
                frame = _head_of(frame, keep)
            out += self._resample(frame)
        self._held.clear()
        self._held_samples = 0
        return out

    def _resample(self, frame) -> list[np.ndarray]:
        if frame is not None:
            self._passed_samples += frame.samples
        blocks = [_downmix(f.to_ndarray(), self.source) for f in self._resampler.resample(frame)]
        self.produced += sum(b.size for b in blocks)
        return blocks

    def _mp3_trimmed_length(self) -> int | None:
        """Decoded samples a seekable read of this MP3 yields (None: no trim applies).

        An MP3 whose Info tag counts its frames and states the encoder's padding is trimmed
        to its real length by FFmpeg, but only when FFmpeg can ask for the file's size,
        which a stream being uploaded does not have. Now that the size is known, FFmpeg
        reads the same header from a seekable view of the first bytes (the rest reads as
        the end of the file) and states the trimmed length as the stream's duration.
        """
        if self._mp3_head is None or not _mp3_counts_frames(self._mp3_head):
            return None
        av = _av()
        view = _HeadView(self._mp3_head, self._io.received - self._mp3_skip)
        try:
            with av.open(view, mode="r", format="mp3", container_options=_CONTAINER_OPTIONS,
                         buffer_size=_IO_BUFFER_BYTES, metadata_errors="replace") as probe:
                st = probe.streams.audio[0]
                if st.duration is None or st.time_base is None:
                    return None
                total = round(st.duration * st.time_base * st.codec_context.sample_rate)
        except (av.error.FFmpegError, OSError, ValueError, IndexError):
            return None
        # Only a trim of the held-back tail is FFmpeg's padding rule; anything else is an
        # estimate from the bit rate (a header that does not match the file): no trim.
        held_until = self._passed_samples + self._held_samples
        return total if held_until - _MP3_HOLD_SAMPLES < total <= held_until else None

    def _decode_whole(self) -> list[np.ndarray]:
        """A non-streamable file, complete in memory: decode it seekable, like a file."""
        av = _av()
        data = bytes(self._io.buf)
        self._io.buf.clear()
        try:
            container = av.open(io.BytesIO(data), mode="r", format=DEMUXERS[self.kind],
                                container_options=_CONTAINER_OPTIONS,
                                buffer_size=_IO_BUFFER_BYTES, metadata_errors="replace")
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise AudioError(self.source, f"cannot open as {self.kind} ({_reason(e)})") from e
        self._container = container
        self._stream = self._check_stream(container)
        self._expected_s = self._expected_duration(container, self._stream)
        self._resampler = av.AudioResampler(format="fltp", layout=None, rate=SAMPLE_RATE)
        self._packets = container.demux(self._stream)
        return self._pump()


# FFmpeg may open no protocol ("none" names none), and probes stream parameters with the
# allowed decoders only: cover art (mjpeg, png) is never decoded, not even to probe it.
_CONTAINER_OPTIONS = {"protocol_whitelist": "none", "codec_whitelist": ",".join(sorted(DECODERS))}
# PCM needs no stream analysis; FFmpeg's default (5 s of packets, ~1 MiB of CD audio) would
# hold the first update back until that much has arrived.
_KIND_OPTIONS = {"wav": {"analyzeduration": "100000", "probesize": "32768"}}  # us, bytes


def _sniff_bytes(buf: bytearray) -> int:
    """How many leading bytes :func:`sniff` needs to see (an ID3v2 tag makes it more)."""
    if len(buf) >= _ID3_HEADER_BYTES and buf[:3] == b"ID3":
        return _id3_size(bytes(buf[:_ID3_HEADER_BYTES])) + 4
    return 12


def _id3_size(header: bytes) -> int:
    """Bytes of an ID3v2 tag, header (and footer) included, from its 10-byte header."""
    size = 0
    for b in header[6:10]:
        size = (size << 7) | (b & 0x7F)  # "syncsafe": 7 bits per byte
    footer = _ID3_HEADER_BYTES if header[5] & 0x10 else 0
    return _ID3_HEADER_BYTES + size + footer


def sniff(head: bytes, complete: bool, source: str = "<upload>") -> str | None:
    """The container kind (a key of :data:`DEMUXERS`) from a file's first bytes.

    None: more bytes are needed to tell (and ``complete`` is False). Raises
    :class:`NotAllowed` for anything else (images, video, playlists, text...).
    """
    if head[:3] == b"ID3":
        if len(head) < _ID3_HEADER_BYTES:
            return None if not complete else _refuse(head, source)
        after = _id3_size(head[:_ID3_HEADER_BYTES])
        if len(head) < after + 4 and not complete:
            return None
        return "flac" if head[after : after + 4] == b"fLaC" else "mp3"
    if len(head) < 12 and not complete:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    # An MPEG audio frame header: 11 sync bits, then a layer that is not "reserved" (00);
    # ADTS (raw AAC) has layer 00 and is not taken.
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
        return "mp3"
    return _refuse(head, source)


def _refuse(head: bytes, source: str) -> None:
    raise NotAllowed(source, f"not an allowed audio file (WAV, FLAC, Ogg, MP3, MP4/M4A); "
                             f"it starts with {bytes(head[:8])!r}")


def mp4_index_first(buf: bytearray, complete: bool, source: str = "<upload>") -> bool | None:
    """Whether an MP4's ``moov`` box (its index) comes before ``mdat`` (its media data).

    Walks the top-level boxes from the start; None while the order is not yet known.
    """
    pos = 0
    while pos + 8 <= len(buf):
        size = int.from_bytes(buf[pos : pos + 4], "big")
        kind = bytes(buf[pos + 4 : pos + 8])
        if kind == b"moov":
            return True
        if kind == b"mdat":
            return False
        if size == 1:  # 64-bit size follows the type
            if pos + 16 > len(buf):
                break
            size = int.from_bytes(buf[pos + 8 : pos + 16], "big")
        if size < 8:  # 0 ("to the end of the file") before any moov: nothing to index
            raise AudioError(source, f"MP4 box {kind!r} at byte {pos} has size {size}; "
                                     f"no index (moov) before it")
        pos += size
    if complete:
        raise AudioError(source, "MP4 file without an index (moov box)")
    return None


def _head_of(frame, n: int):
    """The first ``n`` samples of a decoded audio frame, as a frame."""
    av = _av()
    data = frame.to_ndarray()
    planar = frame.format.is_planar
    cut = data[:, :n] if planar else data[:, : n * len(frame.layout.channels)]
    out = av.AudioFrame.from_ndarray(np.ascontiguousarray(cut), format=frame.format.name,
                                     layout=frame.layout.name)
    out.sample_rate = frame.sample_rate
    return out


def _mp3_counts_frames(head: bytes) -> bool:
    """Whether the first MP3 frame holds a Xing/Info tag with a frame count."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    mpeg1 = bool(head[1] & 0x08)
    mono = head[3] >> 6 == 3
    at = 4 + (17 if mono else 32) if mpeg1 else 4 + (9 if mono else 17)
    return head[at : at + 4] in (b"Xing", b"Info") and bool(head[at + 7] & 0x01)


class _HeadView:
    """A seekable file of ``size`` bytes whose first bytes are ``head``; past them it ends."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head, self.size, self.pos = head, size, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.head) if n < 0 else self.pos + n
        out = self.head[self.pos : end] if self.pos < len(self.head) else b""
        self.pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos
