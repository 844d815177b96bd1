"""Upload benchmark: decoding cost per format, and concurrent encoded uploads at 10x real time.

``python -m rtagger.bench.uploads [--model default] [--seconds 60] [--max-uploads 32]``

1. Decoding: a generated song (44.1 kHz stereo; Opus 48 kHz) is encoded in every upload
   format and fed to :class:`~rtagger.audio.progressive.ProgressiveDecoder` in 64 KiB
   pieces, in this process; the CPU seconds per second of audio (decoding, resampling,
   downmix) are the median of three runs. No server, no client.
2. Concurrency: a server process (``python -m rtagger serve``) takes N encoded uploads
   (websocket, ``"format": "encoded"``, hop 1 s), each paced to ``speed`` times real time
   (the file's bytes spread evenly over its duration / speed). An upload sustains the
   speed when its ``final`` arrives within ``duration / speed`` (plus one hop) of its first
   byte. N doubles until some upload falls short; the largest N where all kept up is the
   answer. The clients only send pre-cut pieces and count messages (their CPU share is
   reported); the server's own CPU comes from ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.progressive import ProgressiveDecoder
from rtagger.audio.signals import music_like
from rtagger.bench.streams import process_cpu_s, start_server_process

# (format, codec, encoder sample format, rate): FFmpeg encoders PyAV ships.
FORMATS = [("wav", "pcm_s16le", "s16", 44_100), ("flac", "flac", "s16", 44_100),
           ("ogg", "vorbis", "fltp", 44_100), ("opus", "libopus", "fltp", 48_000),
           ("mp3", "libmp3lame", "fltp", 44_100), ("m4a", "aac", "fltp", 44_100)]
PIECE_BYTES = 64 * 1024


def encode_song(path: Path, seconds: float, codec: str, sample_fmt: str, rate: int) -> Path:
    """A generated stereo song encoded with ``codec`` at ``rate`` (``-movflags faststart``)."""
    import av

    song = music_like(seconds, sr=rate, seed=1)
    planar = np.stack([song, song]).astype(np.float32)
    opts = {"strict": "experimental"} if codec == "vorbis" else {}
    mux_opts = {"movflags": "faststart"} if path.suffix == ".m4a" else {}
    with av.open(str(path), "w", options=mux_opts) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo", options=opts)
        n = stream.codec_context.frame_size or 1024
        for i in range(0, planar.shape[1], n):
            chunk = planar[:, i : i + n]
            data = ((np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
                    if sample_fmt == "s16" else np.ascontiguousarray(chunk))
            frame = av.AudioFrame.from_ndarray(data, format=sample_fmt, layout="stereo")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def decode_cost(data: bytes, repeats: int = 3) -> float:
    """Median CPU seconds to decode ``data`` progressively, per second of its audio."""
    costs = []
    for _ in range(repeats):
        dec = ProgressiveDecoder()
        t0 = time.process_time()
        n = sum(b.size for i in range(0, len(data), PIECE_BYTES)
                for b in dec.feed(data[i : i + PIECE_BYTES]))
        n += sum(b.size for b in dec.finish())
        costs.append((time.process_time() - t0) / (n / SAMPLE_RATE))
    return statistics.median(costs)


async def _upload(url: str, pieces: list[bytes], duration_s: float, speed: float,
                  delay_s: float) -> dict:
    from websockets.asyncio.client import connect

    await asyncio.sleep(delay_s)
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "encoded", "hop_s": 1.0}))
        json.loads(await ws.recv())  # started
        updates, final = 0, None

        async def receive() -> None:
            nonlocal updates, final
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "update":
                    updates += 1
                elif msg["type"] in ("final", "error"):
                    final = msg
                    return

        receiver = asyncio.ensure_future(receive())
        t0 = time.monotonic()
        step = duration_s / speed / len(pieces)
        for k, piece in enumerate(pieces):
            await ws.send(piece)
            wait = t0 + (k + 1) * step - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(receiver, 600)
        took = time.monotonic() - t0
    return {"took_s": took, "updates": updates, "final": final["type"] if final else None}


def concurrent_uploads(model: str, data: bytes, duration_s: float, n: int, speed: float,
                       engine: str = "auto") -> dict:
    """N paced uploads against a fresh server process; whether each kept ``speed``."""
    pieces = [data[i : i + PIECE_BYTES] for i in range(0, len(data), PIECE_BYTES)]
    proc, url = start_server_process("--model", model, "--engine", engine, "--max-streams",
                                     str(max(64, n)), "--no-dashboard")
    try:
        cpu0, wall0, client0 = process_cpu_s(proc.pid), time.perf_counter(), time.process_time()

        async def main() -> list[dict]:
            budget = duration_s / speed
            return await asyncio.gather(*(_upload(url, pieces, duration_s, speed,
                                                  budget * i / n) for i in range(n)))

        results = asyncio.run(main())
        wall = time.perf_counter() - wall0
        server_cpu = process_cpu_s(proc.pid) - cpu0
        client_cpu = time.process_time() - client0
    finally:
        proc.terminate()
        proc.wait(30)
    limit = duration_s / speed + 1.0
    took = [r["took_s"] for r in results]
    return {"uploads": n, "speed": speed, "audio_s": duration_s,
            "kept_up": all(t <= limit and r["final"] == "final" for t, r in zip(took, results,
                                                                              strict=True)),
            "took_s_max": round(max(took), 2), "took_s_limit": round(limit, 2),
            "achieved_speed_min": round(duration_s / max(took), 1),
            "server_cpu_share": round(server_cpu / wall, 2),
            "client_cpu_share": round(client_cpu / wall, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--seconds", type=float, default=60.0, help="audio per upload")
    ap.add_argument("--speed", type=float, default=10.0, help="times real time per upload")
    ap.add_argument("--format", default="mp3", help="the uploads' format")
    ap.add_argument("--max-uploads", type=int, default=32)
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)
    report: dict = {"decode_cpu_s_per_audio_s": {}, "concurrency": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = {ext: encode_song(Path(tmp) / f"song.{ext}", args.seconds, codec, fmt, rate)
                 for ext, codec, fmt, rate in FORMATS}
        if not args.skip_decode:
            for ext, path in files.items():
                cost = decode_cost(path.read_bytes())
                report["decode_cpu_s_per_audio_s"][ext] = round(cost, 5)
                print(f"decode {ext:5s} {cost * 1000:7.2f} ms CPU per audio second "
                      f"({1 / cost:6.0f}x real time on one core)", flush=True)
        data = files[args.format].read_bytes()

        def trial(n: int) -> bool:
            r = concurrent_uploads(args.model, data, args.seconds, n, args.speed, args.engine)
            report["concurrency"].append(r)
            print(json.dumps(r), flush=True)
            return r["kept_up"]

        # Double until an N falls short, then bisect between the last good N and it.
        good, n = 0, 1
        while n <= args.max_uploads and trial(n):
            good, n = n, 2 * n
        bad = n if n <= args.max_uploads else None
        while bad is not None and bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if trial(mid) else (good, mid)
    kept = [r["uploads"] for r in report["concurrency"] if r["kept_up"]]
    report["max_uploads_at_speed"] = max(kept) if kept else 0
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
