"""``rtagger data ...`` and ``rtagger train ...``: building datasets and training models.

Each data module keeps its own thin typer command next to its library functions and adds it
here through ``register(app)``; heavy imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import typer

from rtagger.audio import WINDOW_S
from rtagger.errors import RtaggerError
from rtagger.train import cache_cli, pool
from rtagger.train.teachers import cli as teachers

data_app = typer.Typer(
    help="Build datasets: the synthetic labelled benchmark, the unlabelled pool, caches.",
    no_args_is_help=True,
)
train_app = typer.Typer(
    help="Train models: teacher, noisy student, distilled student, context aggregator.",
    no_args_is_help=True,
)

pool.register(data_app)
cache_cli.register(data_app)
teachers.register(data_app)


def _register_synth() -> None:
    try:
        from rtagger.train import synth
    except ModuleNotFoundError as e:
        if e.name != "mido":
            raise

        @data_app.command("synth")
        def synth_unavailable() -> None:
            """Build the synthetic benchmark (needs the train extra: pip install rtagger[train])."""
            typer.echo("error: `rtagger data synth` needs mido: pip install 'rtagger[train]'",
                       err=True)
            raise typer.Exit(2)

        return
    synth.register(data_app)


_register_synth()


def register(app: typer.Typer) -> None:
    """Add the ``data`` and ``train`` groups to the ``rtagger`` CLI (the entry point that
    pyproject.toml names in the ``rtagger.commands`` group)."""
    app.add_typer(data_app, name="data")
    app.add_typer(train_app, name="train")


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


@train_app.command("run")
def run_recipe(
    recipe: Path = typer.Argument(..., help="A recipe TOML (train/recipes/*.toml)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default "
                             "runs/<recipe name>)."),
    set_: list[str] = typer.Option([], "--set", help="Override: section.key=value."),
    device: str = typer.Option(None, "--device"),
) -> None:
    """Train one stage from a recipe; resumes from OUT/last.pt after a kill."""
    from rtagger.train.loop import train
    from rtagger.train.recipe import load_recipe
    from rtagger.train.tasks import make_task

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
    from rtagger.train.manifest import read_manifest
    from rtagger.train.pseudo import pseudo_label

    try:
        tracks = [t for m in manifest for t in read_manifest(m)]
        report = pseudo_label(teacher, tracks, cache, out, hop_s=hop)
    except RtaggerError as e:
        raise _fail(e) from None
    typer.echo(f"{report.shards_written} shards written, {report.shards_skipped} already "
               f"done, {report.windows} windows labelled -> {out}")


@train_app.command("pipeline")
def pipeline(
    file: Path = typer.Argument(..., help="Pipeline TOML (train/recipes/pipeline*.toml)."),
    root: Path = typer.Option(Path("."), "--root", help="Folder for data/ and runs/."),
    only: str = typer.Option(None, "--only", help="Run just this step."),
) -> None:
    """Run every step of a pipeline in order; each step resumes where it stopped."""
    from rtagger.train.pipeline import run_pipeline

    try:
        run_pipeline(file, root, only)
    except RtaggerError as e:
        raise _fail(e) from None


@train_app.command("evaluate")
def evaluate(
    model: str = typer.Argument(..., help="Checkpoint to score (a file or 'default')."),
    manifest: Path = typer.Option(..., "--manifest", help="Labelled manifest (e.g. test)."),
    cache: Path = typer.Option(Path("data/cache"), "--cache"),
    out: Path = typer.Option(..., "--out", "-o"),
    hop: float = typer.Option(WINDOW_S, "--hop"),
) -> None:
    """ROC-AUC / PR-AUC per tag and group, window and song level, as JSON + Markdown + plots."""
    from rtagger.train.manifest import read_manifest
    from rtagger.train.scoring import score_and_report

    try:
        paths = score_and_report(model, read_manifest(manifest), cache, out, hop_s=hop)
    except RtaggerError as e:
        raise _fail(e) from None
    typer.echo("\n".join(str(p) for p in paths))


@train_app.command("compare")
def compare(
    rows: list[str] = typer.Argument(..., help="Evaluation folders, DIR or DIR@LEVEL "
                                                 "(LEVEL e.g. song/aggregator)."),
    reference: int = typer.Option(0, "--reference", help="Index of the reference row."),
    labels: str = typer.Option(None, "--labels", help="Comma-separated row names."),
    title: str = typer.Option("", "--title"),
    cost: bool = typer.Option(True, "--cost/--no-cost",
                              help="MACs, parameters and batch-1 CPU latency per window."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=1, help="Resamples for the CI."),
    latency_s: float = typer.Option(10.0, "--latency-s", min=0.01,
                                    help="Seconds of timed batch-1 calls per model."),
    out: Path = typer.Option(None, "--out", "-o", help="Append the Markdown here."),
) -> None:
    """Evaluations side by side: deltas with paired bootstrap CIs, cost, per tag group."""
    from rtagger.train.compare import compare_markdown, load_row, model_cost

    names = labels.split(",") if labels else [None] * len(rows)
    if len(names) != len(rows):
        raise _fail(RtaggerError(f"{len(names)} labels for {len(rows)} rows"))
    if not 0 <= reference < len(rows):
        raise _fail(RtaggerError(f"--reference {reference} is not a row index"))
    try:
        loaded = [load_row(spec, name) for spec, name in zip(rows, names, strict=True)]
        costs = ({r.label: model_cost(r.meta["model"], budget_s=latency_s) for r in loaded}
                 if cost else None)
        text = compare_markdown(loaded, reference, costs, title, bootstrap)
    except RtaggerError as e:
        raise _fail(e) from None
    if out is not None:
        with out.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
    typer.echo(text)


@data_app.command("mixes")
def mixes(
    manifest: Path = typer.Option(..., "--manifest", help="Songs to mix (e.g. the test split)."),
    out: Path = typer.Option(Path("data/mixes"), "--out", "-o"),
    n: int = typer.Option(20, "--mixes", min=1),
    per_mix: int = typer.Option(4, "--tracks-per-mix", min=2),
    max_fade: float = typer.Option(8.0, "--max-crossfade", help="Seconds."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Simulated DJ mixes with crossfades and their true track boundaries."""
    from rtagger.train.manifest import read_manifest
    from rtagger.train.mixes import build_mixes

    try:
        built = build_mixes(read_manifest(manifest), out, n, tracks_per_mix=per_mix,
                            max_crossfade_s=max_fade, seed=seed)
    except RtaggerError as e:
        raise _fail(e) from None
    hours = sum(m.duration_s for m in built) / 3600
    typer.echo(f"{len(built)} mixes, {hours:.2f} h, in {out}")


@train_app.command("segeval")
def segeval(
    model: str = typer.Argument(..., help="Checkpoint whose embeddings drive segmentation."),
    mixes_dir: Path = typer.Option(Path("data/mixes"), "--mixes"),
    hop: float = typer.Option(1.0, "--hop"),
    tolerance: float = typer.Option(3.0, "--tolerance", help="Seconds."),
    threshold: float = typer.Option(None, "--threshold", help="Segmenter cosine threshold."),
    confirm: int = typer.Option(None, "--confirm", min=1,
                                help="Consecutive novel windows for a boundary."),
    sweep: str = typer.Option(None, "--sweep", help="Thresholds to try, e.g. 0.1,0.2,0.3 "
                                                    "(tag once, score each; tune on valid)."),
    confirm_sweep: str = typer.Option(None, "--confirm-sweep",
                                      help="Confirm counts to try with --sweep, e.g. 2,4,6."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the JSON result here."),
) -> None:
    """Track-change detection on simulated mixes: boundary F-measure, false boundaries/hour."""
    import json
    from dataclasses import replace

    from rtagger.stream import SegmenterConfig
    from rtagger.train.mixes import evaluate_segmentation, read_mixes, sweep_segmentation

    cfg = SegmenterConfig()
    if threshold is not None:
        cfg = replace(cfg, threshold=threshold)
    if confirm is not None:
        cfg = replace(cfg, confirm=confirm)
    found = read_mixes(mixes_dir)
    if not found:
        raise _fail(RtaggerError(f"no mixes in {mixes_dir}; run `rtagger data mixes`"))
    try:
        if sweep:
            thresholds = [float(v) for v in sweep.split(",")]
            confirms = ([int(v) for v in confirm_sweep.split(",")] if confirm_sweep
                        else [cfg.confirm])
            result = sweep_segmentation(model, found, thresholds, confirms, hop_s=hop,
                                        tolerance_s=tolerance, base=cfg)
        else:
            result = evaluate_segmentation(model, found, hop_s=hop, tolerance_s=tolerance,
                                           cfg=cfg)
    except ValueError as e:
        raise _fail(RtaggerError(f"--sweep/--confirm-sweep: {e}")) from None
    except RtaggerError as e:
        raise _fail(e) from None
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text)
    typer.echo(text)
