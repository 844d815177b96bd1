"""Atomic file writes: the one idiom for files that must never be seen half-written.

Write to a temporary file beside the target, flush it to disk, rename it over the target,
then flush the folder, so a reader (or a resumed job after a kill) sees the old file or the
new one, never a torn one. :func:`atomic_write` takes the bytes or text;
:func:`atomic_path` hands a temporary path to writers that want one (``torch.save``,
safetensors, a compiler's ``save``). Temporary names start with ``.`` and end in ``.tmp``,
so globs for the finished files (``shard-*.npz``) never match them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over it when the block ends without error.

    ``mode``: the finished file's permissions (``mkstemp`` would leave it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; returns ``path``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (not possible on every platform: then skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. a filesystem that cannot sync directories; the rename still happened
    finally:
        os.close(fd)
