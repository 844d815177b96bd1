"""``rtagger data synth``: a thin command over :mod:`rtagger.train.synth.build` (imported lazily).

The synthetic benchmark needs mido (the ``train`` extra); without it the command still exists
and says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.errors import RtaggerError


def register(data_app: typer.Typer, train_app: typer.Typer) -> None:
    """Add ``synth`` to the ``rtagger data`` group (none go under ``train``)."""
    del train_app

    @data_app.command("synth")
    def synth(
        split: Annotated[str, typer.Option("--split", help="train, valid or test")] = "train",
        songs: Annotated[int | None, typer.Option(
            "--songs", help="number of songs (default: 2000 train, 300 valid, 500 test)")] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", help="output folder (default: data/synth/SPLIT)")] = None,
        seed: Annotated[int, typer.Option("--seed", help="base seed of the split")] = 0,
        jobs: Annotated[int | None, typer.Option(
            "--jobs", help="parallel processes (default: CPU count)")] = None,
        min_seconds: Annotated[float, typer.Option("--min-seconds")] = 40.0,
        max_seconds: Annotated[float, typer.Option("--max-seconds")] = 120.0,
        soundfont: Annotated[list[Path] | None, typer.Option(
            "--soundfont", help="soundfont(s) for held-out test sets (repeatable)")] = None,
        render_rate: Annotated[int, typer.Option(
            "--render-rate", help="FluidSynth rate in Hz, resampled to 16000")
        ] = SAMPLE_RATE,
    ) -> None:
        """Render the synthetic labelled benchmark (MMA grooves + FluidSynth), resumable."""
        try:
            from rtagger.train.synth.build import RECOMMENDED_SONGS, run_build
        except ModuleNotFoundError as e:
            if e.name != "mido":
                raise
            typer.echo("error: `rtagger data synth` needs mido: pip install 'rtagger[train]'",
                       err=True)
            raise typer.Exit(2) from None
        n = RECOMMENDED_SONGS.get(split, 0) if songs is None else songs
        folder = out or Path("data/synth") / split
        try:
            res = run_build(folder, split, n, seed, jobs, min_seconds, max_seconds,
                            soundfont or None, render_rate_hz=render_rate)
        except RtaggerError as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(1) from err
        typer.echo(
            f"{res.manifest}: {res.rendered} songs rendered, {res.skipped} already there, "
            f"{len(res.failed)} failed; {res.songs_per_min:.1f} songs/min, "
            f"{res.realtime_factor:.0f}x real time"
        )
        if res.failed:
            typer.secho(f"failed songs listed in {folder / 'failures.jsonl'}", fg="yellow",
                        err=True)
