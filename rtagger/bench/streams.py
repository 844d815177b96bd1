"""End-to-end streaming benchmark: N real-time streams against a real server process.

The server runs as its own process (``python -m rtagger serve``), as in production; this
process plays N clients on loopback, each sending generated music-like audio paced to the
wall clock in small int16 frames, live (drop-to-newest) with a 1 s hop by default.
Measured:

- capture-to-update latency, seen by the client: from sending the frame that completes a
  window to receiving that window's ``update`` (p50/p95/p99), and the server's own
  ``latency_ms`` (window complete -> update sent);
- lag growth: how far behind the audio clock updates arrive, fitted over time (a stable
  server has a slope near 0 s/s);
- dropped windows (the live overflow policy) and the updates each stream received;
- what each side costs in CPU: the client process's CPU-seconds per wall second
  (``client_cpu_share``, 1.0 = one core busy) and the server process's CPU-seconds per
  stream-second of audio (``server_cpu_s_per_stream_s``, from ``/proc/<pid>/stat``), whose
  inverse times the cores is the machine's capacity in streams if CPU is the limit, and
  the CPU share of the server's busiest threads (a thread near 1.0 caps the server first).

The clients are kept cheap so that they disturb the server they share the machine with as
little as possible: the audio is generated once and each stream's int16 frames are cut
before the clock starts, so sending a frame allocates nothing but the websocket framing;
each stream has one sender and one receiver task; the receiver parses the JSON and keeps
five numbers per update, and every statistic is computed after the run.

Everything stays on 127.0.0.1 and stops by itself after ``seconds``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import RtaggerError

FRAME_FORMAT = "int16"
_INT16_BYTES = 2
_INT16_FULL_SCALE = 32767


@dataclass
class StreamStats:
    """What one client saw; raw records only, reduced after the run."""

    send_times: list[float]  # monotonic time each frame was sent, by frame index
    # One tuple per update: (receive time, window index, partial, server latency ms, end_s).
    updates: list[tuple[float, int, bool, float, float]] = field(default_factory=list)
    t0: float = 0.0  # monotonic time the stream's first frame went out
    dropped: int = 0
    error: str | None = None


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A music-like mono signal in [-1, 1]: eight sines and a noise beat every 0.5 s."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f = 110 * 2 ** (rng.integers(0, 24, 8) / 12)
    x = sum(0.05 * np.sin(2 * np.pi * fi * t + rng.uniform(0, 6)) for fi in f)
    beat = (np.arange(n) % (SAMPLE_RATE // 2) < 400) * rng.uniform(-0.3, 0.3, n)
    return (x + beat + 0.01 * rng.standard_normal(n)).astype(np.float32)


def stream_frames(pcm: np.ndarray, frame_samples: int) -> list[bytes]:
    """Cut an int16 signal into little-endian binary frames of ``frame_samples`` samples."""
    data = pcm.astype("<i2", copy=False).tobytes()
    step = frame_samples * _INT16_BYTES
    return [data[i : i + step] for i in range(0, len(data), step)]


def _all_frames(streams: int, seconds: float, frame_samples: int) -> list[list[bytes]]:
    """Each stream's frames: one generated signal, rotated per stream so streams differ."""
    base = np.round(np.clip(_audio(seconds), -1.0, 1.0) * _INT16_FULL_SCALE).astype("<i2")
    shift = max(1, base.size // max(1, streams))
    return [stream_frames(np.roll(base, i * shift), frame_samples) for i in range(streams)]


async def _client(url: str, idx: int, frames: list[bytes], hop_s: float, frame_samples: int,
                  stats: StreamStats, offset_s: float) -> None:
    from websockets.asyncio.client import connect

    # Live streams are not phase-locked: each starts at its own offset within one hop, so
    # their windows complete spread over the hop instead of in one burst.
    await asyncio.sleep(offset_s)
    total = sum(len(f) for f in frames) // _INT16_BYTES
    async with connect(url, max_size=1 << 22, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": FRAME_FORMAT,
                                  "sample_rate": SAMPLE_RATE, "channels": 1, "hop_s": hop_s,
                                  "live": True, "segment": True,
                                  "stream_id": f"bench-{idx}"}))
        json.loads(await ws.recv())  # started
        records = stats.updates

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg["type"]
                if kind == "update":
                    w = msg["window"]
                    records.append((time.monotonic(), w["index"], w["partial"],
                                    msg["latency_ms"], w["end_s"]))
                    stats.dropped = msg["dropped"]
                elif kind == "error":
                    stats.error = f"{msg['code']}: {msg['message']}"
                    return
                elif kind == "final":
                    stats.dropped = msg["dropped"]
                    return

        receiver = asyncio.ensure_future(receive())
        send_times = stats.send_times
        t0 = stats.t0 = time.monotonic()
        for k, frame in enumerate(frames):
            send_times[k] = time.monotonic()
            await ws.send(frame)
            # Pace to the wall clock: a live source cannot send the future.
            delay = t0 + min((k + 1) * frame_samples, total) / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(receiver, timeout=60)


def _start_server(model: str, streams: int, device: str,
                  engine: str) -> tuple[subprocess.Popen, str]:
    return start_server_process("--model", model, "--max-streams", str(streams), "--device",
                                device, "--engine", engine, "--no-dashboard")


def start_server_process(*args: str, log: list[str] | None = None
                         ) -> tuple[subprocess.Popen, str]:
    """``python -m rtagger serve --port 0 ARGS`` as its own process -> ``(process, ws url)``.

    Notes and warnings (an engine fallback, an old checkpoint) may come before the line with
    the address. A reader thread keeps consuming the server's stderr afterwards, so a
    chatty server never blocks on a full pipe; every line goes to ``log`` when one is given.
    Raises :class:`RtaggerError` with the server's output when it does not start.
    """
    proc = subprocess.Popen([sys.executable, "-m", "rtagger", "serve", "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True)
    lines = log if log is not None else []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"(ws://[\d.]+:\d+/)", line)
        if m is not None:
            break
    else:
        proc.wait(30)
        raise RtaggerError("server did not start: " + "".join(lines)[-2000:].strip())
    threading.Thread(target=_drain, args=(proc.stderr, log), daemon=True,
                     name="rtagger-server-log").start()
    return proc, m.group(1)


def _drain(pipe: IO[str], log: list[str] | None) -> None:
    for line in pipe:
        if log is not None:
            log.append(line)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (all threads), from /proc; None
    where /proc is not there (not Linux) or the process is gone."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def _stat_cpu_s(path: Path) -> float | None:
    """User + system CPU seconds from a ``/proc/.../stat`` file; None if unreadable."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain spaces:
    # state is field 3, utime field 14 and stime field 15 (proc(5)), in clock ticks.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread of process ``pid``, keyed ``name/tid`` (empty without /proc).

    The main thread (tid = pid; the server's event loop) is named ``main``; Python does not
    name other threads for the OS, so they appear under the program name.
    """
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = ("main" if tid == str(pid)
                    else Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except OSError:
            continue  # the thread ended meanwhile
        cpu = _stat_cpu_s(Path(f"/proc/{pid}/task/{tid}/stat"))
        if cpu is not None:
            out[f"{name}/{tid}"] = cpu
    return out


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _latencies(stats: StreamStats, hop: int, frame_samples: int) -> list[float]:
    """Client latency (ms) of each full window: update received - frame completing it sent."""
    out = []
    for received, index, partial, _, _ in stats.updates:
        if partial:
            continue
        k = math.ceil((index * hop + WINDOW_SAMPLES) / frame_samples) - 1
        if 0 <= k < len(stats.send_times) and stats.send_times[k] > 0:
            out.append((received - stats.send_times[k]) * 1000)
    return out


def run_stream_bench(model: str = "default", streams: int = 64,
                     seconds: float = 30.0, hop_s: float = 1.0, block_s: float = 0.1,
                     device: str = "cpu", engine: str = "auto",
                     url: str | None = None, stagger: bool = True) -> dict:
    """Run the benchmark; returns a JSON-ready dict. ``url`` targets a running server.

    ``block_s`` is the frame length in seconds. ``stagger`` spreads the streams' start
    times over one hop (independent live sources); ``stagger=False`` starts them together,
    the worst case: every window completes at once. Server CPU figures need the server's
    process (``url=None``) and /proc; otherwise they are None.
    """
    frame_samples = max(1, round(block_s * SAMPLE_RATE))
    hop = round(hop_s * SAMPLE_RATE)
    frames = _all_frames(streams, seconds, frame_samples)
    stats = [StreamStats(send_times=[0.0] * len(f)) for f in frames]
    proc = None
    if url is None:
        proc, url = _start_server(model, streams, device, engine)

    async def main() -> None:
        await asyncio.gather(*(_client(url, i, frames[i], hop_s, frame_samples, s,
                                       hop_s * i / streams if stagger else 0.0)
                               for i, s in enumerate(stats)))

    try:
        server_cpu0 = process_cpu_s(proc.pid) if proc is not None else None
        threads0 = thread_cpu_s(proc.pid) if proc is not None else {}
        cpu0, t0 = time.process_time(), time.perf_counter()
        asyncio.run(main())
        client_cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        server_cpu1 = process_cpu_s(proc.pid) if proc is not None else None
        threads1 = thread_cpu_s(proc.pid) if proc is not None else {}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    client = [x for s in stats for x in _latencies(s, hop, frame_samples)]
    server = [r[3] for s in stats for r in s.updates]
    lag_t = np.array([r[0] - s.t0 for s in stats for r in s.updates])
    lag_v = lag_t - np.array([r[4] for s in stats for r in s.updates])
    slope = float(np.polyfit(lag_t, lag_v, 1)[0]) if len(lag_t) > 2 else None
    late = lag_t > seconds / 2
    # The busiest server threads: one near 1.0 (the event loop, say) caps the server
    # before its total CPU reaches the cores.
    shares = {k: (v - threads0.get(k, 0.0)) / wall for k, v in threads1.items()}
    busiest = dict(sorted(((k, round(v, 3)) for k, v in shares.items()),
                          key=lambda kv: -kv[1])[:3])
    cores = _usable_cores() if proc is not None else None
    server_cpu = (None if server_cpu0 is None or server_cpu1 is None
                  else server_cpu1 - server_cpu0)
    per_stream_s = None if server_cpu is None else server_cpu / (streams * seconds)
    return {
        "streams": streams, "seconds": seconds, "hop_s": hop_s, "block_s": block_s,
        "format": FRAME_FORMAT, "staggered": stagger,
        "model": model, "device": device, "engine": engine, "wall_s": round(wall, 2),
        "updates": sum(len(s.updates) for s in stats),
        "expected_updates": streams * (1 + max(0, int((seconds * SAMPLE_RATE - WINDOW_SAMPLES)
                                                      // hop)) + 1),
        "dropped_windows": sum(s.dropped for s in stats),
        "errors": [s.error for s in stats if s.error],
        "client_latency_ms": {"p50": _pct(client, 50), "p95": _pct(client, 95),
                              "p99": _pct(client, 99), "max": _pct(client, 100)},
        "server_latency_ms": {"p50": _pct(server, 50), "p95": _pct(server, 95),
                              "p99": _pct(server, 99)},
        "lag_s": {"mean_second_half": round(float(lag_v[late].mean()), 3) if late.any()
                  else None, "growth_s_per_s": None if slope is None else round(slope, 4)},
        # CPU: the clients' own share (1.0 = one core) and the server's cost per stream.
        "client_cpu_s": round(client_cpu, 2),
        "client_cpu_share": round(client_cpu / wall, 3),
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
        "server_cpu_share": None if server_cpu is None else round(server_cpu / wall, 3),
        "server_cpu_s_per_stream_s": None if per_stream_s is None else round(per_stream_s, 5),
        "server_busiest_threads_share": busiest or None,
        "cores": cores,
        "capacity_streams": (None if not per_stream_s or cores is None
                             else round(cores / per_stream_s, 1)),
    }
