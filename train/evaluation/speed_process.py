"""Whole-process cost of ``rtagger tag`` against musicnn's own TensorFlow package, side by side.

Where :mod:`~rtagger.train.evaluation.speed` times two models inside one process, this runs
what a user runs: one child process of ``rtagger tag --format json --model M FILES...`` and
one child of a Python interpreter that has musicnn installed, calling musicnn's own
``musicnn.extractor.extractor(file, model=..., extract_features=False)`` on every file in a
loop. Each child's figures include its own imports, model loading and decoding, which is
what a user pays per run:

- wall seconds, from starting the child to reaping it;
- CPU seconds, user + system of that child (all its threads, and any process it waited for)
  from :func:`os.wait4`, so the parent's own work is never counted;
- peak RSS (``ru_maxrss``) in MiB.

With ``repeats`` > 1 each child runs that many times, alternating which goes first, and each
figure is the median of its runs. The musicnn child gets ``TF_USE_LEGACY_KERAS=1`` (musicnn
0.1.0 needs Keras 2), and both get ``CUDA_VISIBLE_DEVICES=""`` and ``TF_CPP_MIN_LOG_LEVEL=2``.
``threads`` sets ``OMP_NUM_THREADS``, ``TF_NUM_INTRAOP_THREADS`` and ``TF_NUM_INTEROP_THREADS``
for both and also pins both to the same ``threads`` CPUs, because rtagger's ONNX engine sizes
its thread pool from the CPUs it may use, not from ``OMP_NUM_THREADS``.

``rtagger train speed-process FILES... --musicnn-python .venv-teachers/bin/python``
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.errors import ConfigError
from rtagger.machine import cpu_model

PROBE_TIMEOUT_S = 120.0  # import musicnn (not TensorFlow) and read versions; seconds
STDERR_TAIL_CHARS = 2000

# Reads versions from package metadata so the probe never imports TensorFlow.
_PROBE = """\
import importlib.metadata as m, platform
import musicnn
def version(*names):
    for name in names:
        try:
            return m.version(name)
        except m.PackageNotFoundError:
            pass
    return None
print(version("musicnn"), version("tensorflow", "tensorflow-cpu"), platform.python_version())
"""

# argv: -c MODEL FILE...
_MUSICNN_LOOP = """\
import sys
from musicnn.extractor import extractor
for f in sys.argv[2:]:
    extractor(f, model=sys.argv[1], extract_features=False)
"""


def _child_env(threads: int | None, musicnn: bool) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    if musicnn:
        env["TF_USE_LEGACY_KERAS"] = "1"
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads),
                   TF_NUM_INTEROP_THREADS=str(threads))
    return env


def _pinned_cpus(threads: int | None) -> set[int] | None:
    """The first ``threads`` CPUs this process may use (``None``: no pinning, or not Linux)."""
    if not threads or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise ConfigError(f"--threads {threads}: only {len(cpus)} CPUs are usable here")
    return set(cpus[:threads])


def run_child(argv: list[str], env: dict[str, str], cpus: set[int] | None = None,
              label: str = "child") -> dict:
    """Run ``argv`` to completion: wall s, CPU s (user + sys), peak RSS MiB and its stdout.

    Raises :class:`ConfigError` with the tail of the child's stderr if it exits non-zero.
    """
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    # Files, not pipes: the child can write any amount without a reader, and wait4 still
    # reports its own resource usage.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env, preexec_fn=preexec)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise ConfigError(f"{label} failed (exit {proc.returncode}): "
                          f"...{stderr[-STDERR_TAIL_CHARS:]}")
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss  # macOS: B
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mib": kib / 1024,
            "stdout": stdout}


def probe_musicnn(python: str | Path) -> dict:
    """musicnn's and TensorFlow's versions in ``python``; ConfigError if it lacks musicnn."""
    try:
        done = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, env=_child_env(None, musicnn=True))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"cannot run the musicnn interpreter {python}: {e}") from e
    if done.returncode != 0:
        raise ConfigError(f"{python} cannot import musicnn (install musicnn and TensorFlow "
                          f"there): ...{done.stderr[-STDERR_TAIL_CHARS:].strip()}")
    musicnn, tensorflow, py = done.stdout.strip().splitlines()[-1].split()
    return {"musicnn": musicnn, "tensorflow": None if tensorflow == "None" else tensorflow,
            "python": f"{Path(python).name} {py}"}


def compare_processes(files: list[str | Path], musicnn_python: str | Path,
                      musicnn_model: str = "MTT_musicnn", model: str = "default",
                      repeats: int = 1, threads: int | None = None) -> dict:
    """Wall s, CPU s and peak RSS of one ``rtagger tag`` and one musicnn process on ``files``.

    Each figure is the median over ``repeats`` runs; ``cpu_ratio_musicnn_over_rtagger`` is
    the quotient of the two median CPU times.
    """
    if not files:
        raise ConfigError("no files to time")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    files = [str(f) for f in files]
    cpus = _pinned_cpus(threads)
    versions = probe_musicnn(musicnn_python)
    # Decoded here only to count the audio; the children decode on their own.
    seconds = float(sum(len(load_audio(f)) for f in files) / SAMPLE_RATE)
    argv = {
        "rtagger": [sys.executable, "-m", "rtagger", "tag", "--format", "json",
                    "--model", model, *files],
        "musicnn": [str(Path(musicnn_python).absolute()), "-c", _MUSICNN_LOOP, musicnn_model,
                    *files],
    }
    runs: dict[str, list[dict]] = {"rtagger": [], "musicnn": []}
    stdout = b""
    for i in range(repeats):
        for name in ("rtagger", "musicnn") if i % 2 == 0 else ("musicnn", "rtagger"):
            run = run_child(argv[name], _child_env(threads, musicnn=name == "musicnn"), cpus,
                            label=f"{name} process")
            if name == "rtagger":
                stdout = run["stdout"]
            runs[name].append({k: v for k, v in run.items() if k != "stdout"})
    first = json.loads(stdout)["results"][0]["model"]
    rows = {}
    for name, rs in runs.items():
        row = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "max_rss_mib")}
        row["cpu_s_per_audio_hour"] = row["cpu_s"] / seconds * 3600
        row["runs"] = rs
        rows[name] = row
    return {
        "files": len(files), "audio_s": seconds, "repeats": repeats, "threads": threads,
        "includes": "each process's imports, model loading, decoding and tagging",
        "model": {k: first.get(k) for k in ("name", "weights_sha256", "engine")},
        "rtagger_python": f"{Path(sys.executable).name} {platform.python_version()}",
        "musicnn_model": musicnn_model, "musicnn_version": versions["musicnn"],
        "tensorflow_version": versions["tensorflow"], "musicnn_python": versions["python"],
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "rows": rows,
        "cpu_ratio_musicnn_over_rtagger": rows["musicnn"]["cpu_s"] / rows["rtagger"]["cpu_s"],
    }


def speed_process_markdown(report: dict) -> str:
    threads = f"{report['threads']} threads each" if report["threads"] else "no thread limit"
    lines = [f"{report['files']} files, {report['audio_s'] / 60:.1f} min of audio, one process "
             f"each (imports, model loading, decoding included), median of "
             f"{report['repeats']} run(s), {threads} ({report['machine']}).", "",
             "| process | wall s | CPU s | CPU s per audio hour | peak RSS MiB |",
             "|---|---:|---:|---:|---:|"]
    names = {"rtagger": f"`rtagger tag` `{report['model']['name']}` "
                        f"({report['model']['engine']}, {report['rtagger_python']})",
             "musicnn": f"musicnn {report['musicnn_version']} `{report['musicnn_model']}` "
                        f"(TensorFlow {report['tensorflow_version']}, "
                        f"{report['musicnn_python']})"}
    for key, r in report["rows"].items():
        lines.append(f"| {names[key]} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['cpu_s_per_audio_hour']:.0f} | {r['max_rss_mib']:.0f} |")
    lines += ["", f"musicnn needs {report['cpu_ratio_musicnn_over_rtagger']:.1f}x the CPU time "
                  f"of rtagger on the same files."]
    return "\n".join(lines) + "\n"
