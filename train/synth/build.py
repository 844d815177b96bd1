"""The parallel, resumable build of the synthetic labelled benchmark (``rtagger data synth``).

Each song is planned from a seed (groove, tempo, key, chord progression, lead instrument,
structure events: :mod:`~rtagger.train.synth.plan`, over the grooves of
:mod:`~rtagger.train.synth.grooves`), written as an MMA file, turned into MIDI by ``mma``
and edited with :mod:`mido` (lead melody, re-voicing, tempo change, key change, breakdown:
:mod:`~rtagger.train.synth.arrange`), rendered by ``fluidsynth`` and stored as 16 kHz mono
FLAC (:mod:`~rtagger.train.synth.render`). Tags and the timeline are computed from the
edited MIDI that was rendered, never from the plan (:mod:`~rtagger.train.synth.labels`).

Output folder::

    manifest.jsonl      one JSON object per song (id, path, duration, tags, split, groove,
                        seed, soundfont, timeline, ...), sorted by song index at the end
    audio/<id>.flac     16 kHz mono
    midi/<id>.mid       the MIDI that was rendered (tags can be recomputed from it)
    synth_config.json   the options; resuming with other options is refused
    failures.jsonl      songs that failed every attempt (only when some did)

Builds are deterministic (song ``i`` of split ``s`` with seed ``k`` is always the same),
parallel over processes and resumable: a song is finished once its manifest line is
written, which happens only after its audio and MIDI were renamed from temporary names.

Needs ``apt-get install mma fluidsynth fluid-soundfont-gm timgm6mb-soundfont``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtagger.atomic import atomic_write
from rtagger.audio.decode import SAMPLE_RATE
from rtagger.jsonl import JsonlAppender, JsonlError, read_records
from rtagger.train.synth.grooves import SynthError, check_soundfonts, check_tools
from rtagger.train.synth.plan import GENERATOR_VERSION, plan_song
from rtagger.train.synth.render import DEFAULT_RENDER_RATE_HZ, SCRATCH_DIR, synthesize_song

log = logging.getLogger(__name__)

RECOMMENDED_SONGS = {"train": 2000, "valid": 300, "test": 500}
MAX_ATTEMPTS = 4  # a failing song is retried with a new seed this many times in all


@dataclass
class BuildResult:
    """What :func:`run_build` did."""

    manifest: Path
    rendered: int = 0  # songs made by this run
    skipped: int = 0  # songs already in the manifest
    failed: list[tuple[int, str]] = field(default_factory=list)
    audio_s: float = 0.0  # seconds of audio made by this run
    wall_s: float = 0.0

    @property
    def songs_per_min(self) -> float:
        return 60.0 * self.rendered / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def realtime_factor(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


# --- One song per job (in a worker process), retried with new seeds -----------------------
@dataclass(frozen=True)
class _Job:
    out_dir: str
    split: str
    index: int
    seed: int
    min_s: float
    max_s: float
    soundfonts: tuple[str, ...]
    force_structure: bool
    render_rate_hz: int


def _song_worker(job: _Job) -> tuple[int, dict[str, Any] | None, list[str]]:
    """Make song ``job.index``, retrying with new seeds; never raises."""
    problems = []
    for attempt in range(MAX_ATTEMPTS):
        plan = None
        try:
            plan = plan_song(job.split, job.index, job.seed, attempt, job.min_s, job.max_s,
                             job.soundfonts, job.force_structure)
            return job.index, synthesize_song(plan, job.out_dir, job.render_rate_hz), problems
        except SynthError as err:
            where = f"{plan.groove_file}:{plan.groove}" if plan else "planning"
            problems.append(f"attempt {attempt} ({where}): {err}")
        except Exception as err:  # one song's bug must not end a long build
            where = f"{plan.groove_file}:{plan.groove}" if plan else "planning"
            problems.append(f"attempt {attempt} ({where}): unexpected {type(err).__name__}: {err}")
    return job.index, None, problems


# --- The build ----------------------------------------------------------------------------
def _read_done(manifest: Path) -> dict[int, dict[str, Any]]:
    """Finished songs by index: records whose audio file is there."""
    try:
        records = read_records(manifest)
    except JsonlError as err:
        raise SynthError(str(err)) from err
    return {int(rec["index"]): rec for _, rec in records
            if (manifest.parent / rec["path"]).is_file()}


def _check_config(out_dir: Path, config: dict[str, Any]) -> None:
    path = out_dir / "synth_config.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != config:
            diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
            raise SynthError(
                f"{out_dir} holds a build made with other options {diff} (old, new): "
                "use another --out folder or the same options"
            )
    else:
        path.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def run_build(
    out_dir: str | Path,
    split: str,
    n_songs: int,
    seed: int = 0,
    jobs: int | None = None,
    min_s: float = 40.0,
    max_s: float = 120.0,
    soundfonts: Sequence[str | Path] | None = None,
    progress: bool = True,
    *,
    force_structure: bool = False,
    render_rate_hz: int = DEFAULT_RENDER_RATE_HZ,
) -> BuildResult:
    """Build (or finish) songs ``0..n_songs-1`` of ``split`` into ``out_dir``.

    Resumable: songs already in the manifest (with their audio) are kept; run again with a
    larger ``n_songs`` to extend a build. ``jobs`` processes (default: CPU count).
    ``soundfonts`` defaults to FluidR3_GM and TimGM6mb (the only ones train/valid accept).
    ``render_rate_hz`` is FluidSynth's rate (resampled to 16 kHz); ``force_structure`` is
    for tests. Songs failing every retry are logged, listed in
    ``failures.jsonl`` and left out; they never stop the build. The result names the
    manifest (``.manifest``) and counts what was rendered, skipped and failed.
    """
    if n_songs < 0:
        raise SynthError(f"--songs must be >= 0, got {n_songs}")
    if not SAMPLE_RATE <= render_rate_hz <= 96_000:
        raise SynthError(f"render rate must be {SAMPLE_RATE}-96000 Hz, got {render_rate_hz}")
    fonts = check_soundfonts(split, soundfonts)
    check_tools(fonts)
    plan_song(split, 0, seed, 0, min_s, max_s, fonts)  # option errors before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, {
        "generator": GENERATOR_VERSION, "split": split, "seed": seed, "min_s": min_s,
        "max_s": max_s, "soundfonts": [str(f) for f in fonts],
        "force_structure": force_structure, "render_rate_hz": render_rate_hz,
    })
    for stale in [*out.glob("audio/.*.tmp"), *out.glob("midi/.*.tmp")]:
        stale.unlink()  # left by a killed build (atomic_path temporaries)
    shutil.rmtree(out / SCRATCH_DIR, ignore_errors=True)
    manifest = out / "manifest.jsonl"
    done = _read_done(manifest)
    todo = [i for i in range(n_songs) if i not in done]
    result = BuildResult(manifest, skipped=n_songs - len(todo))
    jobs = max(1, jobs or os.cpu_count() or 1)
    job_args = [
        _Job(str(out), split, i, seed, min_s, max_s, tuple(map(str, fonts)), force_structure,
             render_rate_hz)
        for i in todo
    ]
    start = time.perf_counter()
    with JsonlAppender(manifest, durable=True) as f, _progress(progress) as bar:
        task = bar.add_task(f"synth {split}", total=n_songs, completed=result.skipped)

        def finish(index: int, record: dict[str, Any] | None, problems: list[str]) -> None:
            for msg in problems:
                log.warning("song %d: %s", index, msg)
            if record is None:
                result.failed.append((index, "; ".join(problems)))
                log.error("song %d failed %d attempts; left out", index, MAX_ATTEMPTS)
            else:
                f.write(record)  # on disk before the song counts as done
                done[index] = record
                result.rendered += 1
                result.audio_s += record["duration"]
            bar.advance(task)

        if jobs == 1 or len(job_args) <= 1:
            for job in job_args:
                finish(*_song_worker(job))
        else:
            # spawn: no fork of a process that runs the progress bar's thread
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(job_args)), mp_context=ctx)
            try:
                futures = [pool.submit(_song_worker, job) for job in job_args]
                for fut in as_completed(futures):
                    finish(*fut.result())
            except BaseException:
                # Ctrl-C: drop the queued songs instead of waiting for the whole build
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    result.wall_s = time.perf_counter() - start
    _finalise(out, manifest, done, result.failed)
    return result


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def _finalise(
    out: Path, manifest: Path, done: dict[int, dict], failed: list[tuple[int, str]]
) -> None:
    # Sorted by index, so that two builds with the same options give the same manifest.
    atomic_write(manifest, "".join(
        json.dumps(done[index], ensure_ascii=False, separators=(",", ":")) + "\n"
        for index in sorted(done)))
    shutil.rmtree(out / SCRATCH_DIR, ignore_errors=True)
    failures = out / "failures.jsonl"
    if failed:
        with open(failures, "w", encoding="utf-8") as f:
            for index, why in sorted(failed):
                f.write(json.dumps({"index": index, "error": why}) + "\n")
    elif failures.exists():
        failures.unlink()
