"""The websocket server with real clients on loopback: success, failure, and load."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.engines import create_engine
from rtagger.live.client import ServerError, stream_to_server
from rtagger.live.server import ServerConfig, Subscriber, TagServer
from rtagger.pipeline.tagger import Tagger


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def server(model, **kw) -> TagServer:
    return TagServer(model, create_engine(model), ServerConfig(port=0, **kw))


async def blocks_of(x: np.ndarray, n: int = 4000, pace_s: float = 0.0):
    for i in range(0, len(x), n):
        yield x[i : i + n]
        if pace_s:
            await asyncio.sleep(pace_s)


async def eventually(cond, timeout_s: float = 5.0) -> None:
    """Wait for server-side cleanup that follows the last message a client sees."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def first_error(url: str, *frames) -> tuple[dict, int]:
    """Send frames; return the error message and the close code."""
    async with connect(url) as ws:
        for f in frames:
            await ws.send(f)
        msg = json.loads(await ws.recv())
        while msg["type"] != "error":
            msg = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        return msg, ws.close_code


def test_upload_preview_converges_to_offline_tags(debug_model, encoded):
    """Streaming a file faster than real time gives the offline `rtagger tag` result."""
    pcm = load_audio(encoded["flac"])
    offline = Tagger(debug_model, hop_s=1.0).tag_file(encoded["flac"])
    updates = []

    async def go():
        async with server(debug_model) as srv:
            return await stream_to_server(srv.url, blocks_of(pcm, 3000), sample_rate=SAMPLE_RATE,
                                          hop_s=1.0, live=False, segment=False,
                                          on_message=updates.append)
    final = run(go())
    got = np.array([final["track"][t] for t in debug_model.tags])
    # aggregator run in a padded batch vs alone, rounded to 5 decimals in JSON
    np.testing.assert_allclose(got, offline.track_probs, atol=1e-4)
    ups = [u for u in updates if u["type"] == "update"]
    assert len(ups) == len(offline.windows) and final["windows"] == len(offline.windows)
    assert [u["seq"] for u in ups] == list(range(1, len(ups) + 1))
    assert final["dropped"] == 0 and final["reason"] == "end"


def test_each_bad_client_gets_a_specific_error_and_others_keep_streaming(debug_model):
    start = json.dumps({"type": "start", "format": "float32", "hop_s": 1.0})
    nan = np.array([0.0, np.nan], "<f4").tobytes()

    async def go():
        async with server(debug_model) as srv:
            good = asyncio.ensure_future(stream_to_server(
                srv.url, blocks_of(np.zeros(6 * SAMPLE_RATE, np.float32), 1600, 0.01),
                sample_rate=SAMPLE_RATE, hop_s=1.0, live=True))
            cases = {
                "bad_json": ["{oops"],
                "unknown_type": ['{"type":"rewind"}'],
                "not_started": [b"\x00\x00"],
                "bad_message": ['{"type":"start","format":"int24"}'],
                "bad_audio": [start, b"\x00\x00\x00"],
                "already_started": [start, start],
            }
            for code, frames in cases.items():
                msg, close = await first_error(srv.url, *frames)
                assert (msg["code"], close) == (code, 1008), code
            msg, _ = await first_error(srv.url, start, nan)
            assert msg["code"] == "bad_audio" and "NaN" in msg["message"]
            final = await good
            assert final["reason"] == "end" and final["windows"] >= 3
            await eventually(lambda: not srv.streams)
    run(go())


def test_huge_frames_are_refused(debug_model):
    async def go():
        async with server(debug_model, max_frame_bytes=4096) as srv:
            async with connect(srv.url) as ws:
                await ws.send(json.dumps({"type": "start"}))
                await ws.recv()  # started
                await ws.send(b"\x00" * 10_000)
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1009  # message too big
            await eventually(lambda: not srv.streams)
    run(go())


def test_client_vanishing_mid_stream_frees_its_stream(debug_model):
    async def go():
        async with server(debug_model) as srv:
            ws = await connect(srv.url)
            await ws.send(json.dumps({"type": "start", "stream_id": "gone"}))
            await ws.recv()
            await ws.send(np.zeros(20_000, "<i2").tobytes())
            assert "gone" in srv.streams
            ws.transport.abort()  # no close handshake: the client just disappears
            await eventually(lambda: not srv.streams)
            # and the server still serves
            final = await stream_to_server(srv.url, blocks_of(np.zeros(SAMPLE_RATE,
                                                                       np.float32)),
                                           sample_rate=SAMPLE_RATE, live=False)
            assert final["windows"] == 1
    run(go())


def test_admission_control_refuses_clearly(debug_model):
    async def go():
        async with server(debug_model, max_streams=2) as srv:
            held = [await connect(srv.url) for _ in range(2)]
            for ws in held:
                await ws.send(json.dumps({"type": "start"}))
                await ws.recv()
            msg, close = await first_error(srv.url, json.dumps({"type": "start"}))
            assert msg["code"] == "stream_limit" and close == 1013
            for ws in held:
                await ws.close()
    run(go())


def test_subscribers_see_updates_and_the_final(debug_model):
    seen = []

    async def watch(url):
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "subscribe", "stream_id": "show"}))
            async for raw in ws:
                seen.append(json.loads(raw))

    async def go():
        async with server(debug_model) as srv:
            blocks = blocks_of(np.zeros(8 * SAMPLE_RATE, np.float32), 1600, 0.005)
            streamer = asyncio.ensure_future(stream_to_server(
                srv.url, blocks, sample_rate=SAMPLE_RATE, live=True, stream_id="show"))
            await eventually(lambda: "show" in srv.streams)
            await watch(srv.url)
            await streamer
            msg, _ = await first_error(srv.url, '{"type":"subscribe","stream_id":"nope"}')
            assert msg["code"] == "unknown_stream"
    run(go())
    kinds = [m["type"] for m in seen]
    assert kinds[0] == "started" and seen[0]["subscribed"] is True
    assert "update" in kinds and kinds[-1] == "final"


def test_slow_subscriber_gets_the_newest_update_not_a_backlog():
    sub = Subscriber(ws=None)
    for i in range(100):
        sub.offer({"type": "update", "seq": i})
    sub.offer({"type": "segment", "segment": 1})
    assert sub.latest["seq"] == 99 and sub.replaced == 99 and len(sub.events) == 1


def test_token_and_origin_checks(debug_model):
    async def go():
        async with server(debug_model, token="s3cret") as srv:
            with pytest.raises(InvalidStatus) as e:
                async with connect(srv.url):
                    pass
            assert e.value.response.status_code == 401
            final = await stream_to_server(srv.url, blocks_of(np.zeros(SAMPLE_RATE,
                                                                       np.float32)),
                                           sample_rate=SAMPLE_RATE, token="s3cret", live=False)
            assert final["windows"] == 1
        async with server(debug_model) as srv:
            with pytest.raises(InvalidStatus) as e:
                async with connect(srv.url, origin="http://evil.example"):
                    pass
            assert e.value.response.status_code == 403
    run(go())


@pytest.mark.slow
def test_bounded_soak_of_concurrent_live_streams(debug_model):
    """16 streams at once, paced faster than real time, all complete; nothing leaks."""
    n_streams, seconds = 16, 6

    async def one(url, i):
        x = (0.1 * np.sin(np.arange(seconds * SAMPLE_RATE) * (0.01 + i / 1000))).astype(
            np.float32)
        return await stream_to_server(url, blocks_of(x, 1600, 0.01), sample_rate=SAMPLE_RATE,
                                      live=True, stream_id=f"s{i}")

    async def go():
        async with server(debug_model, max_streams=n_streams) as srv:
            finals = await asyncio.gather(*(one(srv.url, i) for i in range(n_streams)))
            await eventually(lambda: not srv.streams)
            return finals, srv.worker.stats
    finals, stats = run(go())
    assert all(f["reason"] == "end" for f in finals)
    assert sum(f["windows"] for f in finals) == stats.windows + sum(f["dropped"]
                                                                     for f in finals)
    assert max(stats.batch_sizes) > 1  # windows of different streams shared batches


def test_server_error_surfaces_in_the_client(debug_model):
    async def go():
        async with server(debug_model) as srv:
            async def bad_blocks():
                yield np.array([np.nan], np.float32)
            with pytest.raises(ServerError, match="bad_audio"):
                await stream_to_server(srv.url, bad_blocks(), sample_rate=SAMPLE_RATE)
    run(go())


def test_every_message_matches_the_published_schema(debug_model):
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(resources.files("rtagger.data").joinpath(
        "protocol_v1.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    seen: list[dict] = []

    async def go():
        async with server(debug_model) as srv:
            await stream_to_server(srv.url, blocks_of(np.zeros(5 * SAMPLE_RATE, np.float32)),
                                   sample_rate=SAMPLE_RATE, live=False, on_message=seen.append)
            msg, _ = await first_error(srv.url, "{oops")
            seen.append(msg)
    run(go())
    client_msgs = [{"type": "start", "format": "float32", "sample_rate": 48000, "channels": 2,
                    "hop_s": 1.0, "live": False, "segment": False, "stream_id": "a-1"},
                   {"type": "end"}, {"type": "subscribe", "stream_id": "a-1"}]
    kinds = set()
    for m in seen + client_msgs:
        validator.validate(m)
        kinds.add(m["type"])
    assert kinds >= {"started", "update", "final", "error", "start", "end", "subscribe"}
    # a segment event from a session validates too
    validator.validate({"type": "segment", "stream_id": "a-1", "segment": 1, "start_s": 31.0})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"type": "start", "path": "/etc/passwd"})


async def http_get(port: int, path: str, host: str | None = None,
                   extra: dict | None = None) -> tuple[int, bytes]:
    """A raw HTTP/1.1 request (any Host header), as a browser or a probe would send it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = {"Host": f"127.0.0.1:{port}" if host is None else host, "Connection": "close",
               **(extra or {})}
    writer.write((f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n"
                                                        for k, v in headers.items())
                  + "\r\n").encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


WS_UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


class _Fatal(BaseException):
    """An error that no batch handler swallows: it stops the inference worker."""


class DyingEngine:
    """The model's real engine until ``die`` is set; then its next batch stops the worker."""

    def __init__(self, inner) -> None:
        self.inner, self.die = inner, False
        self.name, self.device = inner.name, inner.device

    def run(self, windows):
        if self.die:
            raise _Fatal("accelerator lost")
        return self.inner.run(windows)


def test_a_stopped_worker_makes_the_server_unhealthy_and_refuse_streams(debug_model):
    engine = DyingEngine(create_engine(debug_model))

    async def go():
        config = ServerConfig(port=0)
        async with TagServer(debug_model, engine, config) as srv:
            status, body = await http_get(srv.port, "/healthz")
            assert status == 200 and json.loads(body)["status"] == "ok"
            engine.die = True
            msg, close = await first_error(srv.url, json.dumps({"type": "start", "hop_s": 1.0}),
                                           np.zeros(2 * SAMPLE_RATE, "<i2").tobytes(),
                                           json.dumps({"type": "end"}))
            assert (msg["code"], close) == ("unavailable", 1013)
            status, body = await http_get(srv.port, "/healthz")
            doc = json.loads(body)
            assert status == 503 and doc["status"] == "unhealthy"
            assert "accelerator lost" in doc["worker"]["reason"]
            msg, close = await first_error(srv.url, json.dumps({"type": "start"}))
            assert (msg["code"], close) == ("unavailable", 1013)
            assert "/healthz" in msg["message"]
    run(go())


def test_first_message_timeout_and_connection_cap(debug_model):
    async def go():
        async with server(debug_model, first_message_timeout_s=0.3, max_connections=3) as srv:
            idle = [await connect(srv.url) for _ in range(3)]
            # a fourth is refused during the handshake, before it costs a handler
            with pytest.raises(InvalidStatus) as e:
                async with connect(srv.url):
                    pass
            assert e.value.response.status_code == 503
            for ws in idle:  # the silent ones are closed with a reason
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert msg["code"] == "timeout"
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1008
            await eventually(lambda: srv.n_connections == 0)
            final = await stream_to_server(srv.url, blocks_of(np.zeros(SAMPLE_RATE,
                                                                       np.float32)),
                                           sample_rate=SAMPLE_RATE, live=False)
            assert final["windows"] == 1
    run(go())


def test_host_allow_list_stops_dns_rebinding(debug_model):
    async def go():
        async with server(debug_model) as srv:
            p = srv.port
            for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}", "127.0.0.1"):
                assert (await http_get(p, "/api/streams", host))[0] == 200, host
            # a rebinding page: Host and Origin agree, but name a foreign host
            status, body = await http_get(p, "/", f"evil.example:{p}",
                                          WS_UPGRADE | {"Origin": f"http://evil.example:{p}"})
            assert status == 403 and b"not allowed" in body
            assert (await http_get(p, "/api/streams", ""))[0] == 403
            # a probe may use any Host: health says nothing private
            assert (await http_get(p, "/healthz", f"10.0.0.9:{p}"))[0] == 200
        async with server(debug_model, allowed_hosts=("tagger.example",)) as srv:
            p = srv.port
            assert (await http_get(p, "/api/streams", f"tagger.example:{p}"))[0] == 200
            assert (await http_get(p, "/api/streams", f"evil.example:{p}"))[0] == 403
    run(go())


def test_a_late_viewer_gets_the_recent_history_at_once(debug_model):
    async def go():
        async with server(debug_model) as srv:
            ws = await connect(srv.url)
            await ws.send(json.dumps({"type": "start", "stream_id": "late", "hop_s": 1.0,
                                      "segment": False, "live": False}))
            await ws.recv()
            await ws.send(np.zeros(12 * SAMPLE_RATE, "<i2").tobytes())  # 9 windows
            ups = [json.loads(await ws.recv()) for _ in range(9)]
            async with connect(srv.url) as viewer:
                await viewer.send(json.dumps({"type": "subscribe", "stream_id": "late"}))
                started = json.loads(await viewer.recv())
                past = [json.loads(await viewer.recv()) for _ in range(started["history"])]
                await ws.send(json.dumps({"type": "end"}))
                rest = [json.loads(m) async for m in viewer]
            await ws.close()
            return ups, started, past, rest
    ups, started, past, rest = run(go())
    assert started["subscribed"] and started["history"] == 9
    assert past == ups  # the same updates the streamer saw, in order
    assert [m["type"] for m in rest][-1] == "final"
    seqs = [m["seq"] for m in past + rest if m["type"] == "update"]
    assert seqs == sorted(set(seqs))  # nothing twice
