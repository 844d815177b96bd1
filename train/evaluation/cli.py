"""Evaluation commands: ``rtagger train evaluate|compare|segeval|realcheck|probe|...``."""

from __future__ import annotations

from pathlib import Path

import typer

from rtagger.audio.decode import WINDOW_S
from rtagger.errors import RtaggerError


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def register(data_app: typer.Typer, train_app: typer.Typer) -> None:
    """Add the evaluation commands: ``mixes`` builds data, the rest score models."""

    @train_app.command("evaluate")
    def evaluate(
        model: str = typer.Argument(..., help="Checkpoint to score (a file or 'default')."),
        manifest: Path = typer.Option(..., "--manifest", help="Labelled manifest (e.g. test)."),
        cache: Path = typer.Option(Path("data/cache"), "--cache"),
        out: Path = typer.Option(..., "--out", "-o"),
        hop: float = typer.Option(WINDOW_S, "--hop"),
    ) -> None:
        """ROC-AUC / PR-AUC per tag and group, window and song level, as JSON + Markdown + plots."""
        from rtagger.train.data.manifest import read_manifest
        from rtagger.train.evaluation.scoring import score_and_report

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
        from rtagger.train.evaluation.compare import compare_markdown, load_row, model_cost

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
        manifest: Path = typer.Option(..., "--manifest",
                                      help="Songs to mix (e.g. the test split, the pool)."),
        out: Path = typer.Option(Path("data/mixes"), "--out", "-o"),
        n: int = typer.Option(20, "--mixes", min=1),
        per_mix: int = typer.Option(4, "--tracks-per-mix", min=2),
        min_fade: float = typer.Option(0.0, "--min-crossfade",
                                       help="Seconds; at 0 a fifth of the changes are cuts."),
        max_fade: float = typer.Option(8.0, "--max-crossfade", help="Seconds."),
        fraction: float = typer.Option(1.0, "--subset-fraction",
                                       help="Keep labelled_subset(tracks, F, seed) only; "
                                            "0.1 with seed 7 is the pool's held-out tenth."),
        subset_seed: int = typer.Option(0, "--subset-seed"),
        part: str = typer.Option(None, "--part", help="tune or test: one half of the subset, "
                                 "split by track; tune the segmenter on one, report the other."),
        min_track: float = typer.Option(0.0, "--min-track-s", help="Skip shorter tracks."),
        max_track: float = typer.Option(None, "--max-track-s",
                                        help="Use each track's middle this many seconds."),
        tempo_match: bool = typer.Option(False, "--tempo-match",
                                         help="Speed the incoming track up or down (pitch "
                                              "with it) to the outgoing tempo, within 8 %."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Simulated DJ mixes with crossfades and their true track boundaries."""
        from rtagger.train.data.manifest import read_manifest
        from rtagger.train.evaluation.mixes import build_mixes, select_tracks

        try:
            tracks = select_tracks(read_manifest(manifest), subset_fraction=fraction,
                                   subset_seed=subset_seed, min_track_s=min_track, part=part)
            built = build_mixes(tracks, out, n, tracks_per_mix=per_mix,
                                min_crossfade_s=min_fade, max_crossfade_s=max_fade,
                                max_track_s=max_track, tempo_match=tempo_match, seed=seed)
        except RtaggerError as e:
            raise _fail(e) from None
        hours = sum(m.duration_s for m in built) / 3600
        typer.echo(f"{len(built)} mixes of {len(tracks)} tracks, {hours:.2f} h, in {out}")

    @train_app.command("probe")
    def probe(
        model: str = typer.Argument(..., help="Checkpoint (a file or 'default')."),
        valid: Path = typer.Option(..., "--valid", help="Songs to fit the tempo regression."),
        test: Path = typer.Option(..., "--test", help="Songs the rules are scored on."),
        out: Path = typer.Option(..., "--out", "-o"),
        hops: str = typer.Option(f"{WINDOW_S},1.0", "--hops", help="Window hops, seconds."),
    ) -> None:
        """How much of breakdown and tempo_change the window outputs hold (fixed rules)."""
        from rtagger.train.data.manifest import read_manifest
        from rtagger.train.evaluation.probe import probe as measure
        from rtagger.train.evaluation.probe import report_markdown, write_report

        try:
            hop_list = tuple(float(v) for v in hops.split(","))
        except ValueError:
            raise _fail(RtaggerError(f"--hops {hops!r}: give seconds like 3.69,1.0")) from None
        try:
            report = measure(model, read_manifest(valid), read_manifest(test), hops=hop_list)
            write_report(report, out)
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(report_markdown(report))

    @train_app.command("convergence")
    def convergence(
        model: str = typer.Argument(..., help="Checkpoint (a file or 'default')."),
        manifest: Path = typer.Option(..., "--manifest", help="Labelled songs (e.g. test)."),
        out: Path = typer.Option(..., "--out", "-o"),
        hop: float = typer.Option(1.0, "--hop", help="Seconds between windows (as served)."),
        at: str = typer.Option("15,30,60,120", "--at", help="Seconds into the stream."),
    ) -> None:
        """Live track tags at 15/30/60/120 s into a stream vs the whole song, and vs truth."""
        from rtagger.train.data.manifest import read_manifest
        from rtagger.train.evaluation.convergence import convergence as measure
        from rtagger.train.evaluation.convergence import report_markdown, write_report

        try:
            checkpoints = tuple(sorted(float(v) for v in at.split(",")))
        except ValueError:
            raise _fail(RtaggerError(f"--at {at!r}: give seconds like 15,30,60")) from None
        try:
            report = measure(model, read_manifest(manifest), hop_s=hop,
                             checkpoints=checkpoints)
            write_report(report, out)
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(report_markdown(report))

    @train_app.command("speed")
    def speed(
        files: list[Path] = typer.Argument(..., help="Audio files (the same for both)."),
        teacher: Path = typer.Option(..., "--teacher", help="Converted musicnn teacher "
                                     "(rtagger data teachers), e.g. MTT_musicnn."),
        model: str = typer.Option("default", "--model"),
        threads: int = typer.Option(None, "--threads", min=1, help="torch threads."),
        out: Path = typer.Option(None, "--out", "-o", help="Write the JSON report here."),
    ) -> None:
        """CPU time of rtagger's model vs a musicnn teacher on the same files."""
        import json

        from rtagger.train.evaluation.speed import compare_cpu, speed_markdown

        try:
            report = compare_cpu([str(f) for f in files], teacher, model, threads)
        except RtaggerError as e:
            raise _fail(e) from None
        if out is not None:
            out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(speed_markdown(report))

    @train_app.command("fidelity")
    def fidelity_cmd(
        pseudo: list[Path] = typer.Argument(..., help="Pseudo-label folders of the teachers' "
                                            "labels of held-out tracks (e.g. the "
                                            "pipeline's v2-pseudo-holdout)."),
        model: str = typer.Option("default", "--model"),
        cache: Path = typer.Option(Path("data/cache"), "--cache"),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for fidelity.json/.md."),
        device: str = typer.Option("cpu", "--device"),
    ) -> None:
        """Fidelity of a model to its teachers on whole held-out tracks (Pearson r, MAE,
        top-5 overlap per tag group, bootstrap intervals)."""
        from rtagger.train.evaluation.fidelity import fidelity, fidelity_markdown

        try:
            report = fidelity(model, [str(p) for p in pseudo], cache, out, device=device)
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(fidelity_markdown(report))

    @train_app.command("speed-process")
    def speed_process(
        files: list[Path] = typer.Argument(..., help="Audio files (the same for both)."),
        musicnn_python: Path = typer.Option(..., "--musicnn-python", help="A Python that has "
                                            "musicnn and TensorFlow, e.g. "
                                            ".venv-teachers/bin/python."),
        musicnn_model: str = typer.Option("MTT_musicnn", "--musicnn-model"),
        model: str = typer.Option("default", "--model"),
        repeats: int = typer.Option(1, "--repeats", min=1, help="Runs of each; the median."),
        threads: int = typer.Option(None, "--threads", min=1, help="Threads (and CPUs) for "
                                    "both processes (default: no limit)."),
        out: Path = typer.Option(None, "--out", "-o", help="Write the JSON report here."),
    ) -> None:
        """Wall, CPU time and peak memory of one `rtagger tag` process vs one process of
        musicnn's own TensorFlow package on the same files (imports and loading included)."""
        import json

        from rtagger.train.evaluation.speed_process import (
            compare_processes,
            speed_process_markdown,
        )

        try:
            report = compare_processes([str(f) for f in files], musicnn_python, musicnn_model,
                                       model, repeats, threads)
        except RtaggerError as e:
            raise _fail(e) from None
        if out is not None:
            out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(speed_process_markdown(report))

    @train_app.command("segeval")
    def segeval(
        model: str = typer.Argument(..., help="Checkpoint whose embeddings drive segmentation."),
        mixes_dir: Path = typer.Option(Path("data/mixes"), "--mixes"),
        hop: float = typer.Option(1.0, "--hop"),
        tolerance: float = typer.Option(3.0, "--tolerance", help="Seconds."),
        within_crossfade: bool = typer.Option(
            False, "--within-crossfade",
            help="Measure the tolerance from each end of the crossfade, not its middle."),
        threshold: float = typer.Option(None, "--threshold", help="Segmenter cosine threshold."),
        confirm: int = typer.Option(None, "--confirm", min=1,
                                    help="Consecutive novel windows for a boundary."),
        sweep: str = typer.Option(None, "--sweep", help="Thresholds to try, e.g. 0.1,0.2,0.3 "
                                                        "(tag once, score each; tune on valid)."),
        confirm_sweep: str = typer.Option(None, "--confirm-sweep",
                                          help="Confirm counts to try with --sweep, e.g. 2,4,6."),
        whole_embedding: bool = typer.Option(
            False, "--whole-embedding",
            help="Compare the chroma and tempo profiles too, not the CLS embedding alone "
                 "as the live segmenter does."),
        out: Path = typer.Option(None, "--out", "-o", help="Write the JSON result here."),
    ) -> None:
        """Track-change detection on simulated mixes: boundary F-measure, false boundaries/hour."""
        import json
        from dataclasses import replace

        from rtagger.pipeline.session import SegmenterConfig
        from rtagger.train.evaluation.mixes import (
            evaluate_segmentation,
            read_mixes,
            sweep_segmentation,
        )

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
                                            tolerance_s=tolerance, base=cfg,
                                            within_crossfade=within_crossfade,
                                            whole_embedding=whole_embedding)
            else:
                result = evaluate_segmentation(model, found, hop_s=hop, tolerance_s=tolerance,
                                               cfg=cfg, within_crossfade=within_crossfade,
                                               whole_embedding=whole_embedding)
        except ValueError as e:
            raise _fail(RtaggerError(f"--sweep/--confirm-sweep: {e}")) from None
        except RtaggerError as e:
            raise _fail(e) from None
        text = json.dumps(result, indent=2)
        if out is not None:
            out.write_text(text)
        typer.echo(text)

    @train_app.command("realcheck")
    def realcheck(
        checks: Path = typer.Option(Path("data/realchecks/manifest.jsonl"), "--checks",
                                    help="Manifest of `rtagger data realchecks`."),
        model: list[str] = typer.Option([], "--model", "-m", help="rtagger checkpoint "
                                        "(file, export folder or 'default'); repeatable."),
        musicnn: list[Path] = typer.Option([], "--musicnn", help="Converted musicnn teacher "
                                           "(data/teachers/*.safetensors); repeatable."),
        out: Path = typer.Option(..., "--out", "-o", help="JSON report."),
        markdown: Path = typer.Option(None, "--markdown", help="Also write the Markdown here."),
        bootstrap: int = typer.Option(1000, "--bootstrap", min=1, help="Resamples of tracks."),
        seed: int = typer.Option(0, "--seed"),
        min_per_class: int = typer.Option(5, "--min-per-class", min=1,
                                          help="Positive and negative tracks a tag needs."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
        cache: Path = typer.Option(None, "--cache", help="Track scores kept between runs "
                                   "(default: scores/ beside --checks)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Keep no scores."),
    ) -> None:
        """Models vs musicnn teachers on the real checks: per-tag and macro AUCs, paired CIs."""
        from rtagger.train.evaluation.realcheck import report_markdown, run_realcheck

        keep = None if no_cache else cache or checks.parent / "scores"
        try:
            report = run_realcheck(checks, model, musicnn, out, markdown=markdown,
                                   device=device, bootstrap=bootstrap, seed=seed, cache_dir=keep,
                                   min_per_class=min_per_class)
        except RtaggerError as e:
            raise _fail(e) from None
        typer.echo(report_markdown(report))
