"""`rtagger bench`: quick mode runs and writes a valid report (timings are not asserted)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
from conftest import cli_with
from typer.testing import CliRunner

from rtagger.bench import BenchSettings, bench_streams, register, results_table, run_bench
from rtagger.errors import ConfigError


def _app() -> typer.Typer:
    return cli_with(register)


def test_quick_bench_writes_a_valid_report(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(_app(), ["bench", "--quick", "--model", "untrained:debug",
                                      "--batch-sizes", "1,2", "--budget-s", "0.1",
                                      "--offline-s", "8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["settings"]["quick"] is True
    assert {"cpu", "cpus_usable", "gpu", "torch", "onnxruntime", "python",
            "torch_threads"} <= set(report["machine"])
    measured = [n for n, e in report["engines"].items() if e["available"]]
    assert "torch" in measured
    assert {(r["engine"], r["batch"]) for r in report["latency"]} == {
        (n, b) for n in measured for b in (1, 2)}
    for row in report["latency"]:
        for key in ("p50_ms", "p95_ms", "p99_ms", "windows_per_s", "x_realtime"):
            assert math.isfinite(row[key]) and row[key] > 0
        assert row["iterations"] >= 3
    assert [r["engine"] for r in report["offline"]] == measured
    assert all(r["windows"] == 3 for r in report["offline"])  # 8 s = 2 windows + a partial
    assert report["streaming"] is None  # not asked for
    assert "x real time" in res.output


def test_unavailable_engines_are_reported_not_fatal():
    settings = BenchSettings.quick_settings(model="untrained:debug", engines=("tensorrt",),
                                            batch_sizes=(1,), offline_s=4.0)
    report = run_bench(settings)
    assert report["engines"]["tensorrt"]["available"] is False
    assert report["engines"]["tensorrt"]["reason"]
    assert report["latency"] == [] and report["offline"] == []
    results_table(report)  # renders with nothing measured


def test_settings_are_validated():
    with pytest.raises(ConfigError):
        BenchSettings(batch_sizes=(0,))
    with pytest.raises(ConfigError):
        BenchSettings(engines=("tflite",))
    res = CliRunner().invoke(_app(), ["bench", "--batch-sizes", "1,x"])
    assert res.exit_code == 2 and "comma-separated" in res.output


def test_a_device_without_engines_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(_app(), ["bench", "--quick", "--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output


@pytest.mark.slow
def test_streaming_figure_runs_real_streams_through_a_server():
    r = bench_streams("untrained:debug", streams=2, duration_s=4.0, engine="torch")
    assert r["errors"] == [] and r["engine"] == "torch"
    assert r["updates"] + r["dropped_windows"] == r["expected_updates"]


@pytest.mark.slow
def test_streams_can_target_a_server_that_is_already_running():
    from rtagger.streambench import _start_server

    proc, url = _start_server("untrained:debug", 2, "cpu", "torch")
    try:
        r = bench_streams("untrained:debug", streams=2, duration_s=4.0, url=url)
        assert r["errors"] == [] and r["updates"] + r["dropped_windows"] == r["expected_updates"]
        assert proc.poll() is None  # the benchmark leaves a server it did not start running
    finally:
        proc.terminate()
        proc.wait(30)
