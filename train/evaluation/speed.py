"""CPU time of rtagger's model against a musicnn teacher on the same files, side by side.

Each file is decoded once (the decoding is the same for both and not counted); then each
model tags the whole signal the way its users run it: rtagger's :class:`Tagger` (log-mel,
window tagger, track context) and the musicnn teacher's ``taggram`` (its mel front end and
3 s patches, as musicnn's own extractor). CPU time is ``time.process_time()`` (all threads
of this process), so a model that spreads over more cores is not flattered by wall time.
Each model runs once on the first file before timing (lazy initialisation, allocator warm-up).

``rtagger train speed FILES... --teacher data/teachers/MTT_musicnn.safetensors``
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.errors import ConfigError
from rtagger.machine import cpu_model


def compare_cpu(files: list[str | Path], teacher: str | Path, model: str = "default",
                threads: int | None = None) -> dict:
    """CPU seconds per audio hour of ``model`` and ``teacher`` over ``files``, and the ratio."""
    from rtagger.pipeline.tagger import Tagger
    from rtagger.train.teachers.musicnn import load_teacher

    if not files:
        raise ConfigError("no files to time")
    if threads:
        torch.set_num_threads(threads)
    tagger = Tagger(model)
    musicnn = load_teacher(teacher)
    audio = [load_audio(f) for f in files]
    seconds = float(sum(len(a) for a in audio) / SAMPLE_RATE)

    def ours(wave: np.ndarray) -> None:
        tagger.tag_array(wave)

    def theirs(wave: np.ndarray) -> None:
        musicnn.taggram(torch.from_numpy(wave))

    rows = {}
    for name, run in (("rtagger", ours), ("musicnn", theirs)):
        run(audio[0][: SAMPLE_RATE * 10])  # warm-up, not timed
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for wave in audio:
            run(wave)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        rows[name] = {"cpu_s": cpu, "wall_s": wall,
                      "cpu_s_per_audio_hour": cpu / seconds * 3600,
                      "realtime_factor": seconds / wall}
    return {
        "files": len(files), "audio_s": seconds,
        "model": {"name": tagger.model.name, "weights_sha256": tagger.model.weights_sha256},
        "teacher": musicnn.name, "threads": torch.get_num_threads(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "rows": rows,
        "cpu_ratio_musicnn_over_rtagger": rows["musicnn"]["cpu_s"] / rows["rtagger"]["cpu_s"],
    }


def speed_markdown(report: dict) -> str:
    lines = [f"{report['files']} files, {report['audio_s'] / 60:.1f} min of audio, "
             f"{report['threads']} torch threads ({report['machine']}).", "",
             "| model | CPU s | CPU s per audio hour | wall s | x real time |",
             "|---|---:|---:|---:|---:|"]
    names = {"rtagger": f"rtagger `{report['model']['name']}`",
             "musicnn": f"musicnn `{report['teacher']}` (torch port)"}
    for key, r in report["rows"].items():
        lines.append(f"| {names[key]} | {r['cpu_s']:.1f} | {r['cpu_s_per_audio_hour']:.0f} | "
                     f"{r['wall_s']:.1f} | {r['realtime_factor']:.0f} |")
    lines += ["", f"musicnn needs {report['cpu_ratio_musicnn_over_rtagger']:.1f}x the CPU time "
                  f"of rtagger on the same files."]
    return "\n".join(lines) + "\n"
