"""``rtagger data teachers``: the thin command over :mod:`rtagger.train.teachers.convert`.

Registered by ``rtagger.train.cli``; torch, TensorFlow and the converter import only when
the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from rtagger.errors import RtaggerError

TEACHER_NAMES = ("MTT_musicnn", "MTT_vgg", "MSD_musicnn", "MSD_vgg")


def register(data_app: typer.Typer, train_app: typer.Typer) -> None:
    """Add ``teachers`` to the ``rtagger data`` group (none go under ``train``)."""
    del train_app

    @data_app.command("teachers")
    def teachers(
        out: Path = typer.Option(Path("data/teachers"), "--out", "-o"),
        model: list[str] = typer.Option(list(TEACHER_NAMES), "--model",
                                        help="Teachers to convert (repeatable)."),
        parity: list[Path] = typer.Argument(None, help="Audio files: after converting, "
                                            "measure torch vs TensorFlow on them."),
        fixture: Path = typer.Option(None, "--fixture", help="Also write the CI fixture "
                                     "(train/teachers/reference.json) here."),
    ) -> None:
        """Convert musicnn 0.1.0's four TensorFlow taggers to torch safetensors (needs the
        teachers extra, at conversion time only)."""
        from rtagger.train.teachers.convert import convert_teachers

        try:
            for p in convert_teachers(out, model):
                typer.echo(f"{p}  {p.stat().st_size / 1e6:.2f} MB")
            if parity:
                from rtagger.train.teachers.parity import parity_markdown, write_parity

                typer.echo(parity_markdown(write_parity(out, parity, model)))
            if fixture is not None:
                from rtagger.train.teachers.parity import write_fixture

                typer.echo(f"fixture: {write_fixture(out, fixture)}")
        except RtaggerError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
