"""`rtagger serve --catalog`: the read-only catalog endpoints of a real server process.

The catalog: four generated songs added through `rtagger catalog add` (a manifest, so they
carry metadata), plus synthetic rows written through the library, so queries have a few
thousand tracks to work on. Every answer is checked against the library's own query
functions on the same file; what a client sends can only name track ids, never a file.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_with, toy_song, write_audio
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.bench.streams import start_server_process
from rtagger.catalog.query import search_tags, similar
from rtagger.catalog.store import Catalog, CatalogError, TrackRecord
from rtagger.cli.catalog import register
from rtagger.live import catalog_api
from rtagger.live.catalog_api import CatalogAPI
from rtagger.live.client import stream_to_server

TOKEN = "cat-s3cret"
MODEL = ["--model", "untrained:debug"]
SYNTHETIC = 3000
PRIVATE = "/srv/private/music"  # where the synthetic rows say their files are

runner = CliRunner()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, str]:
    """(catalog file, server base URL). The server opens the catalog while it is still
    empty, and `catalog add` fills it meanwhile (WAL: the reader never blocks the writer)."""
    d = tmp_path_factory.mktemp("library")
    lines = []
    for i, kind in enumerate(["piano", "drums", "piano", "drums"]):
        f = write_audio(d / f"{kind}{i}.wav", toy_song(kind, 4.0, seed=i), SAMPLE_RATE,
                        "pcm_s16le", "s16")
        lines.append(json.dumps({"path": f.name, "id": f"song-{i}", "artist": "AC/DC",
                                 "stems": str(d / f"stems{i}"), "groove": kind}))
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    db = d / "cat.db"
    Catalog(db).close()
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(start_server_process, *MODEL, "--engine", "torch", "--token",
                               TOKEN, "--catalog", str(db))
        try:
            res = runner.invoke(cli_with(register), [
                "catalog", "add", str(d / "manifest.jsonl"), "--db", str(db), *MODEL,
                "--engine", "torch", "--workers", "1", "--format", "json"])
            assert res.exit_code == 0, res.output
            _add_synthetic(db)
        finally:
            proc, url = starting.result()
    try:
        yield db, url.replace("ws://", "http://").rstrip("/")
    finally:
        proc.terminate()
        proc.wait(30)


def _add_synthetic(db: Path) -> None:
    rng = np.random.default_rng(0)
    with Catalog(db, create=False) as cat:
        setup = cat.setup()
        n_tags, dim = len(setup.tags), setup.embedding_dim
        cat.db.execute("PRAGMA synchronous=OFF")  # test data: speed over durability
        for i in range(SYNTHETIC):
            emb = rng.standard_normal(dim).astype(np.float32)
            cat.put(TrackRecord(f"{PRIVATE}/synthetic-{i:05d}.flac", f"{i:064x}", setup.id,
                                8.0, rng.uniform(0, 1, n_tags).astype(np.float32),
                                emb / np.linalg.norm(emb),
                                rng.uniform(0, 1, (3, n_tags)).astype(np.float16),
                                np.zeros((3, dim), np.float16)))


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[1]


@pytest.fixture(scope="module")
def catalog_db(served) -> Path:
    return served[0]


def get(base: str, path: str, *, token: str | None = TOKEN, headers: dict | None = None
        ) -> tuple[int, dict | str]:
    sep = "&" if "?" in path else "?"
    url = base + path + (f"{sep}token={token}" if token else "")
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            status, body, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, json.loads(body) if kind == "application/json" else body.decode()


def strings(doc) -> list[str]:
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for k, v in doc.items() for s in strings(k) + strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return []


def assert_no_paths(doc, library: Path) -> None:
    for s in strings(doc):
        assert not s.startswith(("/", "~", "file:")), s
        assert str(library) not in s and PRIVATE not in s, s


def library_catalog(db: Path) -> Catalog:
    return Catalog(db, read_only=True)


def test_info_reports_tracks_setups_and_no_paths(server, catalog_db):
    status, info = get(server, "/api/catalog")
    assert status == 200
    with library_catalog(catalog_db) as cat:
        assert info["tracks"] == cat.count() >= 4 + SYNTHETIC
        setup = cat.setup()
    assert info["failures"] == 0 and info["catalog"] == "cat.db"
    (s,) = info["setups"]
    assert s["id"] == info["current_setup"] == setup.id and s["current"] is True
    assert s["tags"] == list(setup.tags) and s["served_model"] is True
    assert s["weights_sha256"] == setup.weights_sha256 == info["served_model"]["weights_sha256"]
    assert_no_paths(info, catalog_db.parent)


def test_search_equals_the_library(server, catalog_db):
    status, res = get(server, "/api/catalog/search?tag=rock&tag=drums&min=0.3&limit=1000")
    assert status == 200
    with library_catalog(catalog_db) as cat:
        want = search_tags(cat, ["rock", "drums"], min_p=0.3, limit=1000)
    assert res["matches"] == want["matches"] > 100 and len(res["results"]) == min(
        1000, want["matches"])
    assert [r["id"] for r in res["results"]] == [r["id"] for r in want["results"]]
    assert [r["score"] for r in res["results"]] == [r["score"] for r in want["results"]]
    assert [r["name"] for r in res["results"]] == [Path(r["source"]).name
                                                   for r in want["results"]]
    assert res["setup"]["served_model"] is True and res["tags"] == ["rock", "drums"]
    assert_no_paths(res, catalog_db.parent)
    # limit bounds the answer, not the count of matches
    _, few = get(server, "/api/catalog/search?tag=rock&tag=drums&min=0.3&limit=3")
    assert [r["id"] for r in few["results"]] == [r["id"] for r in want["results"][:3]]


def test_similar_and_track_equal_the_library(server, catalog_db):
    with library_catalog(catalog_db) as cat:
        (rec,) = cat.tracks([1], taggram=True)
        setup = cat.setup()
        want = similar(cat, "1", k=10)
    status, res = get(server, "/api/catalog/similar?id=1&k=10")
    assert status == 200
    assert [r["id"] for r in res["results"]] == [r["id"] for r in want["results"]]
    assert [r["score"] for r in res["results"]] == [r["score"] for r in want["results"]]
    assert res["query"]["id"] == 1 and res["query"]["name"] == Path(rec.source).name
    assert res["tracks_searched"] == want["tracks_searched"] and res["index"] == "exact"

    status, doc = get(server, "/api/catalog/track?id=1&neighbours=3")
    assert status == 200
    track = doc["track"]
    assert track["name"] == Path(rec.source).name and track["windows"] == rec.taggram.shape[0]
    assert track["tags"] == list(setup.tags)
    np.testing.assert_allclose(track["probs"], rec.probs, atol=5e-5)
    assert track["duration_s"] == pytest.approx(rec.duration_s, abs=1e-3)
    # manifest metadata, without the value that is an absolute path
    assert rec.meta["stems"].startswith("/") and rec.meta["artist"] == "AC/DC"
    assert track["meta"] == {k: v for k, v in rec.meta.items() if k != "stems"}
    gram = doc["taggram"]
    assert gram["windows_per_row"] == 1 and gram["hop_s"] == setup.hop_s
    np.testing.assert_allclose(gram["rows"], rec.taggram.astype(np.float32), atol=6e-4)
    assert [r["id"] for r in doc["neighbours"]] == [r["id"] for r in want["results"][:3]]
    assert_no_paths(doc, catalog_db.parent)
    _, bare = get(server, "/api/catalog/track?id=1&taggram=false")
    assert "taggram" not in bare and "neighbours" not in bare


@pytest.mark.parametrize("query, reason", [
    ("search?tag=not_a_tag", "unknown tag"),
    ("search", "at least one tag"),
    ("search?tag=rock&min=2", "min must be"),
    ("search?tag=rock&min=nan", "min must be"),
    ("search?tag=rock&limit=1001", "limit must be"),
    ("search?tag=rock&limit=-1", "limit must be"),
    ("search?tag=rock&setup=99", "setup must be"),
    ("search?tag=rock&path=/etc/passwd", "unknown parameter"),
    ("similar?id=1&k=0", "k must be"),
    ("similar?id=1&k=101", "k must be"),
    ("similar?id=1&k=1e3", "k must be"),
    ("similar?id=1&id=2", "given 2 times"),
    ("similar", "give a track id"),
    ("track?id=1&neighbours=500", "neighbours must be"),
    ("track?id=1&taggram=maybe", "taggram must be"),
    ("track?id=" + "9" * 65, "at most 64"),
])
def test_bad_parameters_are_400_with_a_reason(server, query, reason):
    status, doc = get(server, "/api/catalog/" + query)
    assert status == 400, doc
    assert doc["type"] == "error" and doc["code"] == "bad_request" and reason in doc["message"]
    if reason == "unknown tag":
        assert "rock" in doc["known_tags"] and doc["unknown"] == ["not_a_tag"]


@pytest.mark.parametrize("track_id", ["../../etc/passwd", "/etc/passwd", "%2Fetc%2Fpasswd",
                                      "file:///etc/passwd", "1/../2", "~root", "%EF%BC%91",
                                      "0", "99999999", "1.0", "-1"])
def test_a_path_like_or_unknown_id_is_just_an_unknown_track(server, track_id):
    for endpoint in ("track", "similar"):
        status, doc = get(server, f"/api/catalog/{endpoint}?id={track_id}")
        assert status == 404 and doc["code"] == "not_found", doc
        assert "root:" not in json.dumps(doc) and "/etc" not in json.dumps(doc)


def test_unknown_endpoints_are_404(server):
    for path in ("/api/catalog/../../etc/passwd", "/api/catalog/track/1",
                 "/api/catalog/export"):
        status, doc = get(server, path)
        assert status == 404 and doc["code"] == "not_found", (path, doc)


def test_the_server_access_rules_apply(server):
    assert get(server, "/api/catalog", token=None)[0] == 401
    assert get(server, "/api/catalog/search?tag=rock", token="wrong")[0] == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert get(server, "/api/catalog", token=None, headers=bearer)[0] == 200
    assert get(server, "/api/catalog", headers={"Host": "evil.example:80"})[0] == 403
    assert get(server, "/api/catalog", headers={"Origin": "http://evil.example"})[0] == 403


def test_a_burst_of_queries_does_not_stall_a_live_stream(server):
    """A real-time stream (hop 0.5 s) keeps getting its updates while 12 clients send 48
    heavy catalog requests at once; requests past the queue bound get 503 and retry."""
    hop_s, seconds = 0.5, 9.0
    arrivals: list[float] = []
    refused: list[str] = []
    first_update = threading.Event()

    def on_message(msg: dict) -> None:
        if msg["type"] == "update":
            arrivals.append(time.monotonic())
            first_update.set()

    async def blocks():
        block = toy_song("drums", seconds, seed=9)
        step = SAMPLE_RATE // 10
        t0 = time.monotonic()
        for i in range(0, block.size, step):
            await asyncio.sleep(max(0.0, t0 + i / SAMPLE_RATE - time.monotonic()))
            yield block[i : i + step]

    heavy = ["/api/catalog/search?tag=rock&min=0&limit=1000",
             "/api/catalog/similar?id=2&k=100",
             "/api/catalog/track?id=3&neighbours=100", "/api/catalog"]

    def ask(path: str) -> int:
        for _ in range(200):
            status, _ = get(server, path)
            if status != 503:
                return status
            refused.append(path)
            time.sleep(0.02)
        return 503

    def burst() -> tuple[float, float, list[int]]:
        assert first_update.wait(20)
        start = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(ask, heavy * 12))
        return start, time.monotonic(), statuses

    with ThreadPoolExecutor(1) as pool:
        clients = pool.submit(burst)
        final = asyncio.run(stream_to_server(
            server.replace("http://", "ws://") + "/", blocks(), sample_rate=SAMPLE_RATE,
            hop_s=hop_s, live=True, segment=False, token=TOKEN, on_message=on_message))
        start, end, statuses = clients.result()
    assert statuses == [200] * 48 and refused  # 12 at once > the bound of 8: some waited
    assert final["dropped"] == 0 and len(arrivals) == final["windows"] >= 10
    assert arrivals[-1] > end, "the burst should end while the stream still runs"
    gaps = np.diff([t for t in arrivals if start - 1.0 <= t <= end + 1.0])
    assert gaps.max() < 3 * hop_s, (gaps.max(), end - start, len(refused))


def test_answers_follow_catalog_add_while_served(server, catalog_db):
    """The server reads through WAL while another process writes: a new track with the
    same embedding as track 2 is track 2's nearest neighbour at once."""
    with Catalog(catalog_db, create=False) as cat:
        (rec,) = cat.tracks([2])
        before = cat.count()
        new_id = cat.put(TrackRecord(f"{PRIVATE}/twin.flac", "f" * 64, rec.setup_id,
                                     rec.duration_s, rec.probs, rec.embedding,
                                     np.zeros((1, len(rec.probs)), np.float16),
                                     np.zeros((1, len(rec.embedding)), np.float16)))
    status, info = get(server, "/api/catalog")
    assert status == 200 and info["tracks"] == before + 1
    _, res = get(server, "/api/catalog/similar?id=2&k=5")
    # the twin scores 1 (another track of the synthetic set may tie with it: order of ties
    # is not defined)
    top = [r for r in res["results"] if r["score"] == pytest.approx(1)]
    twin = next(r for r in top if r["id"] == new_id)
    assert twin["name"] == "twin.flac"


# --- in process: the API object itself ------------------------------------------------------


def test_saturation_answers_503_and_the_bound_holds(catalog_db):
    api = CatalogAPI(catalog_db, served_weights_sha256="not-the-catalogs", max_pending=2)
    release = threading.Event()
    real = api.answer

    def slow(path: str, query: str):
        release.wait(10)
        return real(path, query)

    api.answer = slow
    try:
        async def main() -> tuple[float, list[tuple[HTTPStatus, bytes]]]:
            first = [asyncio.ensure_future(api.respond("/api/catalog", "")) for _ in range(2)]
            await asyncio.sleep(0.05)
            refused = await api.respond("/api/catalog", "")  # answered at once
            # While the catalog thread is stuck, the event loop keeps running.
            ticks = [time.monotonic()]
            while ticks[-1] - ticks[0] < 0.5:
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())
            release.set()
            return float(np.diff(ticks).max()), [refused, *await asyncio.gather(*first)]

        longest_tick, (refused, *answered) = asyncio.run(main())
        assert longest_tick < 0.2
        assert refused[0] == HTTPStatus.SERVICE_UNAVAILABLE
        assert json.loads(refused[1])["code"] == "busy"
        assert [s for s, _ in answered] == [HTTPStatus.OK] * 2
        doc = json.loads(answered[0][1])
        assert doc["setups"][0]["served_model"] is False  # another model: still served
    finally:
        api.close()


def test_missing_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(CatalogError, match="no such catalog"):
        CatalogAPI(tmp_path / "missing.db")
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    with pytest.raises(CatalogError, match="not a usable catalog"):
        CatalogAPI(tmp_path / "notes.db")
    from rtagger.cli.main import app

    res = runner.invoke(app, ["serve", *MODEL, "--engine", "torch", "--port", "0", "--catalog",
                              str(tmp_path / "missing.db")])
    assert res.exit_code == 2 and "no such catalog" in res.output
    assert not (tmp_path / "missing.db").exists()  # read-only: nothing created


def test_public_summaries_drop_paths():
    doc = catalog_api._public({"id": 1, "source": "https://u:pw@host/a/b/song.mp3?sig=x",
                               "meta": {"file": "C:\\music\\x.mp3", "url": "s3://b/k",
                                        "artist": "AC/DC"}})
    assert doc == {"id": 1, "name": "song.mp3", "meta": {"artist": "AC/DC"}}
