"""`rtagger bench`: quick mode runs and writes a valid report (timings are not asserted)."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch
import typer
from conftest import cli_with
from rich.console import Console
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.bench.streams import (
    StreamStats,
    _all_frames,
    _latencies,
    process_cpu_s,
    stream_frames,
)
from rtagger.bench.throughput import (
    BenchSettings,
    bench_streams,
    machine_info,
    results_table,
    run_bench,
)
from rtagger.cli.bench import register
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


def test_stream_frames_are_int16_cut_once_up_front():
    pcm = np.arange(-5, 5, dtype=np.int16)
    frames = stream_frames(pcm, 4)
    assert [len(f) for f in frames] == [8, 8, 4]  # 2 bytes per sample, last frame short
    assert all(isinstance(f, bytes) for f in frames)
    assert np.frombuffer(b"".join(frames), "<i2").tolist() == pcm.tolist()
    streams = _all_frames(3, 1.0, 1600)
    assert [len(f) for f in streams] == [10, 10, 10]
    assert streams[0] != streams[1]  # rotated: the streams do not send identical audio
    assert np.abs(np.frombuffer(b"".join(streams[0]), "<i2")).max() > 1000


def test_latency_is_measured_from_the_frame_that_completes_the_window():
    # 1 s hop, 0.1 s frames: window 0 ends at sample 59,049, inside frame 36 (0-based).
    send = [float(k) for k in range(100)]
    stats = StreamStats(send_times=send,
                        updates=[(36.5, 0, False, 1.0, 3.69), (99.0, 1, True, 1.0, 4.0)])
    assert _latencies(stats, SAMPLE_RATE, 1600) == [500.0]  # the partial window is left out


def test_process_cpu_seconds_come_from_proc():
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc here")
    t0 = time.process_time()
    sum(i * i for i in range(2_000_000))  # burn some CPU
    used = process_cpu_s(os.getpid())
    assert used is not None and used >= 0.0
    # /proc counts clock ticks (10 ms); process_time covers the same threads.
    assert abs(used - time.process_time()) < 0.1 and time.process_time() > t0
    assert process_cpu_s(2**22 + 12345) is None  # no such process


@pytest.mark.slow
def test_streaming_figure_runs_real_streams_through_a_server():
    r = bench_streams("untrained:debug", streams=2, duration_s=4.0, engine="torch")
    assert r["errors"] == [] and r["engine"] == "torch" and r["format"] == "int16"
    assert r["updates"] + r["dropped_windows"] == r["expected_updates"]
    # The clients' own CPU and the server's per-stream cost are measured, not assumed.
    assert 0 < r["client_cpu_share"] <= r["cores"] and r["client_cpu_s"] > 0
    assert r["server_cpu_s"] > 0 and r["server_cpu_s_per_stream_s"] > 0
    assert r["capacity_streams"] == pytest.approx(
        r["cores"] / r["server_cpu_s_per_stream_s"], rel=1e-3)
    threads = r["server_busiest_threads_share"]
    assert 1 <= len(threads) <= 3 and sum(threads.values()) <= r["server_cpu_share"] + 0.05
    report = {"machine": machine_info(), "model": {"name": "untrained:debug"},
              "settings": {"device": "cpu"}, "engines": {}, "latency": [], "offline": [],
              "streaming": r}
    console = Console(width=250, record=True)
    console.print(results_table(report))
    assert "server CPU-s per stream-s" in console.export_text()


@pytest.mark.slow
def test_streams_can_target_a_server_that_is_already_running():
    from rtagger.bench.streams import _start_server

    proc, url = _start_server("untrained:debug", 2, "cpu", "torch")
    try:
        r = bench_streams("untrained:debug", streams=2, duration_s=4.0, url=url)
        assert r["errors"] == [] and r["updates"] + r["dropped_windows"] == r["expected_updates"]
        # Another process's server: its CPU is not ours to read, so no capacity is claimed.
        assert r["server_cpu_s_per_stream_s"] is None and r["capacity_streams"] is None
        assert r["client_cpu_share"] > 0
        assert proc.poll() is None  # the benchmark leaves a server it did not start running
    finally:
        proc.terminate()
        proc.wait(30)
