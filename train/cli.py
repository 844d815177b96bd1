"""``rtagger data ...`` commands: building datasets for training and evaluation.

Each data module keeps its own thin typer command next to its library functions and adds it
here through ``register(app)``; heavy imports stay inside the commands.
"""

from __future__ import annotations

import typer

from train import pool

data_app = typer.Typer(
    help="Build datasets: the synthetic labelled benchmark, the unlabelled pool, caches.",
    no_args_is_help=True,
)

pool.register(data_app)
