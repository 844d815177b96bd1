"""Ring buffer and windower: PCM blocks of any size -> 3.69 s windows every ``hop`` samples.

Sans-I/O: feed it numpy blocks, get :class:`Window` objects back. Memory is bounded by one
window (the ring) plus the windows of the block being pushed, however large the stream.

Window ``k`` covers samples ``[k * hop, k * hop + window)`` of the stream. At the end of
the stream, :meth:`Windower.flush` emits one last zero-padded window (``partial=True``)
when samples after the last full window would otherwise never be tagged, including
streams shorter than one window.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import ConfigError


@dataclass(frozen=True)
class Window:
    index: int  # 0, 1, 2, ... within the stream
    start: int  # first sample, counted from the start of the stream
    samples: np.ndarray  # (WINDOW_SAMPLES,) float32; zero-padded past `valid` if partial
    valid: int  # number of real (non-padding) samples
    partial: bool = False

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        """End of the real audio in this window (seconds)."""
        return (self.start + self.valid) / SAMPLE_RATE


class RingBuffer:
    """Fixed-capacity circular float32 buffer indexed by absolute stream position."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = np.zeros(capacity, np.float32)
        self.written = 0  # absolute number of samples ever written

    def write(self, samples: np.ndarray) -> None:
        n = len(samples)
        if n > self.capacity:
            raise ValueError(f"write of {n} samples exceeds ring capacity {self.capacity}")
        pos = self.written % self.capacity
        first = min(n, self.capacity - pos)
        self._buf[pos : pos + first] = samples[:first]
        self._buf[: n - first] = samples[first:]
        self.written += n

    def read(self, start: int, n: int) -> np.ndarray:
        """Copy of samples ``[start, start + n)``; they must still be in the ring."""
        if start < self.written - self.capacity or start + n > self.written:
            raise ValueError(f"samples [{start}, {start + n}) are not in the ring "
                             f"(holds [{max(0, self.written - self.capacity)}, {self.written}))")
        idx = (start + np.arange(n)) % self.capacity
        return self._buf[idx]

    def reset(self) -> None:
        self.written = 0


class Windower:
    """Cuts a stream into windows of ``window`` samples every ``hop`` samples.

    ``hop`` must be in ``[1, window]``; the default is ``window`` (no overlap: offline
    throughput). Live use takes a 1 s hop (16,000 samples).
    """

    def __init__(self, hop: int = WINDOW_SAMPLES, window: int = WINDOW_SAMPLES) -> None:
        if not 1 <= hop <= window:
            raise ConfigError(f"hop must be between 1 and the window ({window} samples), "
                              f"got {hop}")
        self.window = window
        self.hop = hop
        self._ring = RingBuffer(window)
        self._next_start = 0  # start of the next window to emit
        self._index = 0
        self._covered = 0  # end of the last emitted window
        self._flushed = False

    @property
    def received(self) -> int:
        """Samples received so far."""
        return self._ring.written

    @property
    def emitted(self) -> int:
        """Windows emitted so far."""
        return self._index

    def push(self, block: np.ndarray) -> list[Window]:
        """Add a block of mono float32 samples; return the windows it completes."""
        if self._flushed:
            raise RuntimeError("push after flush; call reset() to start a new stream")
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        out: list[Window] = []
        pos = 0
        while pos < len(block):
            # Only samples that the next window can use fit in the ring; the rest waits.
            room = self._next_start + self.window - self._ring.written
            if room <= 0:  # only possible transiently; emit below frees room
                room = 0
            take = min(room, len(block) - pos)
            if take:
                self._ring.write(block[pos : pos + take])
                pos += take
            if self._ring.written >= self._next_start + self.window:
                out.append(self._emit(self.window))
        return out

    def _emit(self, valid: int) -> Window:
        samples = self._ring.read(self._next_start, valid)
        partial = valid < self.window
        if partial:
            samples = np.concatenate([samples, np.zeros(self.window - valid, np.float32)])
        w = Window(self._index, self._next_start, samples, valid, partial)
        self._covered = self._next_start + valid
        self._index += 1
        self._next_start += self.hop
        return w

    def flush(self) -> list[Window]:
        """End of stream: the padded last window if any samples were never tagged."""
        if self._flushed:
            return []
        self._flushed = True
        if self._ring.written > self._covered:
            return [self._emit(self._ring.written - self._next_start)]
        return []

    def reset(self) -> None:
        self._ring.reset()
        self._next_start = 0
        self._index = 0
        self._covered = 0
        self._flushed = False


def iter_windows(blocks, hop: int = WINDOW_SAMPLES) -> Iterator[Window]:
    """All windows of a stream of blocks, including the flushed partial one."""
    w = Windower(hop)
    for block in blocks:
        yield from w.push(block)
    yield from w.flush()
