"""The prepared GPU check (rtagger.deploy.gpu_check): its CPU run, report and failure model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.audio.signals import music_windows
from rtagger.deploy import gpu_check
from rtagger.deploy.gpu_check import CheckSettings, Unavailable

SECTION_NAMES = ["machine", "parity", "latency", "streams", "training", "tensorrt"]
# Not in a bare GPU image (device README): the check must run without them.
ABSENT_ON_GPU_IMAGE = ("websockets", "av", "sounddevice", "mido")


def _run_quick(out: Path, device: str) -> tuple[subprocess.CompletedProcess, dict]:
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in ABSENT_ON_GPU_IMAGE)
    code = (f"import sys; {blocked}; from rtagger.deploy.gpu_check import main; "
            f"sys.exit(main(['--device', {device!r}, '--quick', '--out', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    report = json.loads((out / "gpu-check.json").read_text())
    return done, report


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    done, report = _run_quick(out, "cpu")
    return done, report, out


def test_quick_cpu_run_finishes_with_every_section(cpu_run):
    done, report, out = cpu_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["finished"] and report["settings"]["device"] == "cpu"
    sections = report["sections"]
    assert list(sections) == SECTION_NAMES
    assert [s["status"] for s in sections.values()] == ["ok"] * 5 + ["unavailable"]
    assert "CUDA" in sections["tensorrt"]["reason"]
    m = sections["machine"]
    assert m["torch"] == torch.__version__ and m["cpu"] and m["cuda_available"] in (True, False)
    md = (out / "gpu-check.md").read_text()
    for name in SECTION_NAMES:
        assert f"## {name}" in md
    assert "partial results" not in md


def test_cpu_parity_is_small_and_gpu_variants_say_why_not(cpu_run):
    rows = cpu_run[1]["sections"]["parity"]["results"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["size"], r["variant"]) for r in ok] == [("debug", "fp32")]
    assert math.isfinite(ok[0]["max_abs_dprob"]) and ok[0]["max_abs_dprob"] < 1e-5
    assert ok[0]["max_abs_demb"] < 1e-4
    lo, hi = ok[0]["prob_range"]
    assert 0 <= lo <= hi <= 1
    others = [r for r in rows if r["status"] != "ok"]
    assert {r["variant"] for r in others} == {"fp32 + CUDA graphs", "fp16",
                                              "fp16 + CUDA graphs", "bf16"}
    assert all(r["status"] == "unavailable" and "CUDA" in r["reason"] for r in others)


def test_cpu_latency_rows_are_ordered_and_positive(cpu_run):
    rows = cpu_run[1]["sections"]["latency"]["results"]
    assert [r["batch"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert r["status"] == "ok" and r["calls"] >= 3
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] < 10_000
        assert r["windows_per_s"] > 0 and r["clock"] == "perf_counter"


def test_cpu_streams_serve_every_window_through_the_worker(cpu_run):
    sec = cpu_run[1]["sections"]["streams"]
    assert sec["hop_s"] == 1.0 and sec["p99_limit_ms"] == 50.0
    assert [r["streams"] for r in sec["results"]] == [1, 2], sec["stopped"]
    for r in sec["results"]:
        assert r["drained"] and r["errors"] == 0 and r["dropped"] == 0
        assert r["updates"] == r["windows"] == 2 * r["streams"]
        assert 0 < r["update_p50_ms"] <= r["update_p99_ms"] < 10_000
        assert r["tag_p99_ms"] <= r["update_p99_ms"] + 1e-6


def test_cpu_training_uses_the_loop_and_reports_throughput(cpu_run):
    rows = cpu_run[1]["sections"]["training"]["results"]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    r = rows[0]
    assert r["size"] == "debug" and r["amp"] is False and r["augment"] is True
    assert r["windows_per_s"] > 0 and r["windows_per_gpu_hour"] == round(r["windows_per_s"]
                                                                          * 3600)


def test_music_windows_are_deterministic_varied_and_in_range():
    a, b = music_windows(4, seed=5), music_windows(4, seed=5)
    assert a.shape == (4, WINDOW_SAMPLES) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    peaks = np.abs(a).max(axis=1)
    assert np.all(peaks <= 10 ** (-1 / 20) + 1e-6) and np.all(peaks >= 10 ** (-20 / 20) - 1e-6)
    assert len({round(float(p), 6) for p in peaks}) == 4  # four different 'songs'
    assert not np.allclose(a[0], a[1])


def test_a_failing_section_is_recorded_and_the_report_is_written_after_each(tmp_path,
                                                                            monkeypatch):
    seen_on_disk: list[list[str]] = []

    def on_disk() -> list[str]:
        data = json.loads((tmp_path / "gpu-check.json").read_text())
        return list(data["sections"])

    def ok(settings, deadline):
        seen_on_disk.append(on_disk())
        return {"value": 1}

    def broken(settings, deadline):
        raise RuntimeError("kernel exploded")

    def unavailable(settings, deadline):
        raise Unavailable("no such accelerator here")

    monkeypatch.setattr(gpu_check, "SECTIONS", {"parity": ok, "latency": broken,
                                                "streams": ok, "training": unavailable,
                                                "tensorrt": ok})
    data = gpu_check.run_check(CheckSettings(device="cpu", out=str(tmp_path), quick=True,
                                             budget_s=30))
    s = data["sections"]
    assert s["latency"]["status"] == "error"
    assert "RuntimeError: kernel exploded" in s["latency"]["error"]
    assert "Traceback" in s["latency"]["traceback"]
    assert s["training"] == {"status": "unavailable", "reason": "no such accelerator here",
                             "elapsed_s": s["training"]["elapsed_s"]}
    assert [s[n]["status"] for n in ("parity", "streams", "tensorrt")] == ["ok"] * 3
    # Each section found the earlier ones already on disk (a timeout keeps them).
    assert seen_on_disk == [["machine"], ["machine", "parity", "latency"],
                            ["machine", "parity", "latency", "streams", "training"]]
    assert "kernel exploded" in (tmp_path / "gpu-check.md").read_text()


def test_a_spent_budget_skips_sections_with_the_reason(tmp_path):
    report = gpu_check.Report(CheckSettings(device="cpu", out=str(tmp_path)))
    entry = gpu_check.run_section(report, "parity", lambda d: {"value": 1}, deadline=0.0)
    assert entry["status"] == "skipped" and "--budget-s" in entry["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_cuda_run_measures_the_gpu_variants(tmp_path):
    done, report = _run_quick(tmp_path, "cuda")
    sections = report["sections"]
    assert all(sections[n]["status"] == "ok" for n in SECTION_NAMES[:5]), done.stderr
    parity = {r["variant"]: r for r in sections["parity"]["results"]}
    assert all(r["status"] == "ok" for r in parity.values()), parity
    assert parity["fp32"]["max_abs_dprob"] < 1e-3  # TF32 convolutions may be on
    assert parity["fp16"]["max_abs_dprob"] < 1e-2
    assert parity["fp16 + CUDA graphs"]["max_abs_dprob"] < 1e-2
    latency = sections["latency"]["results"]
    assert {r["variant"] for r in latency} == {"fp32", "fp16", "fp16 + CUDA graphs"}
    assert all(r["status"] == "ok" and r["clock"] == "cuda-events" for r in latency)
    assert sections["training"]["results"][0]["amp"] is True
    assert sections["machine"]["gpu"] and sections["machine"]["driver"]
    assert sections["tensorrt"]["status"] in ("ok", "unavailable")
