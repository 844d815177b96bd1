"""``rtagger data cache``: a thin command; the work is in :mod:`rtagger.train.cache` (lazy)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from rtagger.errors import RtaggerError


def register(app: typer.Typer) -> None:
    """Add the ``cache`` command to a typer app (the ``rtagger data`` group)."""

    @app.command("cache")
    def cache_command(
        manifests: Annotated[list[Path], typer.Argument(help="Manifests (JSONL or CSV).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder.")],
        jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Decoding processes.")]
        = os.cpu_count() or 1,
    ) -> None:
        """Decode, resample and log-mel every track once into a memory-mapped cache."""
        from rich.console import Console

        from rtagger.train.cache import build_cache, print_report
        from rtagger.train.manifest import read_manifest

        console = Console()
        try:
            tracks = [t for m in manifests for t in read_manifest(m)]
            report = build_cache(tracks, out, jobs=jobs)
        except RtaggerError as e:
            console.print(f"error: {e}", style="red", markup=False, highlight=False)
            raise typer.Exit(2) from e
        print_report(report, console)
        if report.n_done + report.n_skipped == 0:
            raise typer.Exit(1)
