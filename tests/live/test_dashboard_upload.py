"""The dashboard's upload view in Chromium: a real file input, a throttled upload, a real server.

``rtagger serve`` runs as its own process (a saved debug model, a token); Debian's Chromium,
driven by Playwright, opens the dashboard and a file is set on its ``<input type=file>``. The
upload is throttled by Chromium's own network emulation (CDP
``Network.emulateNetworkConditions``), so the bytes really leave the browser slowly, and the
page's progress (bytes handed to the network) leads what the server has by at most the
throttle's ~128 KiB steps. What must hold: track
tags and taggram columns show while the upload is still under way, and the final tags equal
``Tagger.tag_file`` on the same file; a broken or foreign file shows its error, a moov-last
M4A its notice. Skips like tests/live/test_dashboard.py without Chromium or Playwright.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_dashboard
from conftest import write_audio
from test_dashboard import _open_page, _until

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.signals import music_like
from rtagger.bench.streams import start_server_process
from rtagger.model.checkpoint import TaggingModel, save_model
from rtagger.pipeline.tagger import Tagger

TOKEN = "up-t0ken"
HOP_S = 1.0  # the page's UPLOAD_HOP_S
UPLOAD_BYTES_PER_S = 64_000  # Chromium's emulated upload throughput
MAX_UPLOAD_BYTES = 2_000_000  # the server's --max-upload-bytes
MAX_UPLOAD_S = 60  # the server's --max-upload-duration

browser = test_dashboard.browser  # the same module-scoped headless Chromium (or a skip)

# What the page shows, read in one step: track-tag bars, painted taggram pixels (right of the
# tag labels, above the time axis; unlike the background #0e1116), upload progress, banners.
STATE_JS = """() => {
  const c = document.getElementById("taggram");
  const dpr = c.width / c.clientWidth;
  const x0 = Math.ceil(122 * dpr), h = Math.floor(c.height * 0.8);
  let painted = 0;
  if (c.width > x0) {
    const d = c.getContext("2d").getImageData(x0, 0, c.width - x0, h).data;
    for (let i = 0; i < d.length; i += 4) {
      if (Math.abs(d[i] - 14) + Math.abs(d[i + 1] - 17) + Math.abs(d[i + 2] - 22) > 40) painted++;
    }
  }
  const bar = document.getElementById("upload-bar");
  const shown = (id) => !document.getElementById(id).hidden;
  return {bars: document.querySelectorAll("#track .bar").length, painted,
          sent: bar.value, total: bar.max, seq: Number(document.body.dataset.seq || 0),
          ended: shown("ended"), failed: shown("failed"), notice: shown("notice")};
}"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, debug_model: TaggingModel
           ) -> Iterator[str]:
    """``rtagger serve`` with the dashboard and a token -> its http URL."""
    path = save_model(debug_model, tmp_path_factory.mktemp("model") / "debug.safetensors")
    proc, url = start_server_process("--model", str(path), "--engine", "torch",
                                     "--token", TOKEN, "--max-upload-bytes",
                                     str(MAX_UPLOAD_BYTES), "--max-upload-duration",
                                     str(MAX_UPLOAD_S))
    try:
        yield url.replace("ws://", "http://").rstrip("/")
    finally:
        proc.terminate()
        proc.wait(30)


def _open_dashboard(browser: Any, url: str, errors: list[str]) -> tuple[Any, list[dict]]:
    """The dashboard with its token; every JSON message its websockets receive is collected."""
    page = _open_page(browser, errors)
    received: list[dict] = []

    def on_socket(ws: Any) -> None:
        ws.on("framereceived", lambda payload: received.append(json.loads(payload))
              if isinstance(payload, str) else None)

    page.on("websocket", on_socket)
    page.goto(f"{url}/?token={TOKEN}")
    page.wait_for_function("document.getElementById('conn').textContent === 'no open streams'",
                           timeout=10_000)
    return page, received


def _throttle(page: Any, bytes_per_s: int) -> None:
    """Chromium's network emulation for ``page``: uploads at ``bytes_per_s`` (-1: off)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1,
        "uploadThroughput": bytes_per_s})


def _streams(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/streams?token={TOKEN}", timeout=10) as r:
        return json.loads(r.read())["streams"]


def test_upload_view_converges_while_the_file_uploads(browser: Any, served: str,
                                                      debug_model: TaggingModel,
                                                      tmp_path: Path) -> None:
    path = write_audio(tmp_path / "song.flac", music_like(40.0, seed=3), SAMPLE_RATE,
                       "flac", "s16")
    size = path.stat().st_size
    assert size > 500_000  # several seconds at the throttled rate
    offline = Tagger(debug_model, hop_s=HOP_S).tag_file(path)
    errors: list[str] = []
    page, received = _open_dashboard(browser, served, errors)
    try:
        _throttle(page, UPLOAD_BYTES_PER_S)
        t0 = time.monotonic()
        page.set_input_files("#file", str(path))

        # Tags and taggram columns while bytes are still going up.
        page.wait_for_function(f"() => {{ const s = ({STATE_JS})(); "
                               "return s.bars > 0 && s.painted > 0; }", timeout=15_000)
        early = page.evaluate(STATE_JS)
        assert early["total"] == size
        assert early["sent"] < size, early
        assert not early["ended"] and not early["failed"]
        assert page.text_content("#conn") == "uploading"
        assert page.is_visible("#upload") and page.is_visible("#cancel")
        assert page.is_disabled("#file")
        assert not page.text_content("#upload-bytes").endswith("(100 %)")
        first_track = page.locator("#track .bar .name").all_text_contents()
        # The throttle hands the bytes on in ~128 KiB steps: when the last one has left the
        # browser, many windows have been tagged already.
        page.wait_for_function("() => { const b = document.getElementById('upload-bar'); "
                               "return b.value === b.max; }", timeout=30_000)
        at_last_byte = page.evaluate(STATE_JS)
        assert at_last_byte["seq"] >= 5, at_last_byte

        page.wait_for_selector("#ended", state="visible", timeout=30_000)
        upload_s = time.monotonic() - t0
        assert upload_s > 3.0  # the throttle held: 40 s of FLAC took seconds, not ms
        done = page.evaluate(STATE_JS)
        assert done["sent"] == done["total"] == size
        assert page.text_content("#upload-bytes").endswith("(100 %)")
        assert page.text_content("#conn") == "upload done"
        assert not done["failed"] and not done["notice"]
        assert done["painted"] > early["painted"]  # the taggram grew with the upload
        assert not page.is_visible("#cancel") and not page.is_disabled("#file")

        # The server's final, as the page received it, equals offline tagging of the file.
        started = next(m for m in received if m["type"] == "started")
        updates = [m for m in received if m["type"] == "update"]
        final = received[-1]
        assert started["format"] == "encoded" and started["hop_s"] == HOP_S
        assert page.text_content("#sid") == started["stream_id"]
        assert final["type"] == "final" and final["reason"] == "end"
        assert final["received_bytes"] == size and final["windows"] == len(offline.windows)
        assert len(updates) == len(offline.windows) and done["seq"] == len(updates)
        got = np.array([final["track"][t] for t in debug_model.tags])
        np.testing.assert_allclose(got, offline.track_probs, atol=1e-4)
        ended = page.text_content("#ended")
        assert ended.startswith(f"upload tagged: song.flac, 0:40.0 of audio, "
                                f"{len(offline.windows)} windows, "), ended
        assert ended.endswith(" kB")

        # The bars show the final's top k, in order, to 4 decimals in their titles.
        k = len(first_track)
        top = sorted(final["track"].items(), key=lambda kv: -kv[1])[:k]
        assert page.locator("#track .bar .name").all_text_contents() == [t for t, _ in top]
        offline_p = dict(zip(debug_model.tags, offline.track_probs, strict=True))
        for title in page.locator("#track .bar").evaluate_all("rows => rows.map(r => r.title)"):
            tag, p = title.rsplit(": ", 1)
            assert abs(float(p) - offline_p[tag]) <= 1.5e-4, title
        assert errors == []
    finally:
        page.close()


def test_upload_view_shows_errors_and_notices(browser: Any, served: str,
                                              tmp_path: Path) -> None:
    song = music_like(8.0, seed=4)
    flac = write_audio(tmp_path / "short.flac", song, SAMPLE_RATE, "flac", "s16").read_bytes()
    # 11 s of 48 kHz stereo WAV: 2.1 MB; 90 s of silence in a few kB of FLAC.
    big = write_audio(tmp_path / "big.wav", np.zeros((2, 11 * 48_000), np.float32), 48_000,
                      "pcm_s16le", "s16", channels=2).read_bytes()
    bomb = write_audio(tmp_path / "bomb.flac", np.zeros(90 * 8000, np.float32), 8000, "flac",
                       "s16").read_bytes()
    assert len(big) > MAX_UPLOAD_BYTES and len(bomb) < 100_000
    cases = {  # file -> (its bytes, the start of the error shown)
        "cover.png": (b"\x89PNG\r\n\x1a\n" + bytes(4096), "unsupported_format: "),
        "cut.flac": (flac[: len(flac) // 2], "bad_audio: "),  # cut in the middle of a frame
        "big.wav": (big, "upload_too_large: "),
        "bomb.flac": (bomb, "decoded_too_long: "),
    }
    errors: list[str] = []
    page, received = _open_dashboard(browser, served, errors)
    try:
        # One page, one upload after another: a failed upload leaves the view ready for more.
        for name, (data, shown) in cases.items():
            (tmp_path / name).write_bytes(data)
            page.set_input_files("#file", str(tmp_path / name))
            page.wait_for_selector("#failed", state="visible", timeout=15_000)
            text = page.text_content("#failed")
            assert text.startswith("upload failed: " + shown), text
            assert page.text_content("#conn") == "upload failed"
            assert not page.is_visible("#ended") and not page.is_disabled("#file")
            page.wait_for_timeout(300)  # no resubscribe replaces the error (poll: 2 s)

        # Cancel, during a throttled upload: the page stops, the server drops the stream.
        long = write_audio(tmp_path / "long.flac", music_like(20.0, seed=5), SAMPLE_RATE,
                           "flac", "s16")
        _throttle(page, 2 * UPLOAD_BYTES_PER_S)
        page.set_input_files("#file", str(long))
        page.wait_for_function("document.getElementById('conn').textContent === 'uploading'",
                               timeout=10_000)
        assert [s["name"] for s in _streams(served)] == ["long.flac"]
        page.click("#cancel")
        assert page.text_content("#ended").startswith("upload cancelled after ")
        assert page.text_content("#conn") == "upload cancelled"
        assert not page.is_disabled("#file") and not page.is_visible("#cancel")
        # Bytes already queued in the browser still go out before the close frame.
        _until(lambda: _streams(served) == [], "the server to drop the cancelled stream")
        _throttle(page, -1)

        # A moov-last M4A: the notice, then every update and the final after its last byte.
        m4a = write_audio(tmp_path / "tail.m4a", song, SAMPLE_RATE, "aac", "fltp")
        page.set_input_files("#file", str(m4a))
        page.wait_for_selector("#ended", state="visible", timeout=15_000)
        assert not page.is_visible("#failed")
        assert page.is_visible("#notice")
        assert page.text_content("#notice").startswith("notice: not_streamable: ")
        assert page.text_content("#ended").startswith("upload tagged: tail.m4a, 0:08.0")
        codes = [m["code"] for m in received if m["type"] == "error"]
        assert codes == ["unsupported_format", "bad_audio", "upload_too_large",
                         "decoded_too_long", "not_streamable"]
        assert sum(m["type"] == "final" for m in received) == 1  # the cancelled one had none
        assert errors == []
    finally:
        page.close()
