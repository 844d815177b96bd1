"""Whole-process speed vs musicnn's own package (train/evaluation/speed_process.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_with

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.encode import write_flac
from rtagger.errors import ConfigError
from rtagger.train.evaluation import cli as evaluation_cli
from rtagger.train.evaluation.speed_process import (
    compare_processes,
    run_child,
    speed_process_markdown,
)

TEACHERS_PYTHON = Path(__file__).resolve().parents[3] / ".venv-teachers" / "bin" / "python"


def _tone(path: Path, seconds: float) -> Path:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return write_flac(path, 0.3 * np.sin(2 * np.pi * 440.0 * t))


def _has_musicnn(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", "import musicnn"], capture_output=True,
                          timeout=120)
    return done.returncode == 0


def test_a_child_is_measured_on_its_own_and_a_failing_one_is_refused_with_its_stderr():
    burn = "x = bytearray(64 << 20)\nsum(i * i for i in range(2_000_000))"
    run = run_child([sys.executable, "-c", burn], env={})
    assert run["cpu_s"] > 0 and run["wall_s"] > 0
    assert run["max_rss_mib"] > 64  # the child's 64 MiB buffer, not the parent's peak
    with pytest.raises(ConfigError, match=r"exit 3.*no such luck"):
        run_child([sys.executable, "-c", "import sys; sys.stderr.write('no such luck'); "
                   "sys.exit(3)"], env={}, label="musicnn process")


@pytest.mark.skipif(importlib.util.find_spec("musicnn") is not None,
                    reason="musicnn is importable in the main venv")
def test_an_interpreter_without_musicnn_is_refused_before_anything_runs(tmp_path):
    audio = _tone(tmp_path / "tone.flac", 2.0)
    with pytest.raises(ConfigError, match="cannot import musicnn"):
        compare_processes([audio], sys.executable)
    app = cli_with(lambda a: evaluation_cli.register(a, a))
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["speed-process", str(audio), "--musicnn-python",
                                   sys.executable])
    assert res.exit_code == 2 and "cannot import musicnn" in res.output


@pytest.mark.slow
@pytest.mark.skipif(not _has_musicnn(TEACHERS_PYTHON),
                    reason=".venv-teachers/bin/python with musicnn is not installed")
def test_both_processes_are_measured_on_the_same_file(tmp_path):
    audio = _tone(tmp_path / "tone.flac", 12.0)
    report = compare_processes([audio], TEACHERS_PYTHON, model="default")
    assert report["files"] == 1 and report["audio_s"] == pytest.approx(12.0)
    rows = report["rows"]
    for row in rows.values():
        assert row["cpu_s"] > 0 and row["max_rss_mib"] > 0 and row["wall_s"] > 0
        assert len(row["runs"]) == 1
    assert report["cpu_ratio_musicnn_over_rtagger"] == pytest.approx(
        rows["musicnn"]["cpu_s"] / rows["rtagger"]["cpu_s"])
    assert report["musicnn_version"] == "0.1.0"
    assert "/" not in report["musicnn_python"] and "/" not in report["rtagger_python"]
    json.dumps(report)  # the report is plain JSON
    assert "musicnn needs" in speed_process_markdown(report)
