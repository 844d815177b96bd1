"""``rtagger data ...`` and ``rtagger train ...``: building datasets and training models.

One convention for every command of the project: a room's commands live in its ``cli.py``
(train/data, train/synth, train/teachers, train/fit, train/evaluation, deploy, rtagger/cli),
a thin module whose ``register(...)`` adds them to a typer group and whose commands import
the library lazily. Library modules never import typer. This module only composes the
``data`` and ``train`` groups (and holds ``pipeline``, the recipe that spans every room).
"""

from __future__ import annotations

from pathlib import Path

import typer

from rtagger.errors import RtaggerError
from rtagger.train.data import cli as data_cli
from rtagger.train.evaluation import cli as evaluation_cli
from rtagger.train.fit import cli as fit_cli
from rtagger.train.synth import cli as synth_cli
from rtagger.train.teachers import cli as teachers_cli

data_app = typer.Typer(
    help="Build datasets: the synthetic labelled benchmark, the unlabelled pool, caches.",
    no_args_is_help=True,
)
train_app = typer.Typer(
    help="Train models: teacher, noisy student, distilled student, context aggregator.",
    no_args_is_help=True,
)

for room in (data_cli, synth_cli, teachers_cli, fit_cli, evaluation_cli):
    room.register(data_app, train_app)


def register(app: typer.Typer) -> None:
    """Add the ``data`` and ``train`` groups to the ``rtagger`` CLI (the entry point that
    pyproject.toml names in the ``rtagger.commands`` group)."""
    app.add_typer(data_app, name="data")
    app.add_typer(train_app, name="train")


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


@train_app.command("pipeline")
def pipeline(
    file: Path = typer.Argument(..., help="Pipeline TOML (train/recipes/pipeline*.toml)."),
    root: Path = typer.Option(Path("."), "--root", help="Folder for data/ and runs/."),
    only: str = typer.Option(None, "--only", help="Run just these steps (comma-separated "
                                                  "names), in the file's order."),
) -> None:
    """Run every step of a pipeline in order; each step resumes where it stopped."""
    from rtagger.train.pipeline import run_pipeline

    try:
        run_pipeline(file, root, only)
    except RtaggerError as e:
        raise _fail(e) from None
