"""End-to-end streaming benchmark: N real-time streams against a real server process.

The server runs as its own process (``python -m rtagger serve``), as in production; this
process plays N clients on loopback, each sending generated music-like audio paced to the
wall clock in small blocks, live (drop-to-newest) with a 1 s hop by default. Measured:

- capture-to-update latency, seen by the client: from sending the block that completes a
  window to receiving that window's ``update`` (p50/p95/p99), and the server's own
  ``latency_ms`` (window complete -> update sent);
- lag growth: how far behind the audio clock updates arrive, fitted over time (a stable
  server has a slope near 0 s/s);
- dropped windows (the live overflow policy) and the updates each stream received.

Everything stays on 127.0.0.1 and stops by itself after ``seconds``.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from rtagger.audio import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import RtaggerError


@dataclass
class StreamStats:
    send_times: list[float] = field(default_factory=list)  # wall time each block was sent
    block_ends: list[int] = field(default_factory=list)  # sample count after each block
    client_latency_ms: list[float] = field(default_factory=list)
    server_latency_ms: list[float] = field(default_factory=list)
    lag: list[tuple[float, float]] = field(default_factory=list)  # (elapsed s, lag s)
    dropped: int = 0
    updates: int = 0
    error: str | None = None


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f = 110 * 2 ** (rng.integers(0, 24, 8) / 12)
    x = sum(0.05 * np.sin(2 * np.pi * fi * t + rng.uniform(0, 6)) for fi in f)
    beat = (np.arange(n) % (SAMPLE_RATE // 2) < 400) * rng.uniform(-0.3, 0.3, n)
    return (x + beat + 0.01 * rng.standard_normal(n)).astype(np.float32)


async def _client(url: str, idx: int, seconds: float, hop_s: float, block_s: float,
                  stats: StreamStats, offset_s: float) -> None:
    from websockets.asyncio.client import connect

    # Live streams are not phase-locked: each starts at its own offset within one hop, so
    # their windows complete spread over the hop instead of in one burst.
    await asyncio.sleep(offset_s)
    hop = round(hop_s * SAMPLE_RATE)
    audio = _audio(seconds, idx)
    block = int(block_s * SAMPLE_RATE)
    async with connect(url, max_size=1 << 22, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "float32", "hop_s": hop_s,
                                  "live": True, "segment": True, "stream_id": f"bench-{idx}"}))
        json.loads(await ws.recv())  # started
        t0 = time.monotonic()

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                now = time.monotonic()
                if msg["type"] == "update":
                    w = msg["window"]
                    end = w["index"] * hop + WINDOW_SAMPLES
                    i = bisect.bisect_left(stats.block_ends, min(end, stats.block_ends[-1]))
                    if not w["partial"] and i < len(stats.send_times):
                        stats.client_latency_ms.append((now - stats.send_times[i]) * 1000)
                    stats.server_latency_ms.append(msg["latency_ms"])
                    stats.lag.append((now - t0, (now - t0) - w["end_s"]))
                    stats.updates += 1
                    stats.dropped = msg["dropped"]
                elif msg["type"] == "error":
                    stats.error = f"{msg['code']}: {msg['message']}"
                    return
                elif msg["type"] == "final":
                    stats.dropped = msg["dropped"]
                    return

        receiver = asyncio.ensure_future(receive())
        sent = 0
        for start in range(0, len(audio), block):
            chunk = audio[start : start + block]
            stats.send_times.append(time.monotonic())
            await ws.send(chunk.astype("<f4").tobytes())
            sent += len(chunk)
            stats.block_ends.append(sent)
            # Pace to the wall clock: a live source cannot send the future.
            delay = t0 + sent / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(receiver, timeout=60)


def _start_server(model: str, streams: int, device: str,
                  engine: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtagger", "serve", "--port", "0", "--model", model,
         "--max-streams", str(streams), "--device", device, "--engine", engine,
         "--no-dashboard"],
        stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    while line.startswith("note:"):  # e.g. an engine fallback notice
        line = proc.stderr.readline()
    m = re.search(r"(ws://[\d.]+:\d+/)", line)
    if m is None:
        proc.kill()
        raise RtaggerError(f"server did not start: {line.strip()} "
                           f"{proc.stderr.read()[-2000:]}")
    return proc, m.group(1)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def run_stream_bench(model: str = "default", streams: int = 64,
                     seconds: float = 30.0, hop_s: float = 1.0, block_s: float = 0.1,
                     device: str = "cpu", engine: str = "auto",
                     url: str | None = None, stagger: bool = True) -> dict:
    """Run the benchmark; returns a JSON-ready dict. ``url`` targets a running server.

    ``stagger`` spreads the streams' start times over one hop (independent live sources);
    ``stagger=False`` starts them together, the worst case: every window completes at once.
    """
    proc = None
    if url is None:
        proc, url = _start_server(model, streams, device, engine)
    stats = [StreamStats() for _ in range(streams)]

    async def main() -> None:
        await asyncio.gather(*(_client(url, i, seconds, hop_s, block_s, s,
                                       hop_s * i / streams if stagger else 0.0)
                               for i, s in enumerate(stats)))

    t0 = time.perf_counter()
    try:
        asyncio.run(main())
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    wall = time.perf_counter() - t0
    client = [x for s in stats for x in s.client_latency_ms]
    server = [x for s in stats for x in s.server_latency_ms]
    lag_t = np.array([t for s in stats for t, _ in s.lag])
    lag_v = np.array([v for s in stats for _, v in s.lag])
    slope = float(np.polyfit(lag_t, lag_v, 1)[0]) if len(lag_t) > 2 else None
    late = lag_t > seconds / 2
    return {
        "streams": streams, "seconds": seconds, "hop_s": hop_s, "block_s": block_s,
        "staggered": stagger,
        "model": model, "device": device, "engine": engine, "wall_s": round(wall, 2),
        "updates": sum(s.updates for s in stats),
        "expected_updates": streams * (1 + max(0, int((seconds * SAMPLE_RATE - WINDOW_SAMPLES)
                                                      // round(hop_s * SAMPLE_RATE))) + 1),
        "dropped_windows": sum(s.dropped for s in stats),
        "errors": [s.error for s in stats if s.error],
        "client_latency_ms": {"p50": _pct(client, 50), "p95": _pct(client, 95),
                              "p99": _pct(client, 99), "max": _pct(client, 100)},
        "server_latency_ms": {"p50": _pct(server, 50), "p95": _pct(server, 95),
                              "p99": _pct(server, 99)},
        "lag_s": {"mean_second_half": round(float(lag_v[late].mean()), 3) if late.any()
                  else None, "growth_s_per_s": None if slope is None else round(slope, 4)},
    }
