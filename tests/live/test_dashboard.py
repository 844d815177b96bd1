"""The live dashboard (``rtagger/data/dashboard.html``) in a real headless browser.

A real :class:`~rtagger.live.server.TagServer` runs on 127.0.0.1 in a background thread with its
own asyncio loop; :func:`~rtagger.live.client.stream_to_server` streams generated audio to it;
Debian's Chromium, driven by Playwright, opens the page and we read what a person would see:
DOM text, and the pixels of the taggram canvas.

Determinism: the audio is released in stages by the test (:class:`GatedAudio`), so the page
is subscribed before the first window is tagged and every check runs on a quiet stream; the
streams are uploads (``live=False``: backpressure, never a dropped window), so the number of
updates is exact. The browser tests skip when ``/usr/bin/chromium`` or the ``playwright``
package is missing (never ``playwright install``: no browser downloads).

``RTAGGER_DOCS_SCREENSHOT=1`` also writes the screenshot to ``docs/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.ringbuffer import Windower
from rtagger.audio.signals import music_like
from rtagger.engines import create_engine
from rtagger.live.client import stream_to_server
from rtagger.live.server import ServerConfig, TagServer
from rtagger.model.checkpoint import TaggingModel

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
TOKEN = "s3cret"
HOP_S = 1.0
UNTRAINED_TEXT = "UNTRAINED model: scores, not tags"

# Pixels of the taggram canvas that are painted: opaque and far from the background colour
# (#0e1116). Only the right fifth of the canvas (the newest windows, no tag labels) and its
# top 80 % (tag rows, no time axis) are read.
PAINTED_PIXELS_JS = """(rgb) => {
  const c = document.getElementById("taggram");
  const x0 = Math.floor(c.width * 0.8), h = Math.floor(c.height * 0.8);
  const d = c.getContext("2d").getImageData(x0, 0, c.width - x0, h).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    const dist = Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1])
      + Math.abs(d[i + 2] - rgb[2]);
    if (d[i + 3] > 0 && (rgb[3] ? dist < 40 : dist > 40)) n++;
  }
  return n;
}"""
BACKGROUND = [14, 17, 22, 0]  # count pixels unlike the background
SEGMENT_LINE = [88, 230, 217, 1]  # count pixels like the segment boundary colour (#58e6d9)


class ServerThread:
    """A real TagServer on 127.0.0.1 (a free port), served by its own loop in a thread."""

    def __init__(self, model: TaggingModel, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tag-server",
                                        daemon=True)
        self._thread.start()

        async def start() -> TagServer:
            return await TagServer(model, create_engine(model, "torch", "cpu"), config).start()

        self.server = self.run(start())

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 15.0) -> Any:
        return self.submit(coro).result(timeout)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        try:
            self.run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


async def _wait_event(event: threading.Event, timeout: float = 20.0) -> None:
    """Wait for a test-thread event without blocking the server's loop."""
    deadline = time.monotonic() + timeout
    while not event.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never released the audio source")
        await asyncio.sleep(0.01)


class GatedAudio:
    """Float32 blocks for one stream, released in stages by the test.

    pre-roll (shorter than a window: no update yet) -> wait for ``go`` -> the rest in
    0.5 s blocks, paced a little -> set ``sent`` -> wait for ``finish`` -> end of stream.
    """

    def __init__(self, audio: np.ndarray, pre_roll_s: float = 0.5, block_s: float = 0.5,
                 pace_s: float = 0.01) -> None:
        self.audio = audio
        self.pre = int(pre_roll_s * SAMPLE_RATE)
        self.block = int(block_s * SAMPLE_RATE)
        self.pace_s = pace_s
        self.go, self.sent, self.finish = threading.Event(), threading.Event(), threading.Event()

    @property
    def full_windows(self) -> int:
        """Updates the server sends before the end (full windows), by the server's windower."""
        return len(Windower(round(HOP_S * SAMPLE_RATE)).push(self.audio))

    def release_all(self) -> None:
        self.go.set()
        self.finish.set()

    async def blocks(self) -> AsyncIterator[np.ndarray]:
        yield self.audio[: self.pre]
        await _wait_event(self.go)
        for i in range(self.pre, len(self.audio), self.block):
            yield self.audio[i : i + self.block]
            await asyncio.sleep(self.pace_s)
        self.sent.set()
        await _wait_event(self.finish)


def _until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _two_tracks() -> np.ndarray:
    """32 s of music-like audio, then 20 s of a noisy square wave: a track change that the
    segmenter finds even with the untrained model's embeddings."""
    t = np.arange(20 * SAMPLE_RATE) / SAMPLE_RATE
    noise = np.random.default_rng(7).standard_normal(t.size)
    harsh = np.clip(0.5 * np.sign(np.sin(2 * np.pi * 97 * t)) + 0.5 * noise, -1, 1)
    return np.concatenate([music_like(32.0, seed=1), harsh.astype(np.float32)])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright package is missing (pip install playwright)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open_page(browser: Any, errors: list[str]) -> Any:
    """A new page whose script errors and console errors are collected in ``errors``."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page


def _next_frame(page: Any) -> None:
    """Return after the page drew its next animation frame (redraws are queued to it)."""
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => setTimeout(done)))")


def _start_stream(srv: ServerThread, src: GatedAudio, sid: str, name: str,
                  messages: list[dict], token: str | None = None) -> Future:
    url = f"ws://127.0.0.1:{srv.server.port}/"
    return srv.submit(stream_to_server(url, src.blocks(), sample_rate=SAMPLE_RATE, hop_s=HOP_S,
                                       live=False, stream_id=sid, name=name, token=token,
                                       on_message=messages.append))


def _wait_quiet_and_shown(page: Any, src: GatedAudio, messages: list[dict]) -> dict:
    """Release the audio, wait until every full window was tagged and the page shows the
    newest update; return that update."""
    src.go.set()
    assert src.sent.wait(20), "the audio was not sent"
    n = src.full_windows
    _until(lambda: sum(m["type"] == "update" for m in messages) >= n, f"{n} updates")
    last = [m for m in messages if m["type"] == "update"][-1]
    assert last["seq"] == n  # an upload drops no window
    page.wait_for_function(f"Number(document.body.dataset.seq) === {n}", timeout=10_000)
    return last


def test_dashboard_shows_a_live_stream(browser: Any, debug_model: TaggingModel,
                                       tmp_path: Path) -> None:
    srv = ServerThread(debug_model, ServerConfig(port=0))
    src = GatedAudio(_two_tracks())
    messages: list[dict] = []
    name = "Friday DJ set"
    stream = _start_stream(srv, src, "dj-1", name, messages)
    errors: list[str] = []
    page = _open_page(browser, errors)
    try:
        page.goto(srv.http_url + "/")  # no ?stream=: the page picks the first stream
        page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                               timeout=10_000)
        _next_frame(page)
        assert page.evaluate(PAINTED_PIXELS_JS, BACKGROUND) == 0  # no window yet

        last = _wait_quiet_and_shown(page, src, messages)
        _next_frame(page)  # the canvas is redrawn on the next animation frame
        assert page.text_content("#name") == name
        assert page.text_content("#sid") == "dj-1"
        assert page.is_visible("#untrained")
        assert page.text_content("#untrained") == UNTRAINED_TEXT
        assert page.text_content("#segment") == str(last["segment"])
        assert page.text_content("#dropped") == "0"
        assert not page.is_visible("#provisional")  # many windows: no longer provisional
        assert not page.is_visible("#ended")
        assert name in page.text_content("#streams")

        # Track tags: the update's top k, in order; the committed ones highlighted.
        track = [t for t, _ in last["track"]]
        assert page.locator("#track .bar .name").all_text_contents() == track
        committed = [t for t in track if t in set(last["committed"])]
        assert page.locator("#track .bar.committed .name").all_text_contents() == committed

        assert page.evaluate(PAINTED_PIXELS_JS, BACKGROUND) > 1000  # the taggram is drawn
        if any(m["type"] == "segment" for m in messages):
            assert page.evaluate(PAINTED_PIXELS_JS, SEGMENT_LINE) > 50  # boundary lines

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("RTAGGER_DOCS_SCREENSHOT") == "1":
            shutil.copyfile(shot, DOCS_SCREENSHOT)

        src.finish.set()
        final = stream.result(20)
        page.wait_for_selector("#ended", state="visible", timeout=10_000)
        assert page.text_content("#ended").startswith("stream ended (end)")
        assert page.text_content("#conn") == "stream ended"
        top = sorted(final["track"].items(), key=lambda kv: -kv[1])[: len(track)]
        assert page.locator("#track .bar .name").all_text_contents() == [t for t, _ in top]
        page.screenshot(path=str(tmp_path / "dashboard-ended.png"), full_page=True)
        assert errors == []
    finally:
        src.release_all()
        page.close()
        srv.close()


def test_dashboard_token_and_stream_parameter(browser: Any, debug_model: TaggingModel) -> None:
    """``/?token=..&stream=ID`` picks that stream; the token reaches the API and websocket."""
    srv = ServerThread(debug_model, ServerConfig(port=0, token=TOKEN))
    sources = {sid: GatedAudio(music_like(6.0, seed=i)) for i, sid in enumerate(["a", "b"])}
    messages: dict[str, list[dict]] = {sid: [] for sid in sources}
    names = {"a": "stream a", "b": "B <b>side</b> & co"}  # text, never parsed as HTML
    streams = [_start_stream(srv, src, sid, names[sid], messages[sid], token=TOKEN)
               for sid, src in sources.items()]
    errors: list[str] = []
    page = _open_page(browser, errors)
    try:
        _until(lambda: len(srv.server.streams) == 2, "both streams to open")
        page.goto(f"{srv.http_url}/?token={TOKEN}&stream=b")
        page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                               timeout=10_000)
        assert page.text_content("#sid") == "b"
        assert page.text_content("#name") == names["b"]
        assert page.locator("#name b, #streams b").count() == 0
        assert page.locator("#streams option").count() == 2
        assert page.input_value("#streams") == "b"
        sources["a"].go.set()
        last = _wait_quiet_and_shown(page, sources["b"], messages["b"])
        assert page.locator("#track .bar .name").all_text_contents() == [
            t for t, _ in last["track"]]
        for src in sources.values():
            src.finish.set()
        for s in streams:
            s.result(20)
        page.wait_for_selector("#ended", state="visible", timeout=10_000)
        assert errors == []
    finally:
        for src in sources.values():
            src.release_all()
        page.close()
        srv.close()


async def _broken_stream(url: str, sid: str, go: threading.Event,
                         fail: threading.Event) -> dict:
    """Once ``go`` is set, one window of audio; once ``fail`` is set, a frame that is not whole
    float32 samples: the server fails the stream. Returns the error message it answers."""
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "format": "float32", "stream_id": sid,
                                  "live": False, "hop_s": HOP_S}))
        await _wait_event(go)
        await ws.send(music_like(4.0, seed=5).astype("<f4").tobytes())
        await _wait_event(fail)
        await ws.send(b"\x00\x01\x02")
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "error":
                return msg
    raise AssertionError("the server never reported the bad frame")


def test_dashboard_stream_that_fails(browser: Any, debug_model: TaggingModel) -> None:
    """A stream that dies without a final message still ends on the page."""
    srv = ServerThread(debug_model, ServerConfig(port=0))
    go, fail = threading.Event(), threading.Event()
    stream = srv.submit(_broken_stream(f"ws://127.0.0.1:{srv.server.port}/", "broken", go, fail))
    errors: list[str] = []
    page = _open_page(browser, errors)
    try:
        _until(lambda: "broken" in srv.server.streams, "the stream to open")
        page.goto(f"{srv.http_url}/?stream=broken")
        page.wait_for_function("document.getElementById('conn').textContent === 'live'",
                               timeout=10_000)
        go.set()
        page.wait_for_function("Number(document.body.dataset.seq) === 1", timeout=10_000)
        fail.set()
        assert stream.result(10)["code"] == "bad_audio"
        _until(lambda: "broken" not in srv.server.streams, "the stream to close")
        # Two stream-list refreshes without it end it; Refresh instead of the 2 s timer.
        deadline = time.monotonic() + 10
        while not page.is_visible("#ended") and time.monotonic() < deadline:
            page.click("#refresh")
            page.wait_for_timeout(100)
        page.wait_for_selector("#ended", state="visible", timeout=1_000)
        assert page.text_content("#ended").startswith("stream ended")
        assert page.text_content("#conn") == "stream ended"
        assert errors == []
    finally:
        go.set()
        fail.set()
        page.close()
        srv.close()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_dashboard_http(debug_model: TaggingModel) -> None:
    srv = ServerThread(debug_model, ServerConfig(port=0))
    try:
        for path in ("/", "/dashboard"):
            status, ctype, body = _get(srv.http_url + path)
            assert status == 200
            assert ctype.startswith("text/html")
            assert b"<canvas" in body and b"UNTRAINED model: scores, not tags" in body
    finally:
        srv.close()


def test_dashboard_needs_the_token(debug_model: TaggingModel) -> None:
    srv = ServerThread(debug_model, ServerConfig(port=0, token=TOKEN))
    try:
        for path in ("/", "/?token=wrong", "/api/streams?token=wrong", "/?token=s3cret2"):
            assert _get(srv.http_url + path)[0] == 401, path
        status, ctype, _ = _get(f"{srv.http_url}/?token={TOKEN}")
        assert (status, ctype.split(";")[0]) == (200, "text/html")
        status, _, body = _get(f"{srv.http_url}/api/streams?token={TOKEN}")
        assert status == 200 and json.loads(body)["streams"] == []
    finally:
        srv.close()
