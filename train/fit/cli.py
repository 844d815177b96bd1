"""``rtagger train run``, ``pseudo`` and ``head``: thin commands over the fit room."""

from __future__ import annotations

from pathlib import Path

import typer

from rtagger.audio.decode import WINDOW_S
from rtagger.errors import RtaggerError


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def register(data_app: typer.Typer, train_app: typer.Typer) -> None:
    """Add ``run``, ``pseudo``, ``head``, ``head-labels`` and ``head-bench`` to the
    ``rtagger train`` group (none go under ``data``)."""
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
        teacher: Path = typer.Option(None, "--teacher", help="Teacher checkpoint (with "
                                     "--musicnn: the member for v1's tags)."),
        manifest: list[Path] = typer.Option(..., "--manifest", help="Unlabelled manifest(s)."),
        cache: Path = typer.Option(Path("data/cache"), "--cache"),
        out: Path = typer.Option(..., "--out", "-o"),
        hop: float = typer.Option(WINDOW_S, "--hop", help="Seconds between windows."),
        musicnn: list[Path] = typer.Option([], "--musicnn", help="Converted musicnn teacher "
                                           "(repeatable): label vocabulary v2 with the "
                                           "ensemble (rtagger data teachers)."),
    ) -> None:
        """Label every window of unlabelled audio with a teacher (resumable, torchrun-able).

        Tags in the manifests are ignored: labelled songs can join the pool with labels hidden.
        """
        from rtagger.train.data.manifest import read_manifest
        from rtagger.train.fit.pseudo import pseudo_label

        try:
            tracks = [t for m in manifest for t in read_manifest(m)]
            report = pseudo_label(teacher, tracks, cache, out, hop_s=hop,
                                  musicnn=tuple(musicnn))
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(f"{report.shards_written} shards written, {report.shards_skipped} already "
                   f"done, {report.windows} windows labelled -> {out}")

    @train_app.command("head")
    def head(
        db: Path = typer.Option(..., "--db", help="A catalog (rtagger catalog add)."),
        labels: Path = typer.Option(..., "--labels", help="CSV: track,TAG1,TAG2,... with "
                                    "1 / 0 / blank (unknown) per tag."),
        out: Path = typer.Option(..., "--out", "-o", help="The checkpoint to write."),
        truth: Path = typer.Option(None, "--truth", help="Clean labels (same CSV form) to "
                                   "score the cross-validated predictions against."),
        epochs: int = typer.Option(300, "--epochs", min=1),
        folds: int = typer.Option(5, "--folds", min=2),
        weight_decay: float = typer.Option(1e-3, "--weight-decay", min=0.0),
        seed: int = typer.Option(0, "--seed"),
        report_out: Path = typer.Option(None, "--report", help="Also write the JSON report."),
    ) -> None:
        """Learn a platform's own tags on the catalog's frozen embeddings; cross-validated
        report (ROC/PR per tag with intervals, calibration) and a standard checkpoint."""
        import json

        from rtagger.atomic import atomic_write
        from rtagger.train.fit.head import HeadConfig, train_head

        try:
            report = train_head(db, labels, out, HeadConfig(epochs=epochs, folds=folds,
                                                            weight_decay=weight_decay,
                                                            seed=seed), truth)
        except RtaggerError as e:
            raise _fail(e) from None
        text = json.dumps(report, indent=2) + "\n"
        if report_out is not None:
            atomic_write(report_out, text)
        typer.echo(text, nl=False)

    @train_app.command("head-labels")
    def head_labels(
        db: Path = typer.Option(..., "--db", help="A catalog added from a manifest."),
        tags: str = typer.Option(..., "--tags", help="Comma-separated tags to label."),
        hide: float = typer.Option(0.7, "--hide", help="Share of labels left blank."),
        flip: float = typer.Option(0.1, "--flip", help="Share of shown labels inverted."),
        seed: int = typer.Option(0, "--seed"),
        out: Path = typer.Option(..., "--out", "-o", help="The noisy, partial labels CSV."),
        truth_out: Path = typer.Option(..., "--truth-out", help="Every clean label."),
    ) -> None:
        """Benchmark labels for `train head` from a catalog's manifest tags: hidden, flipped."""
        import json

        from rtagger.train.fit.head import noisy_labels

        try:
            res = noisy_labels(db, [t for t in tags.split(",") if t], hide, flip, seed, out,
                               truth_out)
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(json.dumps(res))

    @train_app.command("head-bench")
    def head_bench(
        tracks: int = typer.Option(10_000, "--tracks", min=5, help="Synthetic tracks."),
        tags: int = typer.Option(20, "--tags", min=1, help="Planted platform tags."),
        hide: float = typer.Option(0.7, "--hide", help="Share of labels left blank."),
        flip: float = typer.Option(0.1, "--flip", help="Share of shown labels inverted."),
        seed: int = typer.Option(0, "--seed", help="Generator, labels and head seed."),
        out: Path = typer.Option(Path("head_bench.json"), "--out", "-o",
                                 help="The JSON report."),
        workdir: Path = typer.Option(None, "--workdir", help="Keep the catalog, labels, "
                                     "truth and checkpoint here (default: a temporary "
                                     "folder, removed)."),
        model: str = typer.Option("default", "--model", "-m", help="The base model the "
                                  "catalog names (its output layer makes the taggram)."),
        epochs: int = typer.Option(300, "--epochs", min=1),
        threads: int = typer.Option(None, "--threads", min=1, help="torch threads "
                                    "(default: torch's choice)."),
    ) -> None:
        """Time `train head` on a synthetic catalog with planted tags (not real audio):
        per-phase wall and CPU time, peak RSS, cross-validated ROC/PR vs labels and truth."""
        import json

        from rtagger.atomic import atomic_write
        from rtagger.train.fit.head import HeadConfig
        from rtagger.train.fit.head_bench import SyntheticSpec
        from rtagger.train.fit.head_bench import head_bench as bench

        try:
            report = bench(SyntheticSpec(tracks=tracks, tags=tags, seed=seed), hide, flip,
                           HeadConfig(epochs=epochs, seed=seed), model, workdir, threads)
        except RtaggerError as e:
            raise _fail(e) from None
        atomic_write(out, json.dumps(report, indent=2) + "\n")
        t, cv = report["time"]["train_head"], report["cross_validated"]
        typer.echo(json.dumps({"out": str(out), "train_head_wall_s": t["wall_s"],
                               "train_head_cpu_s": t["cpu_s"],
                               "peak_rss_mib": report["peak_rss_mib"]["after_train_head"],
                               **{k: v for k, v in cv.items()}}))
