"""Command line: thin typer commands that parse, validate and delegate to the library."""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
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


ENGINE_OPTION = typer.Option(
    "auto", "--engine", help="torch, onnx, tensorrt, or auto: the measured engine (onnx on "
    "CPU, torch on CUDA; never TensorRT until a GPU run measured it). A TensorRT build "
    "failure falls back to torch, reported. With an export folder as --model only auto or "
    "the folder's own engine is accepted (DIR/checkpoint.safetensors runs with any).")


class Aggregation(str, Enum):
    auto = "auto"
    mean = "mean"
    aggregator = "aggregator"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _load_tagger(model: str, device: str, hop: float | None, batch_size: int,
                 aggregation: str, engine: str = "auto"):
    from rtagger.model.checkpoint import bundled_model_path
    from rtagger.pipeline.tagger import Tagger

    if model == "default" and bundled_model_path() is None:
        # No trained default ships yet: run the real pipeline, but never pass random
        # weights off as tags.
        err.print("[yellow]note:[/yellow] no trained default model is bundled with this "
                  "version; using [bold]untrained:small[/bold]. Its scores are NOT tags. "
                  "Pass --model PATH for a trained checkpoint.", highlight=False)
        model = "untrained:small"
    tagger = Tagger(model, engine=engine, device=device, hop_s=hop, batch_size=batch_size,
                    aggregation=aggregation)
    reason = getattr(tagger.engine, "fallback_reason", None)
    if reason:
        err.print(f"[yellow]note:[/yellow] engine {tagger.engine.name}: {reason}",
                  highlight=False)
    return tagger


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
    engine: str = ENGINE_OPTION,
    plot: Path = typer.Option(None, "--plot", help="Write the taggram as PNG (a folder "
                              "when tagging several files)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write JSON/CSV here "
                                "instead of stdout."),
) -> None:
    """Tag audio files: track-level top tags, plus the per-window taggram in JSON/CSV."""
    from rtagger.cli import report

    try:
        tagger = _load_tagger(model, device, hop, batch_size, aggregation.value, engine)
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

    from rtagger.model.checkpoint import load_model

    try:
        desc = load_model(model).describe()
    except RtaggerError as e:
        raise _fail(str(e)) from None
    sys.stdout.write(json.dumps(desc, indent=2) + "\n")


@app.command()
def sizes(n_tags: int = typer.Option(36, help="Number of output tags.")) -> None:
    """Parameters and multiply-accumulates per window for each model size."""
    from rich.table import Table

    from rtagger.model.cost import size_report

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


def _run_live(blocks, start, view, *, server: str | None, token: str | None, jsonl: bool,
              model: str, device: str, aggregation: str, engine: str = "auto",
              stream_id: str | None = None):
    """Drive a live source locally or through a server, rendering messages as they come."""
    import asyncio
    import json

    from rich.live import Live

    def show(msg: dict) -> None:
        view(msg)
        if jsonl:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()

    async def run() -> dict:
        if server is not None:
            from rtagger.live.client import stream_to_server

            return await stream_to_server(
                server, blocks, sample_rate=start.sample_rate, channels=start.channels,
                hop_s=start.hop_s, live=start.live, segment=start.segment, name=start.name,
                token=token, on_message=show, stream_id=stream_id)
        from rtagger.live.driver import tag_live

        tagger = _load_tagger(model, device, None, 16, aggregation, engine)
        show({"type": "started", "model": tagger.model_info()})

        async def emit(msg: dict) -> None:
            show(msg)

        return await tag_live(tagger.model, tagger.engine, blocks, start, emit,
                              aggregation=aggregation)

    live_display = not jsonl and out.is_terminal
    with Live(view.render(), console=out, refresh_per_second=4, transient=False,
              get_renderable=view.render) if live_display else nullcontext():
        final = asyncio.run(run())
    if not live_display and not jsonl:
        out.print(view.render())
    return final


@app.command()
def stream(
    source: str = typer.Argument(..., help="Audio file or http/Icecast URL."),
    server: str = typer.Option(None, "--server", help="ws:// URL of an rtagger server; "
                               "without it, tag locally."),
    realtime: bool = typer.Option(True, "--realtime/--no-realtime",
                                  help="Pace to the wall clock (live) or send as fast as "
                                  "possible (upload preview)."),
    hop: float = typer.Option(1.0, "--hop", help="Seconds between windows."),
    segment: bool = typer.Option(None, "--segment/--no-segment",
                                 help="Detect track changes (default: on when --realtime)."),
    model: str = typer.Option("default", "--model", "-m"),
    device: str = typer.Option("cpu", "--device"),
    aggregation: Aggregation = typer.Option(Aggregation.auto, "--aggregation"),
    engine: str = ENGINE_OPTION,
    token: str = typer.Option(None, "--token", envvar="RTAGGER_TOKEN"),
    jsonl: bool = typer.Option(False, "--jsonl", help="Print every protocol message as a "
                               "JSON line instead of the live table."),
) -> None:
    """Tag a file or network stream progressively, locally or through a server."""
    from rtagger.audio.decode import SAMPLE_RATE
    from rtagger.audio.sources import file_blocks
    from rtagger.cli.console import LiveView
    from rtagger.live.protocol import Start

    start = Start("float32", SAMPLE_RATE, 1, hop, live=realtime,
                  segment=realtime if segment is None else segment, name=Path(source).name)
    try:
        _run_live(file_blocks(source, realtime=realtime), start, LiveView(source),
                  server=server, token=token, jsonl=jsonl, model=model, device=device,
                  aggregation=aggregation.value, engine=engine)
    except RtaggerError as e:
        raise _fail(str(e), 1) from None
    except OSError as e:  # connection refused, DNS...
        raise _fail(f"cannot reach {server}: {e}", 1) from None


@app.command()
def listen(
    device: str = typer.Option(None, "--device", "-d", help="Input device (index or name)."),
    list_devices: bool = typer.Option(False, "--list-devices", help="List devices and exit."),
    channels: int = typer.Option(1, "--channels", min=1, max=8),
    samplerate: int = typer.Option(None, "--samplerate", help="Default: the device's."),
    server: str = typer.Option(None, "--server", help="Publish to an rtagger server."),
    hop: float = typer.Option(1.0, "--hop"),
    seconds: float = typer.Option(None, "--seconds", help="Stop after this much audio."),
    model: str = typer.Option("default", "--model", "-m"),
    torch_device: str = typer.Option("cpu", "--torch-device"),
    engine: str = ENGINE_OPTION,
    token: str = typer.Option(None, "--token", envvar="RTAGGER_TOKEN"),
    jsonl: bool = typer.Option(False, "--jsonl"),
) -> None:
    """Tag live input from a sound card, printing tags as they change."""
    from rtagger.audio.sources import SoundCardSource
    from rtagger.audio.sources import list_devices as devices
    from rtagger.cli.console import LiveView
    from rtagger.live.protocol import Start

    try:
        if list_devices:
            out.print(devices(), highlight=False)
            return
        dev = int(device) if device is not None and device.isdigit() else device
        card = SoundCardSource(dev, samplerate, channels)
        view = LiveView(f"listening on {card.device_name} ({card.sample_rate} Hz)")
        start = Start("float32", card.sample_rate, channels, hop, live=True, segment=True,
                      name=card.device_name)

        async def blocks():
            async for b in card.blocks(seconds):
                view.extra = {"overruns": str(card.overruns),
                              "queue drops": str(card.dropped_blocks)}
                yield b

        final = _run_live(blocks(), start, view, server=server, token=token, jsonl=jsonl,
                          model=model, device=torch_device, aggregation="auto",
                          engine=engine)
    except RtaggerError as e:
        raise _fail(str(e), 1) from None
    except KeyboardInterrupt:
        return
    err.print(f"input overruns: {card.overruns}, blocks dropped: {card.dropped_blocks}, "
              f"windows dropped: {final.get('dropped', 0)}", highlight=False)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0: all)."),
    port: int = typer.Option(8765, "--port"),
    model: str = typer.Option("default", "--model", "-m"),
    device: str = typer.Option("cpu", "--device"),
    max_streams: int = typer.Option(64, "--max-streams", min=1),
    max_batch: int = typer.Option(32, "--max-batch", min=1),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0),
    token: str = typer.Option(None, "--token", envvar="RTAGGER_TOKEN",
                              help="Require this shared token from clients."),
    allow_origin: list[str] = typer.Option([], "--allow-origin",
                                           help="Extra browser origins allowed."),
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="Host names clients may use besides loopback names "
        "(given once or more, only these are accepted on a non-loopback bind)."),
    max_frame_bytes: int = typer.Option(1 << 20, "--max-frame-bytes", min=1024,
                                        help="Largest websocket frame accepted (close 1009)."),
    max_connections: int = typer.Option(512, "--max-connections", min=1,
                                        help="Open websocket connections of every kind."),
    first_message_timeout: float = typer.Option(
        10.0, "--first-message-timeout", min=0.1,
        help="Seconds a new connection has to send its first message."),
    aggregation: Aggregation = typer.Option(Aggregation.auto, "--aggregation"),
    engine: str = ENGINE_OPTION,
    no_dashboard: bool = typer.Option(False, "--no-dashboard"),
    max_upload_bytes: int = typer.Option(
        512 * 2**20, "--max-upload-bytes", min=1024,
        help="Largest encoded upload (websocket format encoded, POST /api/tag), bytes."),
    max_upload_duration: float = typer.Option(
        2 * 3600.0, "--max-upload-duration", min=1.0,
        help="Most audio an encoded upload may decode to, seconds."),
    catalog: Path = typer.Option(
        None, "--catalog", help="Also answer read-only queries on this catalog (GET "
        "/api/catalog, /api/catalog/search, /similar, /track; docs/catalog.md)."),
) -> None:
    """Serve live tagging over websockets (protocol v1) with a dashboard page."""
    import asyncio

    from rtagger.live.server import ServerConfig, TagServer

    if aggregation is Aggregation.aggregator:
        raise _fail("serve takes --aggregation auto or mean")
    try:
        tagger = _load_tagger(model, device, None, max_batch, aggregation.value, engine)
    except RtaggerError as e:
        raise _fail(str(e)) from None
    config = ServerConfig(host=host, port=port, max_streams=max_streams, max_batch=max_batch,
                          max_wait_s=max_wait_ms / 1000, token=token,
                          allowed_origins=tuple(allow_origin),
                          allowed_hosts=tuple(h.lower() for h in allowed_host),
                          max_connections=max_connections, max_frame_bytes=max_frame_bytes,
                          first_message_timeout_s=first_message_timeout,
                          dashboard=not no_dashboard, aggregation=aggregation.value,
                          max_upload_bytes=max_upload_bytes, max_upload_s=max_upload_duration,
                          catalog=str(catalog) if catalog is not None else None)

    async def run() -> None:
        async with TagServer(tagger.model, tagger.engine, config) as srv:
            err.print(f"rtagger serving {srv.url} (dashboard http://{host}:{srv.port}/) "
                      f"model {tagger.model.name}", highlight=False)
            if srv.catalog is not None:
                info = srv.catalog.info_at_start
                err.print(f"catalog {catalog} (read-only): {info['tracks']} tracks, "
                          f"{len(info['setups'])} setup(s)", highlight=False)
            await srv.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        err.print("stopped")
    except OSError as e:
        raise _fail(f"cannot listen on {host}:{port}: {e}") from None
    except RtaggerError as e:  # the catalog is missing or not a catalog
        raise _fail(str(e)) from None


def _add_subcommands() -> None:
    from importlib.metadata import entry_points

    from rtagger.cli.bench import register as register_bench
    from rtagger.cli.catalog import register as register_catalog

    register_bench(app)
    register_catalog(app)
    # Training and deployment commands register through an entry-point group
    # (pyproject.toml), so this module never imports them.
    for ep in entry_points(group="rtagger.commands"):
        try:
            register = ep.load()
        except ImportError as e:  # a missing optional dependency: the rest still works
            log.warning("'%s' commands unavailable (%s: %s)", ep.name, type(e).__name__, e)
            continue
        register(app)


_add_subcommands()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
