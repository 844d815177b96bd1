"""The end-to-end streaming benchmark runs against a real server process (numbers unasserted)."""

from __future__ import annotations

import pytest

from rtagger.bench.streams import run_stream_bench


@pytest.mark.slow
def test_stream_bench_short_run():
    r = run_stream_bench("untrained:debug", streams=3, seconds=4.0)
    assert r["errors"] == []
    assert r["updates"] + r["dropped_windows"] == r["expected_updates"] == 3 * 2
    assert r["client_latency_ms"]["p50"] is not None
    assert set(r["lag_s"]) == {"mean_second_half", "growth_s_per_s"}
