"""One progress bar for every long training job (rich; silent when disabled).

On a terminal it is a live rich bar. When stderr is a file or a pipe (``nohup``, CI, a
scheduler's log) a live bar would print nothing until the end, so the bar writes a plain
line instead every ``PLAIN_EVERY_S`` seconds and when it closes.
"""

from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 30.0


class Bar:
    """``Bar("pseudo-labelling", total)``; ``advance(n, **fields)``; ``close()``.

    ``fields`` are extra live values shown after the bar as ``name value``, given as
    ``{name: format spec}``, e.g. ``{"loss": ".4f", "windows/s": ".1f"}``.
    """

    def __init__(self, label: str, total: int | None, *, enabled: bool = True,
                 completed: int = 0, fields: dict[str, str] | None = None,
                 stream=None) -> None:
        self._p = None
        self._plain = False
        if not enabled:
            return
        fields = fields or {}
        stream = stream if stream is not None else sys.stderr
        if not stream.isatty():
            self._plain = True
            self._stream, self._label, self._total = stream, label, total
            self._done, self._start_done = completed, completed
            self._fields, self._values = fields, {name: 0.0 for name in fields}
            self._t0 = self._last = time.monotonic()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        extra = [TextColumn(f"{name} {{task.fields[{name}]:{spec}}}")
                 for name, spec in fields.items()]
        self._p = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                           *extra, TimeRemainingColumn())
        self._p.start()
        self._task = self._p.add_task(label, total=total, completed=completed,
                                      **{name: 0.0 for name in fields})

    def advance(self, n: int = 1, **values: float) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=n, **values)
        elif self._plain:
            self._done += n
            self._values.update(values)
            now = time.monotonic()
            if now - self._last >= PLAIN_EVERY_S:
                self._last = now
                self._write(now)

    def _write(self, now: float) -> None:
        parts = [f"{self._label}: {self._done}"]
        if self._total:
            parts[0] += f"/{self._total} ({100 * self._done / self._total:.0f}%)"
        for name, spec in self._fields.items():
            parts.append(f"{name} {format(self._values[name], spec)}")
        rate = (self._done - self._start_done) / max(now - self._t0, 1e-9)
        if self._total and rate > 0 and self._done < self._total:
            parts.append(f"eta {_clock((self._total - self._done) / rate)}")
        parts.append(f"elapsed {_clock(now - self._t0)}")
        print("  ".join(parts), file=self._stream, flush=True)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
        elif self._plain:
            self._write(time.monotonic())
            self._plain = False


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
