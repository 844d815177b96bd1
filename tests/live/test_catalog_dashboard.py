"""The catalog view (``GET /catalog``, ``rtagger/data/catalog.html``) in a real headless browser.

The catalog: two generated songs added through `rtagger catalog add` (real taggrams and
embeddings from the untrained debug model), plus rows written through the library whose tags
and taggrams are chosen here, so the ranks and the drawn cells are known in advance. A real
:class:`~rtagger.live.server.TagServer` with ``--catalog`` (and a token) serves it; Debian's
Chromium, driven by Playwright, clicks through the page and we read what a person would see:
DOM text and the pixels of the taggram canvas. Every list is compared with the library's own
:func:`search_tags` and :func:`similar` on the same file.

The browser tests skip when ``/usr/bin/chromium`` or the ``playwright`` package is missing
(never ``playwright install``); the HTTP test (the page exists only with a catalog) always runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_dashboard
from conftest import cli_with, toy_song, write_audio
from test_dashboard import ServerThread, _get, _open_page
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.catalog.query import search_tags, similar
from rtagger.catalog.store import Catalog, TrackRecord
from rtagger.cli.catalog import register
from rtagger.live.server import ServerConfig
from rtagger.model.checkpoint import TaggingModel

browser = test_dashboard.browser  # the same module-scoped headless Chromium (or a skip)

TOKEN = "cat-view-s3cret"
SEARCH = ("rock", "drums")
MIN_P = 0.8
HOSTILE_NAME = '<img src=x onerror="window.pwned=1">.flac'  # a file name is user data
HOSTILE_META = {"artist": "<i>AC/DC</i>", "title": "<script>window.pwned=2</script><b>x</b> &amp;"}
# name -> (rock, drums) track probabilities; the search ranks by their geometric mean
DESIGNED = {"alpha.flac": (0.95, 0.90), "beta.flac": (0.99, 0.85), "gamma.flac": (0.85, 0.85),
            HOSTILE_NAME: (0.82, 0.82), "delta.flac": (0.99, 0.50)}
RANKED = ["alpha.flac", "beta.flac", "gamma.flac", HOSTILE_NAME]  # delta misses drums >= 0.8
WINDOWS = 6  # windows of every designed track's taggram
FILLERS = 12  # more rows with low tags, so similar has tracks to rank
LABEL_W, ROW_H = 118, 14  # the page's taggram layout (CSS pixels)
BG = (14, 17, 22)  # the taggram background, also the colour of probability 0
TOP = (252, 253, 191)  # the colour of probability 1
HALF = (181, 57, 117)  # the colour of probability 0.5 (between the ramp's 0.4 and 0.6 stops)

runner = CliRunner()

# The colour at the centre of each cell of taggram row ``row`` (``n`` windows), in order.
ROW_COLOURS_JS = """([row, n, labelW, rowH]) => {
  const c = document.getElementById("taggram"), ctx = c.getContext("2d");
  const dpr = c.width / c.clientWidth, cw = (c.clientWidth - labelW) / n;
  return Array.from({ length: n }, (_, j) => Array.from(ctx.getImageData(
    Math.floor((labelW + (j + 0.5) * cw) * dpr), Math.floor((row + 0.5) * rowH * dpr), 1, 1
  ).data.slice(0, 3)));
}"""

# Canvas pixels right of the tag labels and above the time axis that are not background.
PAINTED_JS = """([labelW, rowH]) => {
  const c = document.getElementById("taggram"), dpr = c.width / c.clientWidth;
  const x0 = Math.ceil(labelW * dpr), h = Math.floor(Number(c.dataset.tags) * rowH * dpr);
  const d = c.getContext("2d").getImageData(x0, 0, c.width - x0, h).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - 14) + Math.abs(d[i + 1] - 17) + Math.abs(d[i + 2] - 22) > 40) n++;
  }
  return n;
}"""


@pytest.fixture(scope="module")
def catalog_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("library")
    for i, kind in enumerate(["piano", "drums"]):
        write_audio(d / f"{kind}{i}.wav", toy_song(kind, 12.0, seed=i), SAMPLE_RATE,
                    "pcm_s16le", "s16")
    db = d / "cat.db"
    res = runner.invoke(cli_with(register), [
        "catalog", "add", str(d), "--db", str(db), "--model", "untrained:debug",
        "--engine", "torch", "--workers", "1", "--format", "json"])
    assert res.exit_code == 0, res.output
    _add_designed(db)
    return db


def _add_designed(db: Path) -> None:
    """:data:`DESIGNED` and :data:`FILLERS` rows, each with its own random embedding. A
    designed track's taggram: rock 1 in even windows and 0 in odd ones, drums 0.5 in every
    window, every other tag 0; its track tags other than rock and drums are below 0.3."""
    rng = np.random.default_rng(0)
    with Catalog(db, create=False) as cat:
        setup = cat.setup()
        tags, dim = list(setup.tags), setup.embedding_dim
        rock, drums = tags.index("rock"), tags.index("drums")

        def put(name: str, probs: np.ndarray, gram: np.ndarray, meta: dict | None) -> None:
            emb = rng.standard_normal(dim).astype(np.float32)
            cat.put(TrackRecord(f"/srv/music/{name}", rng.bytes(32).hex(), setup.id, 20.0,
                                probs, emb / np.linalg.norm(emb), gram.astype(np.float16),
                                np.zeros((gram.shape[0], dim), np.float16), meta))

        for name, (p_rock, p_drums) in DESIGNED.items():
            probs = rng.uniform(0.0, 0.3, len(tags)).astype(np.float32)
            probs[[rock, drums]] = p_rock, p_drums
            gram = np.zeros((WINDOWS, len(tags)), np.float32)
            gram[::2, rock] = 1.0
            gram[:, drums] = 0.5
            put(name, probs, gram, HOSTILE_META if name == HOSTILE_NAME else None)
        for i in range(FILLERS):
            put(f"filler-{i:02d}.flac", rng.uniform(0.0, 0.3, len(tags)).astype(np.float32),
                rng.uniform(0.0, 0.3, (3, len(tags))), {"artist": f"band {i}"})


@pytest.fixture(scope="module")
def server(debug_model: TaggingModel, catalog_db: Path) -> Iterator[ServerThread]:
    srv = ServerThread(debug_model, ServerConfig(port=0, token=TOKEN, catalog=str(catalog_db)))
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def page(browser: Any, server: ServerThread) -> Iterator[Any]:
    """The catalog view with its token, vocabulary loaded; fails on any script error.
    Chromium also logs each HTTP error answer to the console: those are the API's refusals
    that a test asks for, and what the page makes of them is checked in the page."""
    errors: list[str] = []
    pg = _open_page(browser, errors)
    try:
        pg.goto(f"{server.http_url}/catalog?token={TOKEN}")
        pg.wait_for_function("document.querySelectorAll('#vocab input').length > 0",
                             timeout=10_000)
        yield pg
        assert [e for e in errors if not e.startswith("Failed to load resource")] == []
    finally:
        pg.close()


def _library(db: Path) -> Catalog:
    return Catalog(db, read_only=True)


def _ids_by_name(db: Path) -> dict[str, int]:
    with _library(db) as cat:
        return {Path(r.source).name: r.id for r in cat.tracks()}


def _search(page: Any, tags: tuple[str, ...], min_p: float) -> None:
    for tag in tags:
        page.click(f'#vocab label:has(input[value="{tag}"])')
    page.fill("#min", str(min_p))
    page.click("#go")
    page.wait_for_function("document.body.dataset.searched !== undefined", timeout=10_000)


def _open_track(page: Any, track_id: int) -> None:
    page.wait_for_function(f"document.body.dataset.track === '{track_id}'", timeout=10_000)


def _near(colour: list[int], want: tuple[int, int, int]) -> bool:
    return sum(abs(a - b) for a, b in zip(colour, want, strict=True)) <= 6


def test_search_by_tags_lists_the_library_ranks(page: Any, catalog_db: Path) -> None:
    with _library(catalog_db) as cat:
        assert page.locator("#vocab input").evaluate_all("bs => bs.map(b => b.value)") == list(
            cat.setup().tags)
        want = search_tags(cat, list(SEARCH), min_p=MIN_P, limit=50)
        n_tracks = cat.count()
    assert page.is_visible("#untrained")  # the catalog's model is untrained:debug
    assert "cat.db" in page.text_content("#info")
    _search(page, SEARCH, MIN_P)
    rows = page.locator("#results tbody tr")
    assert page.locator("#results a.open-track").all_text_contents() == RANKED
    assert rows.evaluate_all("rs => rs.map(r => Number(r.dataset.id))") == [
        r["id"] for r in want["results"]]
    assert page.locator("#results tbody td:nth-child(3)").all_text_contents() == [
        f"{r['score']:.3f}" for r in want["results"]]
    assert page.text_content("#summary").startswith(f"4 of {n_tracks} tracks have rock + drums")
    assert "tag=rock&tag=drums&min=0.8" in page.evaluate("location.hash")
    # a reload shows the same search (the state is in the URL)
    page.reload()
    page.wait_for_function("document.body.dataset.searched !== undefined", timeout=10_000)
    assert page.locator("#results a.open-track").all_text_contents() == RANKED
    assert page.locator("#vocab input:checked").evaluate_all(
        "bs => bs.map(b => b.value)") == list(SEARCH)


def test_a_track_shows_its_tags_taggram_and_similar_tracks(page: Any,
                                                           catalog_db: Path) -> None:
    ids = _ids_by_name(catalog_db)
    alpha = ids["alpha.flac"]
    with _library(catalog_db) as cat:
        (rec,) = cat.tracks([alpha])
        tags = list(cat.setup().tags)
        top10 = [tags[i] for i in np.argsort(-rec.probs, kind="stable")[:10]]
        near = similar(cat, str(alpha), k=10)["results"]
    _search(page, SEARCH, MIN_P)
    page.click("#results a.open-track >> nth=0")
    _open_track(page, alpha)
    assert page.text_content("#track-name") == "alpha.flac"
    assert page.text_content("#track-facts").startswith(f"id {alpha} · 0:20 · {WINDOWS} windows")
    assert page.locator("#track-tags .bar .name").all_text_contents() == top10
    assert top10[:2] == ["rock", "drums"]
    assert page.locator("#results tr.open").get_attribute("data-id") == str(alpha)

    # The taggram: one column per window, the rows the top tags; rock lit in even windows.
    canvas = page.locator("#taggram")
    assert (canvas.get_attribute("data-windows"), canvas.get_attribute("data-tags")) == (
        str(WINDOWS), "10")
    rock_row = page.evaluate(ROW_COLOURS_JS, [0, WINDOWS, LABEL_W, ROW_H])
    assert [_near(c, TOP) for c in rock_row] == [True, False] * (WINDOWS // 2), rock_row
    assert all(_near(c, BG) for c in rock_row[1::2]), rock_row
    drums_row = page.evaluate(ROW_COLOURS_JS, [1, WINDOWS, LABEL_W, ROW_H])
    assert all(_near(c, HALF) for c in drums_row), drums_row
    assert all(_near(c, BG) for c in page.evaluate(ROW_COLOURS_JS, [2, WINDOWS, LABEL_W, ROW_H]))

    # Similar tracks: the library's ten nearest, in order; a click opens one.
    links = page.locator("#similar a.open-track")
    assert page.locator("#similar tbody tr").evaluate_all(
        "rs => rs.map(r => Number(r.dataset.id))") == [r["id"] for r in near]
    assert page.locator("#similar tbody td:nth-child(3)").all_text_contents() == [
        f"{r['score']:.3f}" for r in near]
    second = near[1]
    links.nth(1).click()
    _open_track(page, second["id"])
    assert page.text_content("#track-name") == Path(second["source"]).name
    assert f"track={second['id']}" in page.evaluate("location.hash")
    with _library(catalog_db) as cat:
        (other,) = cat.tracks([second["id"]], taggram=True)
        again = similar(cat, str(second["id"]), k=10)["results"]
    assert canvas.get_attribute("data-windows") == str(other.taggram.shape[0])
    assert page.locator("#similar tbody tr").evaluate_all(
        "rs => rs.map(r => Number(r.dataset.id))") == [r["id"] for r in again]
    assert page.locator("#results a.open-track").all_text_contents() == RANKED  # still there
    page.go_back()  # the previous track, from the URL
    _open_track(page, alpha)
    assert page.text_content("#track-name") == "alpha.flac"

    # k changes the number of similar tracks
    page.fill("#k", "3")
    page.press("#k", "Enter")
    page.wait_for_function("document.querySelectorAll('#similar tbody tr').length === 3",
                           timeout=10_000)


def test_a_catalogued_song_has_its_real_taggram(page: Any, catalog_db: Path) -> None:
    song_id = _ids_by_name(catalog_db)["piano0.wav"]
    with _library(catalog_db) as cat:
        (song,) = cat.tracks([song_id], taggram=True)
    assert song.taggram.shape[0] >= 3
    page.evaluate(f"location.hash = '#track={song_id}'")
    _open_track(page, song_id)
    assert page.text_content("#track-name") == "piano0.wav"
    assert page.get_attribute("#taggram", "data-windows") == str(song.taggram.shape[0])
    assert page.evaluate(PAINTED_JS, [LABEL_W, ROW_H]) > 1000  # drawn
    assert page.locator("#similar tbody tr").count() == 10


def test_titles_and_names_are_shown_as_text(page: Any, catalog_db: Path) -> None:
    hostile = _ids_by_name(catalog_db)[HOSTILE_NAME]
    _search(page, SEARCH, MIN_P)
    row = page.locator(f'#results tr[data-id="{hostile}"]')
    assert row.locator("a.open-track").text_content() == HOSTILE_NAME
    subtitle = f"{HOSTILE_META['artist']} – {HOSTILE_META['title']}"
    assert row.locator(".sub").first.text_content() == subtitle
    row.locator("a.open-track").click()
    _open_track(page, hostile)
    assert page.text_content("#track-name") == HOSTILE_NAME
    assert page.text_content("#track-sub") == subtitle
    # nothing of the names was parsed as markup, and no script of theirs ran
    assert page.locator(":is(#results tbody, #similar tbody, #track-name, #track-sub) "
                        ":is(img, script, b, i)").count() == 0
    assert page.evaluate("window.pwned") is None


@pytest.mark.parametrize("fragment, shown", [
    ("tag=not_a_tag", "search failed: bad_request: unknown tag(s) not_a_tag"),
    ("tag=rock&min=2", "search failed: bad_request: min must be a number from 0 to 1"),
    ("track=99999", "opening the track failed: not_found: no track with this id"),
    ("track=../../etc/passwd", "opening the track failed: not_found: no track with this id"),
    ("track=1&k=1000", "opening the track failed: bad_request: neighbours must be an integer"),
])
def test_api_errors_are_shown_in_the_page(page: Any, fragment: str, shown: str) -> None:
    page.evaluate(f"location.hash = {json.dumps('#' + fragment)}")
    page.wait_for_selector("#error", state="visible", timeout=10_000)
    assert page.text_content("#error").startswith(shown), page.text_content("#error")
    # a good request clears the error
    page.evaluate("location.hash = '#track=1'")
    _open_track(page, 1)
    assert not page.is_visible("#error")


def test_the_page_needs_the_token(browser: Any, server: ServerThread) -> None:
    errors: list[str] = []
    pg = _open_page(browser, errors)
    try:
        for query in ("", "?token=wrong"):
            response = pg.goto(f"{server.http_url}/catalog{query}")
            assert response.status == 401
            assert pg.text_content("body").strip() == "missing or wrong token"
        assert pg.goto(f"{server.http_url}/catalog?token={TOKEN}").status == 200
    finally:
        pg.close()


# --- HTTP only ------------------------------------------------------------------------------


def test_the_page_is_served_only_with_a_catalog(debug_model: TaggingModel,
                                                catalog_db: Path) -> None:
    configs = {"no catalog": ServerConfig(port=0),
               "no dashboard": ServerConfig(port=0, catalog=str(catalog_db), dashboard=False),
               "catalog": ServerConfig(port=0, catalog=str(catalog_db))}
    answers = {}
    for what, config in configs.items():
        srv = ServerThread(debug_model, config)
        try:
            answers[what] = {path: _get(srv.http_url + path)
                             for path in ("/catalog", "/catalog/", "/", "/api/catalog")}
        finally:
            srv.close()
    assert {p: a[0] for p, a in answers["no catalog"].items()} == {
        "/catalog": 404, "/catalog/": 404, "/": 200, "/api/catalog": 404}
    assert {p: a[0] for p, a in answers["no dashboard"].items()} == {
        "/catalog": 404, "/catalog/": 404, "/": 404, "/api/catalog": 200}
    status, ctype, body = answers["catalog"]["/catalog"]
    assert (status, ctype) == (200, "text/html; charset=utf-8")
    assert answers["catalog"]["/catalog/"][0] == 404
    # Self-contained: nothing loaded from elsewhere, nothing inserted as markup.
    html = body.decode()
    assert re.findall(r'\b(?:src|href)="([^"]*)"', html) == ["data:,", "./"]
    assert not re.search(r"https?://|\bimport\b|@import", html)
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in html
