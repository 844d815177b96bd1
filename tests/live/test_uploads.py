"""Encoded uploads against a real ``rtagger serve`` process: websocket and ``POST /api/tag``.

Every listed format is uploaded as its file's bytes, as fast as possible and throttled, and
the ``final`` must equal ``rtagger tag FILE --hop 1`` on the same file (same windows, track
tags within 1e-4). Hostile uploads (mutated real files, decompression bombs, non-audio,
oversize) must each get a documented code, never ``internal``, while a healthy upload on
the same server is unaffected.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import FORMATS, write_audio
from test_server_hostile import ServerProcess, documented_close_codes
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.progressive import ProgressiveDecoder
from rtagger.audio.signals import music_like
from rtagger.model.checkpoint import save_model
from rtagger.pipeline.tagger import Tagger

HOP_S = 1.0
MAX_UPLOAD_BYTES = 8 * 2**20
MAX_UPLOAD_S = 600.0
TOKEN = "t0ken"


def run(coro, timeout_s: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def _stereo_at(song: np.ndarray, sr: int) -> np.ndarray:
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=sr)
    frame = av.AudioFrame.from_ndarray(song[None, :], format="fltp", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = 0
    up = np.concatenate([f.to_ndarray() for f in resampler.resample(frame)]
                        + [f.to_ndarray() for f in resampler.resample(None)], axis=1)
    return np.concatenate([up, up])


def faststart(src: Path, dst: Path) -> Path:
    """Remux an MP4 with its index (moov) first, as ``-movflags +faststart`` does."""
    with av.open(str(src)) as inp, av.open(str(dst), "w",
                                           options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.audio[0])
        for packet in inp.demux(inp.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 20 s song in every format, 44.1 kHz stereo (opus 48 kHz); m4a has moov last."""
    d = tmp_path_factory.mktemp("uploads")
    song = music_like(20.0, seed=3)
    out = {}
    for ext, codec, fmt in FORMATS:
        sr = 48_000 if codec == "libopus" else 44_100
        out[ext] = write_audio(d / f"song.{ext}", _stereo_at(song, sr), sr, codec, fmt, 2)
    out["m4a-faststart"] = faststart(out["m4a"], d / "fast.m4a")
    return out


@pytest.fixture(scope="module")
def offline(files, debug_model) -> dict[str, object]:
    tagger = Tagger(debug_model, hop_s=HOP_S)
    return {k: tagger.tag_file(p) for k, p in files.items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory, debug_model):
    path = save_model(debug_model, tmp_path_factory.mktemp("model") / "debug.safetensors")
    srv = ServerProcess(path, "--max-streams", "64", "--max-upload-bytes",
                        str(MAX_UPLOAD_BYTES), "--max-upload-duration", str(MAX_UPLOAD_S),
                        "--token", TOKEN)
    srv.ws = f"{srv.url}?token={TOKEN}"
    srv.http = f"http://127.0.0.1:{srv.port}/api/tag"
    yield srv
    srv.stop()


async def ws_upload(url: str, data: bytes, *, piece: int = 16 * 1024,
                    rate_bps: float | None = None, **start) -> tuple[list[dict], int]:
    """Upload ``data`` as an encoded stream -> (every message, messages before the last byte).

    ``rate_bps`` throttles the upload to that many bytes per second.
    """
    msgs: list[dict] = []
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "encoded", "hop_s": HOP_S,
                                  **start}))

        async def receive() -> None:
            try:
                async for raw in ws:
                    msgs.append(json.loads(raw))
            except ConnectionClosed:
                pass  # closed with an error code; the error message came first

        receiver = asyncio.ensure_future(receive())
        t0 = time.monotonic()
        try:
            for i in range(0, len(data), piece):
                await ws.send(data[i : i + piece])
                if rate_bps:
                    await asyncio.sleep(max(0.0, t0 + (i + piece) / rate_bps
                                            - time.monotonic()))
            before_end = len(msgs)
            await ws.send(json.dumps({"type": "end"}))
        except Exception:
            before_end = len(msgs)  # the server closed: its error message says why
        await asyncio.wait_for(receiver, 60)
    return msgs, before_end


def assert_converged(final: dict, result, tags: list[str]) -> None:
    assert final["type"] == "final" and final["reason"] == "end", final
    got = np.array([final["track"][t] for t in tags])
    np.testing.assert_allclose(got, result.track_probs, atol=1e-4)
    assert final["windows"] == len(result.windows)


def updates_of(msgs: list[dict]) -> list[dict]:
    return [m for m in msgs if m["type"] == "update"]


@pytest.mark.parametrize("kind", [f[0] for f in FORMATS] + ["m4a-faststart"])
def test_the_decoder_gives_exactly_the_files_samples(files, kind):
    """Progressive decoding from pieces of any size == decoding the file on disk."""
    from rtagger.audio.decode import load_audio

    ref = load_audio(files[kind])
    data = files[kind].read_bytes()
    for piece in (1000, 65536):
        dec = ProgressiveDecoder()
        blocks = [b for i in range(0, len(data), piece) for b in dec.feed(data[i : i + piece])]
        got = np.concatenate(blocks + dec.finish())
        np.testing.assert_array_equal(got, ref)
        assert dec.streamable is (False if kind == "m4a" else True if kind.startswith("m4a")
                                  else None)


@pytest.mark.parametrize("kind", [f[0] for f in FORMATS] + ["m4a-faststart"])
def test_websocket_upload_converges_to_offline_tagging(served, files, offline, debug_model,
                                                       kind):
    msgs, _ = run(ws_upload(served.ws, files[kind].read_bytes()))
    assert msgs[0]["type"] == "started" and msgs[0]["format"] == "encoded"
    assert msgs[0]["live"] is False and msgs[0]["segment"] is False
    assert_converged(msgs[-1], offline[kind], debug_model.tags)
    assert len(updates_of(msgs)) == len(offline[kind].windows)
    notices = [m for m in msgs if m["type"] == "error"]
    if kind == "m4a":  # moov last: told so, not fatal, and still exact
        assert [(n["code"], n["fatal"]) for n in notices] == [("not_streamable", False)]
    else:
        assert notices == []
    assert msgs[-1]["received_bytes"] == files[kind].stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mp3", "m4a"])
def test_throttled_upload_previews_while_bytes_arrive(served, files, offline, debug_model,
                                                      kind):
    """At 64 kB/s updates arrive before the last byte; moov-last M4A only at the end."""
    data = files[kind].read_bytes()
    msgs, before_end = run(ws_upload(served.ws, data, piece=8192, rate_bps=64_000))
    assert_converged(msgs[-1], offline[kind], debug_model.tags)
    early = len(updates_of(msgs[:before_end]))
    if kind == "m4a":
        assert early == 0 and msgs[1]["code"] == "not_streamable"
    else:
        assert early >= 5, f"only {early} updates before the last byte"


async def http_upload(url: str, data: bytes, *, piece: int = 16 * 1024, chunked: bool = True,
                      headers: dict | None = None, query: str = f"?token={TOKEN}"
                      ) -> tuple[int, list[dict] | bytes]:
    """A raw HTTP/1.1 upload -> (status, NDJSON messages, or the body of a refusal)."""
    host_port = url.split("/")[2]
    reader, writer = await asyncio.open_connection(*host_port.split(":"))
    head = {"Host": host_port, **(headers or {})}
    if chunked:
        head["Transfer-Encoding"] = "chunked"
    else:
        head.setdefault("Content-Length", str(len(data)))
    writer.write((f"POST /api/tag{query} HTTP/1.1\r\n"
                  + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode())

    async def send() -> None:
        try:
            for i in range(0, len(data), piece):
                p = data[i : i + piece]
                writer.write(b"%x\r\n%s\r\n" % (len(p), p) if chunked else p)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # refused early: the answer says why

    sender = asyncio.ensure_future(send())
    raw = b""
    try:
        while piece_in := await reader.read(1 << 16):
            raw += piece_in
    except ConnectionError:
        pass  # reset after a refusal; what arrived is the answer
    await sender
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    status = int(status_line.split()[1])
    head_text, _, body = rest.partition(b"\r\n\r\n")
    if b"chunked" not in head_text.lower():
        return status, body
    lines, pos = b"", 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            break
        lines += body[end + 2 : end + 2 + size]
        pos = end + 4 + size
    return status, [json.loads(line) for line in lines.splitlines()]


@pytest.mark.parametrize("kind,chunked", [("flac", True), ("ogg", False), ("m4a", True)])
def test_http_upload_answers_ndjson_that_converges(served, files, offline, debug_model, kind,
                                                   chunked):
    status, msgs = run(http_upload(served.http, files[kind].read_bytes(), chunked=chunked))
    assert status == 200
    assert msgs[0]["type"] == "started"
    assert_converged(msgs[-1], offline[kind], debug_model.tags)
    assert len(updates_of(msgs)) == len(offline[kind].windows)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_documented_curl_line_streams_the_preview(served, files, offline, debug_model):
    """README's line, throttled to 64 kB/s: updates are printed before the upload ends."""
    path = files["mp3"]
    t0 = time.monotonic()
    proc = subprocess.Popen(["curl", "-sN", "-T", str(path), "-H", "Transfer-Encoding: chunked",
                             "--limit-rate", "64k", f"{served.http}?hop_s=1&token={TOKEN}"],
                            stdout=subprocess.PIPE, text=True)
    arrivals = []
    for line in proc.stdout:
        arrivals.append((time.monotonic() - t0, json.loads(line)))
    assert proc.wait(30) == 0
    msgs = [m for _, m in arrivals]
    assert_converged(msgs[-1], offline["mp3"], debug_model.tags)
    upload_s = path.stat().st_size / 65536
    first_update = next(t for t, m in arrivals if m["type"] == "update")
    assert first_update < upload_s - 1.0, (first_update, upload_s)


def test_http_refusals_follow_the_stream_rules(served, files):
    data = files["flac"].read_bytes()[:4096]
    status, body = run(http_upload(served.http, data, query=""))
    assert status == 401
    status, body = run(http_upload(served.http, data, headers={"Host": "evil.example:1"}))
    assert status == 403
    status, body = run(http_upload(served.http, data, headers={"Origin": "http://evil.example"}))
    assert status == 403
    status, body = run(http_upload(served.http, data, query=f"?token={TOKEN}&hop_s=99"))
    assert status == 400 and json.loads(body)["code"] == "bad_message"
    status, body = run(http_upload(served.http, data, query=f"?token={TOKEN}&path=/etc/passwd"))
    assert status == 400 and json.loads(body)["code"] == "bad_message"
    status, body = run(http_upload(served.http, b"", chunked=False,
                                   headers={"Content-Length": str(MAX_UPLOAD_BYTES + 1)}))
    assert status == 413 and json.loads(body)["code"] == "upload_too_large"


def _silence_flac(path: Path, seconds: float) -> Path:
    """A small FLAC that decodes to a long silence (a decompression bomb)."""
    return write_audio(path, np.zeros(int(seconds * 8000), np.float32), 8000, "flac", "s16")


def test_hostile_uploads_get_specific_codes(served, files, tmp_path):
    bomb = _silence_flac(tmp_path / "bomb.flac", 2 * MAX_UPLOAD_S).read_bytes()
    assert len(bomb) < 300_000  # 0.3 MB, yet 20 minutes of audio
    flac = files["flac"].read_bytes()
    cases = {
        "decoded_too_long": bomb,
        "upload_too_large": flac * (MAX_UPLOAD_BYTES // len(flac) + 1),
        "unsupported_format": b"\x89PNG\r\n\x1a\n" + bytes(4096),
        "bad_audio": flac[: len(flac) // 2],  # truncated: STREAMINFO promises 20 s
    }
    playlist = b"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:1/x.mp3\n"
    for code, data in [*cases.items(), ("unsupported_format", playlist)]:
        msgs, _ = run(ws_upload(served.ws, data, piece=256 * 1024))
        errors = [m for m in msgs if m["type"] == "error" and m["fatal"]]
        assert [e["code"] for e in errors] == [code], (code, msgs[-1])
    assert "truncated" in errors[0]["message"] or code != "bad_audio"


def _mutations(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation of a real file: truncate, flip, insert, zero, repeat, shuffle."""
    n = len(data)
    kind = rng.integers(0, 6)
    a, b = sorted(rng.integers(0, n, 2))
    if kind == 0:
        return data[: rng.integers(0, n)]
    buf = bytearray(data)
    if kind == 1:
        for i in rng.integers(0, n, rng.integers(1, 64)):
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 2:
        buf[a:a] = rng.bytes(int(rng.integers(1, 2048)))
    elif kind == 3:
        buf[a:b] = bytes(b - a)
    elif kind == 4:
        buf[a:a] = buf[a:b][:65536]
    else:  # header region: the most parsed bytes
        for i in rng.integers(0, min(n, 512), rng.integers(1, 16)):
            buf[i] = int(rng.integers(0, 256))
    return bytes(buf)


@pytest.mark.slow
def test_fuzzed_uploads_never_fail_internally_nor_disturb_others(served, debug_model,
                                                                 tmp_path):
    """300 mutated real files (3 s, every format) against one server, 6 at a time, while a
    healthy upload runs beside them: every case ends with a final or a documented code."""
    song = music_like(3.0, seed=5)
    seeds = []
    for ext, codec, fmt in FORMATS:
        sr = 48_000 if codec == "libopus" else 22_050
        seeds.append(write_audio(tmp_path / f"s.{ext}", _stereo_at(song, sr), sr, codec, fmt,
                                 2).read_bytes())
    rng = np.random.default_rng(16)
    cases = [_mutations(seeds[i % len(seeds)], rng) for i in range(300)]
    documented = documented_close_codes()
    outcomes: dict[str, int] = {}

    async def one(data: bytes, sem: asyncio.Semaphore) -> None:
        async with sem:
            msgs, _ = await ws_upload(served.ws, data, piece=int(rng.integers(512, 65536)),
                                      hop_s=3.0)
        last = msgs[-1] if msgs else {"type": "none"}
        key = last["type"] if last["type"] != "error" else last["code"]
        assert key in ("final", *documented) and key != "internal", (key, last)
        outcomes[key] = outcomes.get(key, 0) + 1

    async def main() -> list[dict]:
        sem = asyncio.Semaphore(6)
        healthy = asyncio.ensure_future(ws_upload(served.ws, seeds[1] * 1, rate_bps=400_000))
        await asyncio.gather(*(one(c, sem) for c in cases))
        return (await healthy)[0]

    healthy = run(main(), timeout_s=240)
    assert healthy[-1]["type"] == "final" and healthy[-1]["reason"] == "end"
    assert sum(outcomes.values()) == 300, outcomes
    # Both ways out are exercised: about half decode (FFmpeg conceals), half are refused.
    assert outcomes.get("final", 0) > 50 and outcomes.get("bad_audio", 0) > 50, outcomes
    assert "internal" not in served.log
    assert "Traceback" not in served.log, served.log[-3000:]
