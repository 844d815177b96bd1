"""Command line: thin typer commands that parse, validate and delegate to the library."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from rtagger.errors import RtaggerError

app = typer.Typer(
    name="rtagger",
    help="Streaming real-time music tagger: tags audio files, streams and live input.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay greppable
log = logging.getLogger("rtagger")


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class Aggregation(str, Enum):
    auto = "auto"
    mean = "mean"
    aggregator = "aggregator"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _load_tagger(model: str, device: str, hop: float | None, batch_size: int,
                 aggregation: str, engine: str = "torch"):
    from rtagger.checkpoint import bundled_model_path
    from rtagger.tagger import Tagger

    if model == "default" and bundled_model_path() is None:
        # No trained default ships yet: run the real pipeline, but never pass random
        # weights off as tags.
        err.print("[yellow]note:[/yellow] no trained default model is bundled with this "
                  "version; using [bold]untrained:student[/bold]. Its scores are NOT tags. "
                  "Pass --model PATH for a trained checkpoint.", highlight=False)
        model = "untrained:student"
    return Tagger(model, engine=engine, device=device, hop_s=hop, batch_size=batch_size,
                  aggregation=aggregation)


@app.command()
def tag(
    files: list[str] = typer.Argument(..., help="Audio files or URLs (any codec FFmpeg reads)."),
    model: str = typer.Option("default", "--model", "-m",
                              help="Checkpoint path, 'default', or 'untrained:SIZE'."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f"),
    top: int = typer.Option(10, "--top", "-k", min=1, help="Tags shown per file."),
    hop: float = typer.Option(None, "--hop", help="Seconds between windows "
                              "(default: one window, 3.69 s)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    aggregation: Aggregation = typer.Option(Aggregation.auto, "--aggregation"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    plot: Path = typer.Option(None, "--plot", help="Write the taggram as PNG (a folder "
                              "when tagging several files)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write JSON/CSV here "
                                "instead of stdout."),
) -> None:
    """Tag audio files: track-level top tags, plus the per-window taggram in JSON/CSV."""
    from rtagger import report

    try:
        tagger = _load_tagger(model, device, hop, batch_size, aggregation.value)
    except RtaggerError as e:
        raise _fail(str(e)) from None
    results, errors = [], []
    for path in files:
        try:
            result = _tag_one(tagger, path)
        except RtaggerError as e:
            # One bad file is reported and skipped; the others are still tagged.
            err.print(f"[red]failed:[/red] {e}", highlight=False)
            errors.append({"source": path, "error": str(e), "type": type(e).__name__})
            continue
        results.append(result)
        if plot is not None:
            target = plot / f"{Path(path).stem}.png" if len(files) > 1 else plot
            target.parent.mkdir(parents=True, exist_ok=True)
            report.plot_taggram(result, target)
        if fmt is OutputFormat.table:
            out.print(report.results_table(result, top, tagger.model.tag_groups))
    if not tagger.model.trained:
        err.print(f"[yellow]warning:[/yellow] "
                  f"{report.UNTRAINED_NOTICE.format(name=tagger.model.name)}", highlight=False)
    text = None
    if fmt is OutputFormat.json:
        text = report.results_to_json(results, errors, top)
    elif fmt is OutputFormat.csv:
        text = report.results_to_csv(results)
    if text is not None:
        if output is not None:
            output.write_text(text)
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if errors:
        err.print(f"{len(errors)} of {len(files)} inputs failed", highlight=False)
        raise typer.Exit(1)


def _tag_one(tagger, path: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[t]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True,
                  disable=not err.is_terminal) as progress:
        task = progress.add_task(Path(path).name, total=None, t="0.0 s")

        def on_window(w) -> None:
            progress.update(task, t=f"{w.end_s:.1f} s audio")

        return tagger.tag_file(path, on_window=on_window)


@app.command()
def info(model: str = typer.Argument("default", help="Checkpoint path or name.")) -> None:
    """Show what a checkpoint holds: architecture, tags, recipe, metrics, checksum."""
    import json

    from rtagger.checkpoint import load_model

    try:
        desc = load_model(model).describe()
    except RtaggerError as e:
        raise _fail(str(e)) from None
    sys.stdout.write(json.dumps(desc, indent=2) + "\n")


@app.command()
def sizes(n_tags: int = typer.Option(36, help="Number of output tags.")) -> None:
    """Parameters and multiply-accumulates per window for each model size."""
    from rich.table import Table

    from rtagger.model import size_report

    table = Table(title="model sizes (MACs per 3.69 s window)")
    for col in ("size", "tagger params", "tagger MACs/window", "aggregator params",
                "aggregator MACs (full context)"):
        table.add_column(col, justify="right")
    for r in size_report(n_tags):
        table.add_row(r["size"], f"{r['tagger_params']:,}", f"{r['tagger_macs_per_window']:,}",
                      f"{r['aggregator_params']:,}",
                      f"{r['aggregator_macs_full_context']:,} ({r['aggregator_context_windows']}"
                      " windows)")
    out.print(table)


def _add_subcommands() -> None:
    try:
        from train.cli import data_app
    except ModuleNotFoundError as e:
        if e.name != "train":  # a missing dependency inside train/ must not be hidden
            raise
        log.debug("training commands unavailable: %s", e)
        return
    app.add_typer(data_app, name="data")


_add_subcommands()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
