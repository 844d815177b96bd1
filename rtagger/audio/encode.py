"""Writing audio: the project's one FLAC writer (synthetic songs, simulated mixes, tests).

The runtime only reads audio; training data and test fixtures are written here, through
PyAV's FLAC encoder, as 16-bit mono at :data:`~rtagger.audio.decode.SAMPLE_RATE`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.errors import AudioError


def write_flac(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """``samples`` ``(n,)`` float in [-1, 1] -> 16-bit mono FLAC at ``path`` (any extension).

    Not atomic on its own: a caller whose file must appear only when complete writes through
    :func:`rtagger.atomic.atomic_path`. Raises :class:`~rtagger.errors.AudioError`.
    """
    import av

    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)
    try:
        with av.open(str(path), "w", format="flac") as container:
            stream = container.add_stream("flac", rate=sample_rate, layout="mono")
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    except av.FFmpegError as err:
        raise AudioError(str(path), f"FLAC encoding failed: {err}") from err
    return Path(path)
