"""Two terminals on one machine: `rtagger serve` and `rtagger stream FILE --server ...`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rtagger.bench.streams import start_server_process

RTAGGER = [sys.executable, "-m", "rtagger"]
MODEL = ["--model", "untrained:debug"]


@pytest.fixture()
def served():
    proc, url = start_server_process(*MODEL)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_upload_preview_through_the_server_equals_offline_tag(served, encoded):
    song = str(encoded["ogg"])
    streamed = subprocess.run([*RTAGGER, "stream", song, "--server", served, "--no-realtime",
                               "--hop", "1.0", "--jsonl"],
                              capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0, streamed.stderr
    msgs = [json.loads(x) for x in streamed.stdout.splitlines()]
    assert msgs[0]["type"] == "started" and msgs[0]["live"] is False
    assert sum(m["type"] == "update" for m in msgs) >= 3
    final = msgs[-1]
    offline = subprocess.run([*RTAGGER, "tag", song, *MODEL, "--hop", "1.0", "-f", "json"],
                             capture_output=True, text=True, timeout=120)
    track = json.loads(offline.stdout)["results"][0]["track"]
    np.testing.assert_allclose([final["track"][t] for t in track], list(track.values()),
                               atol=2e-4)


def test_stream_reports_an_unreachable_server(encoded):
    proc = subprocess.run([*RTAGGER, "stream", str(encoded["wav"]), "--server",
                           "ws://127.0.0.1:9/", "--no-realtime"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot reach ws://127.0.0.1:9/" in proc.stderr


def test_local_stream_without_server(encoded):
    proc = subprocess.run([*RTAGGER, "stream", str(encoded["flac"]), *MODEL, "--no-realtime",
                           "--jsonl"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    msgs = [json.loads(x) for x in proc.stdout.splitlines()]
    assert msgs[-1]["type"] == "final" and msgs[-1]["windows"] >= 3
