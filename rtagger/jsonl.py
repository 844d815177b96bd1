"""Append-only JSONL logs: the one idiom for records a long job adds one at a time.

Manifests (pool, synthetic songs; the catalog reads them too), the index of simulated mixes
and similar logs are
append-only JSONL files: one JSON object per line, each line flushed (optionally fsynced)
as soon as its record is done, so a job killed at any moment loses at most the line it was
writing. Resuming reads the records that made it (:func:`read_records`, which tolerates
that one truncated last line) and appends after cutting it (:class:`JsonlAppender`). What
counts as "already done" (an id, an index, a file that exists) is the caller's rule.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rtagger.errors import RtaggerError

log = logging.getLogger(__name__)


class JsonlError(RtaggerError):
    """A line of an append-only log is not a JSON object (and not a killed writer's last)."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: {reason}")


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every complete line of ``path`` (none if it is absent).

    Only the very last line, with no newline after it, may be unreadable: a killed writer's.
    Any other bad line raises :class:`JsonlError` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: ignoring truncated last line (%s)", path, lineno, e.msg)
                break
            raise JsonlError(path, lineno, f"invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise JsonlError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    return out


class JsonlAppender:
    """Append records to ``path``, one flushed line each; ``durable`` also fsyncs each line.

    ``append=False`` starts the file afresh. Appending first cuts a line a killed writer
    left without its newline, so the file stays valid JSONL.
    """

    def __init__(self, path: str | Path, *, append: bool = True, durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            drop_partial_last_line(self.path)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()  # a line reaches the OS as soon as it is written
        if self.durable:
            os.fsync(self._f.fileno())  # and the disk, before the job counts it as done

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def drop_partial_last_line(path: Path) -> None:
    """Cut a line a killed writer left without its newline, so appending stays valid."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping a truncated last line (%d bytes) before appending",
                path, len(data) - keep)
    with open(path, "r+b") as f:
        f.truncate(keep)
