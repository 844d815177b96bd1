"""catalog search / similar / export / info, through the library and the CLI (--format json)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import cli_with, music_like, toy_song, write_audio
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.catalog.index import EXACT_BELOW, EmbeddingIndex, cached_index
from rtagger.catalog.query import search_tags, similar
from rtagger.catalog.store import Catalog
from rtagger.cli.catalog import register
from rtagger.errors import ConfigError

runner = CliRunner()
app = cli_with(register)


@pytest.fixture(scope="module")
def catalog_db(tmp_path_factory):
    """Six tracks (three piano-like, three drum-like) added through the CLI."""
    d = tmp_path_factory.mktemp("songs")
    for i in range(3):
        write_audio(d / f"piano{i}.wav", toy_song("piano", 6.0, seed=i), SAMPLE_RATE,
                    "pcm_s16le", "s16")
        write_audio(d / f"drums{i}.wav", toy_song("drums", 6.0, seed=i), SAMPLE_RATE,
                    "pcm_s16le", "s16")
    db = d / "cat.db"
    res = runner.invoke(app, ["catalog", "add", str(d), "--db", str(db), "--model",
                              "untrained:debug", "--engine", "torch", "--workers", "1",
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert (report["added"], report["failed"]) == (6, 0)
    assert report["realtime_factor"] > 0 and report["windows"] == 12
    return db


def _json(args: list[str]) -> dict:
    res = runner.invoke(app, ["catalog", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_search_filters_by_every_tag_and_ranks_by_geometric_mean(catalog_db):
    with Catalog(catalog_db, create=False) as cat:
        ids, probs = cat.matrix("probs", cat.setup().id)
        tags = list(cat.setup().tags)
    a, b = tags.index("rock"), tags.index("drums")
    cut = float(np.sort(np.minimum(probs[:, a], probs[:, b]))[-3])  # 3 or more match
    res = _json(["search", "--db", str(catalog_db), "--tag", "rock", "--tag", "drums",
                 "--min", str(cut), "--format", "json"])
    want = [i for i in range(len(ids)) if probs[i, a] >= cut and probs[i, b] >= cut]
    assert res["matches"] == len(want) >= 3 and res["tracks_searched"] == 6
    got = [r["id"] for r in res["results"]]
    assert sorted(got) == sorted(int(ids[i]) for i in want)
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    i = next(j for j in range(len(ids)) if ids[j] == got[0])
    assert scores[0] == pytest.approx(np.sqrt(probs[i, a] * probs[i, b]), rel=1e-4)
    with Catalog(catalog_db, create=False) as cat, pytest.raises(ConfigError, match="unknown"):
        search_tags(cat, ["not_a_tag"])


def test_similar_by_id_and_by_a_file_not_in_the_catalog(catalog_db, tmp_path):
    with Catalog(catalog_db, create=False) as cat:
        ids, emb = cat.embeddings(cat.setup().id)
        first = cat.tracks([int(ids[0])])[0]
        res = similar(cat, str(ids[0]), k=3)
    truth = np.argsort(-(emb @ emb[0]), kind="stable")[1:4]
    assert [r["id"] for r in res["results"]] == [int(ids[j]) for j in truth]
    assert ids[0] not in [r["id"] for r in res["results"]]  # never itself
    assert res["index"] == "exact"
    # a catalogued file by path finds the same neighbours
    by_path = _json(["similar", first.source, "--db", str(catalog_db), "-k", "3", "--format",
                     "json"])
    assert [r["id"] for r in by_path["results"]] == [r["id"] for r in res["results"]]
    # a new file is tagged on the fly with the catalog's model; a copy of a catalogued
    # file is its own nearest neighbour (cosine 1)
    copy = tmp_path / "copy.wav"
    copy.write_bytes(open(first.source, "rb").read())
    new = _json(["similar", str(copy), "--db", str(catalog_db), "-k", "2", "--format", "json"])
    assert new["query"]["in_catalog"] is False
    assert new["results"][0]["id"] == first.id
    assert new["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    other = write_audio(tmp_path / "other.wav", music_like(5.0, seed=7), SAMPLE_RATE,
                        "pcm_s16le", "s16")
    assert len(_json(["similar", str(other), "--db", str(catalog_db), "--format",
                      "json"])["results"]) == 6  # k=10 > catalog: every track once


def test_export_formats_agree(catalog_db, tmp_path):
    jsonl = runner.invoke(app, ["catalog", "export", "--db", str(catalog_db), "--format",
                                "jsonl", "--embeddings"])
    assert jsonl.exit_code == 0, jsonl.output
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    doc = _json(["export", "--db", str(catalog_db), "--format", "json"])
    assert [r["id"] for r in doc["tracks"]] == [r["id"] for r in rows]
    assert len(rows) == 6 and len(rows[0]["embedding"]) == 32 and "rock" in rows[0]
    out = tmp_path / "cat.csv"
    res = runner.invoke(app, ["catalog", "export", "--db", str(catalog_db), "--format", "csv",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [int(r["id"]) for r in table] == [r["id"] for r in rows]
    assert float(table[0]["rock"]) == pytest.approx(rows[0]["rock"], abs=1e-5)
    pq = pytest.importorskip("pyarrow.parquet")
    target = tmp_path / "cat.parquet"
    res = runner.invoke(app, ["catalog", "export", "--db", str(catalog_db), "--format",
                              "parquet", "--out", str(target), "--embeddings"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(target)
    assert t.num_rows == 6 and t.column("id").to_pylist() == [r["id"] for r in rows]
    np.testing.assert_allclose(np.array(t.column("embedding").to_pylist()),
                               np.array([r["embedding"] for r in rows]), atol=1e-7)


def test_info_reports_setups_and_failures(catalog_db):
    info = _json(["info", "--db", str(catalog_db), "--format", "json"])
    assert info["tracks"] == 6 and info["failures"] == []
    (setup,) = info["setups"]
    assert setup["model"] == "untrained:debug" and setup["tracks"] == 6
    res = runner.invoke(app, ["catalog", "search", "--db", str(catalog_db.with_name("no.db")),
                              "--tag", "rock"])
    assert res.exit_code == 2 and "no such catalog" in res.output


def test_exact_index_matches_brute_force_and_auto_stays_exact_below_the_threshold():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((500, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(100, 600)
    index = EmbeddingIndex(ids, emb)
    assert index.kind == "exact" and len(emb) < EXACT_BELOW
    got, scores = index.search(emb[:4], 5, exclude=ids[:4])
    for q in range(4):
        s = emb @ emb[q]
        s[q] = -np.inf
        assert list(got[q]) == list(ids[np.argsort(-s, kind="stable")[:5]])
        np.testing.assert_allclose(scores[q], np.sort(s)[::-1][:5], rtol=1e-5)


def test_hnsw_index_finds_the_exact_neighbours_and_is_cached(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((2000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(2000)
    exact, _ = EmbeddingIndex(ids, emb, "exact").search(emb[:50], 10)
    stamp = {"count": 2000}
    cache = tmp_path / "idx.faiss"
    hnsw = cached_index(ids, emb, stamp, cache, "hnsw")
    approx, _ = hnsw.search(emb[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact, strict=True)])
    assert recall > 0.95
    assert cache.is_file()
    again = cached_index(ids, emb, stamp, cache, "hnsw")  # loaded, not rebuilt
    assert again._faiss is not hnsw._faiss
    np.testing.assert_array_equal(again.search(emb[:50], 10)[0], approx)
