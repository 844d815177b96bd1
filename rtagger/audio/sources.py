"""Audio sources for live tagging: files/URLs (paced or as fast as possible), sound cards.

Every source is an async iterator of float32 blocks, ``(n,)`` mono or ``(channels, n)``,
at a sample rate the source reports; the stream session resamples. Decoding and the sound
card callback run off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, iter_audio
from rtagger.errors import AudioError

log = logging.getLogger(__name__)

_END = object()


async def file_blocks(source: str | Path, *, realtime: bool = True,
                      block_s: float = 0.1) -> AsyncIterator[np.ndarray]:
    """Decode a file or URL into ~``block_s`` blocks of 16 kHz mono float32.

    With ``realtime`` the blocks are paced to the wall clock, as a live stream would send
    them; otherwise they come as fast as decoding allows (upload preview).
    """
    loop = asyncio.get_running_loop()
    decoded = iter_audio(source)
    target = max(1, int(block_s * SAMPLE_RATE))

    def next_block():
        parts, n = [], 0
        for part in decoded:
            parts.append(part)
            n += len(part)
            if n >= target:
                break
        return np.concatenate(parts) if parts else _END

    t0 = time.monotonic()
    sent = 0
    while True:
        block = await loop.run_in_executor(None, next_block)
        if block is _END:
            return
        yield block
        sent += len(block)
        if realtime:
            # Pacing to the wall clock is the point here, not a polling loop.
            delay = t0 + sent / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


def list_devices() -> str:
    """PortAudio's device list (what ``--device`` accepts)."""
    sd = _sounddevice()
    return str(sd.query_devices())


def _sounddevice():
    try:
        import sounddevice as sd
    except OSError as e:  # the Python package is there but libportaudio2 is not
        raise AudioError("sound card", f"PortAudio is not available ({e}); install the "
                                       f"libportaudio2 system package") from e
    return sd


class SoundCardSource:
    """Live input from a sound card via sounddevice (PortAudio).

    The PortAudio callback copies each block into a bounded queue. Input overflows reported
    by PortAudio are counted in ``overruns``; blocks that arrive while the queue is full are
    counted in ``dropped_blocks``. Neither is silent: ``rtagger listen`` shows both.
    """

    def __init__(self, device: int | str | None = None, sample_rate: int | None = None,
                 channels: int = 1, block_s: float = 0.05, max_queue_blocks: int = 400) -> None:
        self.sd = _sounddevice()
        self.device = device
        try:
            info = self.sd.query_devices(device, "input")
        except (ValueError, self.sd.PortAudioError) as e:
            raise AudioError(f"sound card {device!r}", f"no such input device ({e})") from e
        self.sample_rate = int(sample_rate or info["default_samplerate"])
        if channels > info["max_input_channels"]:
            raise AudioError(f"sound card {info['name']}", f"has {info['max_input_channels']} "
                                                           f"input channels, {channels} asked")
        self.channels = channels
        self.block_frames = max(1, int(block_s * self.sample_rate))
        self.max_queue_blocks = max_queue_blocks
        self.overruns = 0
        self.dropped_blocks = 0
        self.device_name = info["name"]

    async def blocks(self, max_seconds: float | None = None) -> AsyncIterator[np.ndarray]:
        """``(channels, n)`` float32 blocks until cancelled or ``max_seconds`` of audio."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue(maxsize=self.max_queue_blocks)

        def put(block: np.ndarray) -> None:
            try:
                q.put_nowait(block)
            except asyncio.QueueFull:
                self.dropped_blocks += 1

        def callback(indata, frames, time_info, status) -> None:  # PortAudio's thread
            if status.input_overflow:
                self.overruns += 1
            loop.call_soon_threadsafe(put, indata.T.copy())

        try:
            stream = self.sd.InputStream(device=self.device, samplerate=self.sample_rate,
                                         channels=self.channels, dtype="float32",
                                         blocksize=self.block_frames, callback=callback)
        except self.sd.PortAudioError as e:
            raise AudioError(f"sound card {self.device_name}", f"cannot open input ({e})") from e
        limit = None if max_seconds is None else int(max_seconds * self.sample_rate)
        got = 0
        with stream:
            while limit is None or got < limit:
                block = await q.get()
                if limit is not None:
                    block = block[:, : limit - got]
                got += block.shape[1]
                yield block
