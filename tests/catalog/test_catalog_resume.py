"""A `catalog add` process killed mid-run, then rerun: no duplicates, nothing lost.

The kill point is made deterministic with a URL that stalls: with one decoding worker the
tracks before it are committed and the worker is stuck on it, so the run is killed with
exactly those rows stored. The rerun (the URL now answers) adds only the rest.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import music_like, write_audio

from rtagger.audio.decode import SAMPLE_RATE


class _Server:
    """Serves one WAV at /song.wav; while ``stall`` is set it sends the headers, a few
    bytes, then nothing."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.stall = threading.Event()
        self.stalled = threading.Event()  # a client is being stalled now
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                if owner.stall.is_set():
                    self.wfile.write(owner.body[:64])
                    self.wfile.flush()
                    owner.stalled.set()
                    time.sleep(30)  # outlives the client, which is killed meanwhile
                    return
                self.wfile.write(owner.body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/song.wav"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def _rows(db) -> list[tuple[str, float]]:
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT source, added_at FROM tracks ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        con.close()


def _add(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rtagger", "catalog", "add", *args,
                             "--model", "untrained:debug", "--engine", "torch",
                             "--workers", "1", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def test_a_killed_add_resumes_without_duplicates_or_losses(tmp_path):
    files = []
    for i in range(5):
        files.append(write_audio(tmp_path / f"s{i}.wav", music_like(4.0, seed=i),
                                 SAMPLE_RATE, "pcm_s16le", "s16"))
    server = _Server(files[0].read_bytes())
    server.stall.set()
    listing = tmp_path / "sources.txt"
    listing.write_text("\n".join([*map(str, files[:3]), server.url, *map(str, files[3:])]))
    db = tmp_path / "cat.db"

    proc = _add([str(listing), "--db", str(db)])
    deadline = time.monotonic() + 120
    while not (server.stalled.is_set() and len(_rows(db)) == 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run never reached the stalled URL"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: main process and decoding worker
    proc.wait(30)
    before = _rows(db)
    assert sorted(s for s, _ in before) == sorted(map(str, files[:3]))

    server.stall.clear()
    rerun = _add([str(listing), "--db", str(db)])
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    report = json.loads(out)
    assert (report["added"], report["skipped"], report["failed"]) == (3, 3, 0)
    after = _rows(db)
    sources = [s for s, _ in after]
    assert sorted(sources) == sorted([*map(str, files), server.url])  # nothing lost
    assert len(sources) == len(set(sources))  # no duplicates
    assert after[:3] == before  # the finished tracks were not re-tagged
