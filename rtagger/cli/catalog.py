"""``rtagger catalog ...``: thin commands over :mod:`rtagger.catalog` (imported lazily)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from rtagger.errors import RtaggerError

DB_OPTION = typer.Option(..., "--db", help="The catalog file (SQLite; created by add).")


class Shown(str, Enum):
    table = "table"
    json = "json"


class ExportFormat(str, Enum):
    parquet = "parquet"
    csv = "csv"
    jsonl = "jsonl"
    json = "json"


def _consoles():
    from rich.console import Console

    return Console(), Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _, err = _consoles()
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _results_table(title: str, results: list[dict]):
    from rich.table import Table

    table = Table(title=title)
    for col in ("id", "score", "source", "duration", "top tags"):
        table.add_column(col, justify="right" if col in ("id", "score", "duration") else "left")
    for r in results:
        table.add_row(str(r["id"]), f"{r['score']:.3f}" if "score" in r else "",
                      Path(r["source"]).name, f"{r['duration_s']:.0f} s",
                      ", ".join(f"{t} {p:.2f}" for t, p in r["top"]))
    return table


def register(app: typer.Typer) -> None:
    """Add the ``catalog`` group to ``app``."""
    catalog_app = typer.Typer(help="Tag a whole library into a database; search it by tag "
                              "and by sound; export it.", no_args_is_help=True)
    app.add_typer(catalog_app, name="catalog")

    @catalog_app.command("add")
    def add(
        inputs: list[str] = typer.Argument(..., help="Folders (recursive), audio files, URLs, "
                                           "URL lists (.txt/.m3u) or manifests (.jsonl/.csv)."),
        db: Path = DB_OPTION,
        model: str = typer.Option("default", "--model", "-m",
                                  help="Checkpoint path, 'default', or 'untrained:SIZE'."),
        hop: float = typer.Option(None, "--hop", help="Seconds between windows (default: "
                                  "one window, 3.69 s)."),
        engine: str = typer.Option("auto", "--engine", help="torch, onnx or auto."),
        workers: int = typer.Option(None, "--workers", min=1, help="Decoding processes "
                                    "(default: one per CPU core); with --ray, the local "
                                    "instance's CPUs."),
        batch_size: int = typer.Option(32, "--batch-size", min=1,
                                       help="Most windows per model call."),
        retag: bool = typer.Option(False, "--retag", help="Re-tag tracks already stored "
                                   "unchanged."),
        retry_failed: bool = typer.Option(False, "--retry-failed",
                                          help="Retry files that failed with the same bytes."),
        on_ray: bool = typer.Option(False, "--ray", help="Run on Ray: decoding on CPU tasks, "
                                    "inference on actors, Parquet shards merged here "
                                    "(needs the 'cluster' extra)."),
        ray_address: str = typer.Option(None, "--ray-address", help="A running Ray cluster "
                                        "(HEAD:6379, or 'auto'); implies --ray. Without it "
                                        "--ray starts a local instance of --workers CPUs."),
        inference_actors: int = typer.Option(1, "--inference-actors", min=1,
                                             help="With --ray: model-owning actors."),
        gpu: bool = typer.Option(False, "--gpu", help="With --ray: one GPU per inference "
                                 "actor."),
        tracks_per_shard: int = typer.Option(16, "--tracks-per-shard", min=1,
                                             help="With --ray: tracks per inference batch "
                                             "and Parquet shard."),
        shard_dir: Path = typer.Option(None, "--shard-dir", help="With --ray: the shard "
                                       "folder (default CATALOG.shards; on a cluster, one "
                                       "every node sees at the same path)."),
        fmt: Shown = typer.Option(Shown.table, "--format", "-f"),
    ) -> None:
        """Tag every track into the catalog; a rerun continues where a killed run stopped."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from rtagger.catalog.add import add_to_catalog
        from rtagger.catalog.sources import expand
        from rtagger.catalog.store import Catalog
        from rtagger.cli.main import _load_tagger

        _, err = _consoles()
        on_ray = on_ray or ray_address is not None
        if not on_ray and (gpu or inference_actors != 1 or shard_dir is not None):
            raise _fail("--gpu, --inference-actors and --shard-dir need --ray")
        if ray_address is not None and workers is not None:
            raise _fail("--workers sizes a local Ray instance; a cluster has its own CPUs")
        try:
            sources = expand(inputs)
            # On Ray the actors build `engine` on their own device; the driver's tagger only
            # describes the setup, and torch costs nothing to build.
            tagger = _load_tagger(model, "cpu", hop, batch_size, "auto",
                                  "torch" if on_ray else engine)
            with Catalog(db) as catalog, Progress(
                    TextColumn("catalog"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} {task.fields[speed]}"),
                    TimeElapsedColumn(), console=err,
                    disable=not err.is_terminal) as bar:
                task = bar.add_task("add", total=len(sources), speed="")

                def on_progress(r) -> None:
                    bar.update(task, completed=r.added + r.skipped + r.failed,
                               speed=f"{r.tracks_per_s:.1f} tracks/s "
                                     f"{r.realtime_factor:.0f}x real time, "
                                     f"{r.failed} failed")

                if on_ray:
                    from rtagger.catalog.cluster import add_on_ray

                    report = add_on_ray(catalog, sources, tagger, engine=engine,
                                        address=ray_address, num_cpus=workers,
                                        inference_actors=inference_actors, use_gpu=gpu,
                                        tracks_per_shard=tracks_per_shard,
                                        shard_dir=shard_dir, retag=retag,
                                        retry_failed=retry_failed, on_progress=on_progress)
                else:
                    report = add_to_catalog(catalog, sources, tagger, workers=workers,
                                            retag=retag, retry_failed=retry_failed,
                                            max_batch=batch_size, on_progress=on_progress)
                recorded = len(catalog.failures())
        except RtaggerError as e:
            raise _fail(str(e)) from None
        summary = report.to_dict()
        summary["db"] = str(db)
        summary["failures_recorded"] = recorded
        if fmt is Shown.json:
            _print_json(summary)
        else:
            err.print(f"{report.added} added, {report.skipped} unchanged, {report.failed} "
                      f"failed of {report.total}; {report.audio_s / 60:.1f} min of audio in "
                      f"{report.wall_s:.1f} s ({report.realtime_factor:.0f}x real time, "
                      f"{report.tracks_per_s:.2f} tracks/s) -> {db}", highlight=False)
            for f in report.failures:
                err.print(f"[red]failed:[/red] {f['reason']}", highlight=False)
            if recorded > report.failed:
                err.print(f"{recorded - report.failed} files that failed before were not "
                          f"retried (`rtagger catalog info` lists them; --retry-failed)",
                          highlight=False)
        if report.failed:
            raise typer.Exit(1)

    @catalog_app.command("search")
    def search(
        db: Path = DB_OPTION,
        tag: list[str] = typer.Option(..., "--tag", "-t", help="A tag every result carries "
                                      "(repeatable)."),
        min_p: float = typer.Option(0.5, "--min", help="Least track probability per tag."),
        limit: int = typer.Option(20, "--limit", "-k", min=1),
        fmt: Shown = typer.Option(Shown.table, "--format", "-f"),
    ) -> None:
        """Tracks carrying every --tag, ranked by the geometric mean of their probabilities."""
        from rtagger.catalog.query import search_tags
        from rtagger.catalog.store import Catalog

        try:
            with Catalog(db, create=False) as catalog:
                res = search_tags(catalog, tag, min_p=min_p, limit=limit)
        except RtaggerError as e:
            raise _fail(str(e)) from None
        if fmt is Shown.json:
            _print_json(res)
            return
        out, _ = _consoles()
        out.print(_results_table(f"{res['matches']} of {res['tracks_searched']} tracks: "
                                 f"{' + '.join(tag)} >= {min_p}", res["results"]))

    @catalog_app.command("similar")
    def similar(
        query: str = typer.Argument(..., help="A track id, a catalogued file, or any audio "
                                    "file or URL (tagged now with the catalog's model)."),
        db: Path = DB_OPTION,
        k: int = typer.Option(10, "-k", "--k", min=1, help="Neighbours returned."),
        index: str = typer.Option("auto", "--index", help="auto (exact below 100,000 "
                                  "tracks, else HNSW), exact or hnsw."),
        fmt: Shown = typer.Option(Shown.table, "--format", "-f"),
    ) -> None:
        """The tracks that sound most like QUERY (cosine of track embeddings)."""
        from rtagger.catalog.query import similar as find_similar
        from rtagger.catalog.store import Catalog

        try:
            with Catalog(db, create=False) as catalog:
                res = find_similar(catalog, query, k=k, kind=index)
        except RtaggerError as e:
            raise _fail(str(e)) from None
        if fmt is Shown.json:
            _print_json(res)
            return
        out, _ = _consoles()
        out.print(_results_table(f"like {Path(res['query']['source']).name} "
                                 f"({res['index']} search of {res['tracks_searched']} tracks)",
                                 res["results"]))

    @catalog_app.command("export")
    def export(
        db: Path = DB_OPTION,
        fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", "-f"),
        out: Path = typer.Option(None, "--out", "-o", help="Output file (parquet: required; "
                                 "others: stdout without it)."),
        embeddings: bool = typer.Option(False, "--embeddings", help="Include the track "
                                        "embeddings."),
    ) -> None:
        """Write the catalog's tracks and tag probabilities as parquet, CSV, JSONL or JSON."""
        from rtagger.catalog.export import export_catalog
        from rtagger.catalog.store import Catalog

        try:
            with Catalog(db, create=False) as catalog:
                n = export_catalog(catalog, fmt.value, out, embeddings=embeddings,
                                   stdout=sys.stdout)
        except RtaggerError as e:
            raise _fail(str(e)) from None
        if out is not None:
            _, err = _consoles()
            err.print(f"{n} tracks -> {out}", highlight=False)

    @catalog_app.command("info")
    def info(
        db: Path = DB_OPTION,
        fmt: Shown = typer.Option(Shown.table, "--format", "-f"),
    ) -> None:
        """Tracks per tagging setup (model, hop, aggregation) and the failed files."""
        from rtagger.catalog.store import Catalog

        try:
            with Catalog(db, create=False) as catalog:
                res = {"db": str(db), "tracks": catalog.count(),
                       "setups": [{"id": s.id, "model": s.model_name,
                                   "model_source": s.model_source,
                                   "weights_sha256": s.weights_sha256, "trained": s.trained,
                                   "vocabulary": s.vocabulary, "hop_s": s.hop_s,
                                   "aggregation": s.aggregation, "tracks": n}
                                  for s, n in catalog.setups()],
                       "failures": catalog.failures()}
        except RtaggerError as e:
            raise _fail(str(e)) from None
        if fmt is Shown.json:
            _print_json(res)
            return
        out, _ = _consoles()
        out.print(f"{res['tracks']} tracks in {db}", highlight=False)
        for s in res["setups"]:
            out.print(f"  setup {s['id']}: {s['tracks']} tracks, model {s['model']} "
                      f"({s['weights_sha256'][:12]}...), {s['vocabulary']}, hop {s['hop_s']:.2f}"
                      f" s, {s['aggregation']}", highlight=False)
        for f in res["failures"]:
            out.print(f"  failed: {f['reason']}", highlight=False)

    @catalog_app.command("bench-index")
    def bench_index_command(
        sizes: str = typer.Option("100000,1000000", "--sizes", help="Comma-separated "
                                  "catalog sizes (synthetic embeddings)."),
        dim: int = typer.Option(128, "--dim", min=2, help="Embedding size (the default "
                                "model's: 128)."),
        queries: int = typer.Option(1000, "--queries", min=10),
        k: int = typer.Option(10, "-k", min=1),
        no_exact: bool = typer.Option(False, "--no-exact", help="Skip exact search (its "
                                      "timing and HNSW's recall)."),
        output: Path = typer.Option(None, "--output", "-o", help="Also write the JSON here."),
    ) -> None:
        """Index build time and one-query latency (p50/p99), exact vs HNSW, with recall."""
        from rtagger.atomic import atomic_write
        from rtagger.catalog.bench import bench_index

        try:
            res = bench_index([int(s) for s in sizes.split(",")], dim, queries, k,
                              exact=not no_exact)
        except (RtaggerError, ValueError) as e:
            raise _fail(str(e)) from None
        if output is not None:
            atomic_write(output, json.dumps(res, indent=2) + "\n")
        _print_json(res)

    @catalog_app.command("bench-quality")
    def bench_quality(
        db: Path = DB_OPTION,
        k: int = typer.Option(10, "-k", min=1),
        output: Path = typer.Option(None, "--output", "-o", help="Also write the JSON here."),
    ) -> None:
        """precision@k of same-genre and same-groove neighbours against chance (a catalog
        added from the synthetic benchmark's manifest)."""
        from rtagger.atomic import atomic_write
        from rtagger.catalog.bench import neighbour_quality
        from rtagger.catalog.store import Catalog

        try:
            with Catalog(db, create=False) as catalog:
                res = neighbour_quality(catalog, k)
        except RtaggerError as e:
            raise _fail(str(e)) from None
        if output is not None:
            atomic_write(output, json.dumps(res, indent=2) + "\n")
        _print_json(res)

    @catalog_app.command("bench-prepare")
    def bench_prepare(
        manifest: Path = typer.Argument(..., help="A manifest (e.g. data/synth/test/"
                                        "manifest.jsonl)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the MP3s and their "
                                 "manifest."),
        limit: int = typer.Option(None, "--limit", min=1, help="First N songs only."),
        rate: int = typer.Option(44_100, "--rate", help="MP3 sample rate (Hz)."),
    ) -> None:
        """Transcode a manifest's songs to stereo 192 kb/s MP3 for throughput runs."""
        from rtagger.catalog.bench import prepare_mp3s

        try:
            written = prepare_mp3s(manifest, out, limit, rate)
        except RtaggerError as e:
            raise _fail(str(e)) from None
        typer.echo(f"{written}")
