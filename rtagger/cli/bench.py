"""``rtagger bench``: a thin command over :mod:`rtagger.bench.throughput` (imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rtagger.errors import RtaggerError


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to ``app``."""

    @app.command("bench")
    def bench_command(
        model: str = typer.Option("default", "--model", "-m",
                                  help="Checkpoint path or name: 'default' (the bundled "
                                  "student), a file, or 'untrained:SIZE' (same cost)."),
        engine: list[str] = typer.Option(None, "--engine", "-e", help="Engine to measure "
                                         "(repeatable; default: all available)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
        batch_sizes: str = typer.Option(None, "--batch-sizes", help="Comma-separated, "
                                        "default 1,8,64 (quick: 1,8)."),
        budget_s: float = typer.Option(None, "--budget-s", help="Seconds of timed calls per "
                                       "engine and batch size (default 10; quick 0.3)."),
        offline_s: float = typer.Option(None, "--offline-s", help="Length of the signal "
                                        "tagged offline (default 60 s; quick 15 s)."),
        threads: int = typer.Option(None, "--threads", min=1, help="Intra-op threads."),
        streams: int = typer.Option(0, "--streams", min=0, help="Also run N real-time "
                                    "streams through a server process (e.g. 64)."),
        stream_s: float = typer.Option(30.0, "--stream-seconds", help="Audio per stream."),
        stream_server: str = typer.Option(None, "--stream-server", help="With --streams: "
                                          "play the streams to this running server "
                                          "(ws://host:port/, e.g. on another machine) "
                                          "instead of starting one here."),
        quick: bool = typer.Option(False, "--quick", help="A few seconds per engine (CI)."),
        output: Path = typer.Option(Path("rtagger-bench.json"), "--output", "-o",
                                    help="Where to write the JSON report."),
    ) -> None:
        """Latency and throughput of each engine, side by side; writes a JSON report."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from rtagger.bench.throughput import BenchSettings, _parse_batches, results_table, run_bench

        out, err = Console(), Console(stderr=True, soft_wrap=True)
        overrides: dict = {"model": model, "device": device, "threads": threads,
                           "streams": streams, "stream_s": stream_s,
                           "stream_url": stream_server}
        try:
            if engine:
                overrides["engines"] = tuple(engine)
            if batch_sizes:
                overrides["batch_sizes"] = _parse_batches(batch_sizes)
            if budget_s is not None:
                overrides["budget_s"] = budget_s
            if offline_s is not None:
                overrides["offline_s"] = offline_s
            settings = (BenchSettings.quick_settings(**overrides) if quick
                        else BenchSettings(**overrides))
            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed} calls"), TimeElapsedColumn(),
                          console=err, transient=True,
                          disable=not err.is_terminal) as bar:
                current: list = []

                def on_progress(label: str, total: int) -> None:
                    if label:
                        current[:] = [bar.add_task(label, total=total or None)]
                    elif current:
                        bar.advance(current[0])

                report = run_bench(settings, on_progress)
        except RtaggerError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2) from None
        out.print(results_table(report))
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        err.print(f"report written to {output}", highlight=False)
