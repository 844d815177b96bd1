"""``rtagger train run`` and ``rtagger train pseudo``: thin commands over the fit room."""

from __future__ import annotations

from pathlib import Path

import typer

from rtagger.audio.decode import WINDOW_S
from rtagger.errors import RtaggerError


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def register(data_app: typer.Typer, train_app: typer.Typer) -> None:
    """Add ``run`` and ``pseudo`` to the ``rtagger train`` group (none go under ``data``)."""
    del data_app

    @train_app.command("run")
    def run_recipe(
        recipe: Path = typer.Argument(..., help="A recipe TOML (train/recipes/*.toml)."),
        out: Path = typer.Option(None, "--out", "-o", help="Output folder (default "
                                 "runs/<recipe name>)."),
        set_: list[str] = typer.Option([], "--set", help="Override: section.key=value."),
        device: str = typer.Option(None, "--device"),
    ) -> None:
        """Train one stage from a recipe; resumes from OUT/last.pt after a kill."""
        from rtagger.train.fit.loop import train
        from rtagger.train.fit.recipe import load_recipe
        from rtagger.train.fit.tasks import make_task

        try:
            r = load_recipe(recipe, set_)
            out = out or Path("runs") / r.name
            best = train(make_task(r, out), r, out, device=device)
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(f"best checkpoint: {best}")

    @train_app.command("pseudo")
    def pseudo(
        teacher: Path = typer.Option(..., "--teacher", help="Teacher checkpoint."),
        manifest: list[Path] = typer.Option(..., "--manifest", help="Unlabelled manifest(s)."),
        cache: Path = typer.Option(Path("data/cache"), "--cache"),
        out: Path = typer.Option(..., "--out", "-o"),
        hop: float = typer.Option(WINDOW_S, "--hop", help="Seconds between windows."),
    ) -> None:
        """Label every window of unlabelled audio with a teacher (resumable, torchrun-able).

        Tags in the manifests are ignored: labelled songs can join the pool with labels hidden.
        """
        from rtagger.train.data.manifest import read_manifest
        from rtagger.train.fit.pseudo import pseudo_label

        try:
            tracks = [t for m in manifest for t in read_manifest(m)]
            report = pseudo_label(teacher, tracks, cache, out, hop_s=hop)
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(f"{report.shards_written} shards written, {report.shards_skipped} already "
                   f"done, {report.windows} windows labelled -> {out}")
