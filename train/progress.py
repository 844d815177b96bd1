"""One progress bar for every long training job (rich; silent when disabled)."""

from __future__ import annotations


class Bar:
    """``Bar("pseudo-labelling", total)``; ``advance(n, **fields)``; ``close()``.

    ``fields`` are extra live values shown after the bar as ``name value``, given as
    ``{name: format spec}``, e.g. ``{"loss": ".4f", "windows/s": ".1f"}``.
    """

    def __init__(self, label: str, total: int | None, *, enabled: bool = True,
                 completed: int = 0, fields: dict[str, str] | None = None) -> None:
        self._p = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        fields = fields or {}
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

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
