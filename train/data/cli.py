"""``rtagger data pool|debian|cache|realchecks``: thin commands over :mod:`rtagger.train.data`.

The library modules are imported inside each command, so ``rtagger --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from rtagger.errors import RtaggerError


def register(data_app: typer.Typer, train_app: typer.Typer) -> None:
    """Add this room's commands to the ``rtagger data`` group (none go under ``train``)."""
    del train_app

    @data_app.command("pool")
    def pool_command(
        out: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write (JSONL).")]
        = Path("data/pool/manifest.jsonl"),
        source: Annotated[list[str] | None, typer.Option(
            "--source", "-s", help="Folder, audio file, .zip/.pk3 archive or Debian package "
            "name; repeatable. Default: the installed Debian soundtrack packages.")]
        = None,
        resume: Annotated[bool, typer.Option(help="Keep existing records, add new files.")]
        = False,
        verify: Annotated[bool, typer.Option(help="Decode every file fully (slower).")]
        = False,
        debian_dir: Annotated[Path, typer.Option(
            "--debian-dir", help="Where `rtagger data debian` unpacked the packages.")]
        = Path("data/debian"),
    ) -> None:
        """Build the unlabelled pool of real recordings (no tags) for semi-supervised training."""
        from rich.console import Console

        from rtagger.train.data.pool import build_pool_report, print_report

        try:
            report = build_pool_report(out, source or None, resume=resume, verify=verify,
                                       debian_dir=debian_dir)
        except RtaggerError as e:
            Console(stderr=True).print(f"error: {e}", markup=False, highlight=False)
            raise typer.Exit(code=2) from None
        print_report(report, Console())
        if report.n_tracks == 0:
            raise typer.Exit(code=1)

    @data_app.command("debian")
    def debian_command(
        packages: Annotated[list[str] | None, typer.Argument(
            help="Packages (default: every pool package).")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for debs and files.")]
        = Path("data/debian"),
    ) -> None:
        """Download and unpack the pool's Debian soundtrack packages (no root; resumable)."""
        from rtagger.train.data.debian import fetch_packages

        try:
            status = fetch_packages(out, packages or None)
        except RtaggerError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        for name, state in status.items():
            typer.echo(f"{name}: {state}")
        if any(s not in ("fetched", "present") for s in status.values()):
            raise typer.Exit(1)

    @data_app.command("cache")
    def cache_command(
        manifests: Annotated[list[Path], typer.Argument(help="Manifests (JSONL or CSV).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder.")],
        jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Decoding processes.")]
        = os.cpu_count() or 1,
    ) -> None:
        """Decode, resample and log-mel every track once into a memory-mapped cache."""
        from rich.console import Console

        from rtagger.train.data.cache import build_cache, print_report
        from rtagger.train.data.manifest import read_manifest

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

    @data_app.command("realchecks")
    def realchecks_command(
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for packages, audio "
                                          "and manifest.jsonl.")] = Path("data/realchecks"),
        package: Annotated[list[str] | None, typer.Option(
            "--package", "-p", help="Only this check source; repeatable.")] = None,
        soundfont: Annotated[Path | None, typer.Option(
            "--soundfont", help="GM soundfont to render with (default: csound's GM bank, "
            "fetched).")] = None,
        limit: Annotated[int | None, typer.Option(
            "--limit", min=1, help="At most this many files per package (to try it).")]
        = None,
    ) -> None:
        """Held-out real checks: Debian's MIDI music rendered, labelled from the MIDI."""
        from rich.console import Console

        from rtagger.train.data.realchecks import build_realchecks, print_report

        try:
            report = build_realchecks(out, packages=package or None, soundfont=soundfont,
                                      limit=limit)
        except RtaggerError as e:
            Console(stderr=True).print(f"error: {e}", markup=False, highlight=False)
            raise typer.Exit(code=2) from None
        print_report(report, Console())
        if report.n_tracks == 0:
            raise typer.Exit(1)
        if report.failures:
            raise typer.Exit(1)
