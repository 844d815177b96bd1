"""catalog add: stored tags equal tag_file's; failures recorded; resume and re-tag rules."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from conftest import music_like, write_audio

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.catalog.add import add_to_catalog, track_embedding
from rtagger.catalog.sources import expand
from rtagger.catalog.store import Catalog
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import build_untrained
from rtagger.pipeline.tagger import Tagger


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Four short songs in three formats (one 44.1 kHz stereo MP3), in nested folders."""
    d = tmp_path_factory.mktemp("library")
    (d / "a" / "b").mkdir(parents=True)
    write_audio(d / "one.wav", music_like(8.0, seed=1), SAMPLE_RATE, "pcm_s16le", "s16")
    write_audio(d / "a" / "two.flac", music_like(5.0, seed=2), SAMPLE_RATE, "flac", "s16")
    stereo = np.stack([music_like(6.0, 44_100, seed=3)] * 2)
    write_audio(d / "a" / "b" / "three.mp3", stereo, 44_100, "libmp3lame", "fltp", channels=2)
    write_audio(d / "a" / "b" / "four.wav", music_like(2.0, seed=4), SAMPLE_RATE,
                "pcm_s16le", "s16")
    (d / "notes.txt.bak").write_text("not audio, not listed")
    return d


def test_stored_tags_taggram_and_embedding_equal_tag_file(tmp_path, library, debug_model):
    tagger = Tagger(debug_model, hop_s=2.0)
    sources = expand([library])
    assert [s.location.rsplit("/", 1)[1] for s in sources] == [
        "one.wav", "two.flac", "four.wav", "three.mp3"]  # a folder before its subfolders
    with Catalog(tmp_path / "cat.db") as cat:
        report = add_to_catalog(cat, sources, tagger, workers=2)
        assert (report.added, report.failed, report.skipped) == (4, 0, 0)
        for src in sources:
            rec = cat.track_by_source(src.location)
            (rec_full,) = cat.tracks([rec.id], taggram=True, window_embeddings=True)
            ref = tagger.tag_file(src.location)
            np.testing.assert_allclose(rec.probs, ref.track_probs, atol=1e-6)
            np.testing.assert_allclose(rec_full.taggram, ref.taggram(), atol=1e-3)  # float16
            np.testing.assert_allclose(rec_full.window_embeddings,
                                       np.stack([w.embedding for w in ref.windows]),
                                       atol=2e-3, rtol=1e-3)
            valid = [round((w.end_s - w.start_s) * SAMPLE_RATE) for w in ref.windows]
            emb = track_embedding(np.stack([w.embedding for w in ref.windows]), valid)
            np.testing.assert_allclose(rec.embedding, emb, atol=1e-6)
            assert np.linalg.norm(rec.embedding) == pytest.approx(1.0, abs=1e-5)
            assert rec.duration_s == pytest.approx(ref.duration_s, abs=1e-3)
        setup = cat.setup()
        assert setup.weights_sha256 == debug_model.weights_sha256
        assert setup.vocabulary == "v1" and setup.hop_s == 2.0
    # WAL: a second reader sees the committed rows while nothing is open
    assert sqlite3.connect(tmp_path / "cat.db").execute(
        "PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_corrupt_file_among_good_ones_is_recorded_and_the_rest_are_tagged(tmp_path, library,
                                                                           debug_model):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"ID3" + bytes(range(256)) * 40)
    truncated = tmp_path / "cut.wav"
    data = (library / "one.wav").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    tagger = Tagger(debug_model)
    sources = expand([library, bad, truncated])
    with Catalog(tmp_path / "cat.db") as cat:
        report = add_to_catalog(cat, sources, tagger, workers=1)
        assert (report.added, report.failed) == (4, 2)
        failures = {f["source"]: f for f in cat.failures()}
        assert set(failures) == {str(bad), str(truncated)}
        assert failures[str(truncated)]["error"] == "AudioError"
        assert "truncated" in failures[str(truncated)]["reason"]
        assert cat.count() == 4
        # the same bytes are not retried; --retry-failed retries them
        again = add_to_catalog(cat, sources, tagger, workers=1)
        assert (again.added, again.skipped, again.failed) == (0, 6, 0)
        retried = add_to_catalog(cat, sources, tagger, workers=1, retry_failed=True)
        assert (retried.added, retried.skipped, retried.failed) == (0, 4, 2)
        # a repaired file is tagged and its failure row goes away
        truncated.write_bytes(data)
        fixed = add_to_catalog(cat, sources, tagger, workers=1)
        assert (fixed.added, fixed.failed) == (1, 0)
        assert [f["source"] for f in cat.failures()] == [str(bad)]


def test_unchanged_tracks_are_skipped_a_changed_file_or_model_re_tags(tmp_path, library,
                                                                        debug_model):
    work = tmp_path / "lib"
    work.mkdir()
    for name in ("one.wav", "a/two.flac"):
        (work / name.split("/")[-1]).write_bytes((library / name).read_bytes())
    with Catalog(tmp_path / "cat.db") as cat:
        add_to_catalog(cat, expand([work]), Tagger(debug_model), workers=1)
        ids = {r.source: r.id for r in cat.tracks(setup_id=cat.setup().id)}
        write_audio(work / "one.wav", music_like(8.0, seed=9), SAMPLE_RATE, "pcm_s16le", "s16")
        r = add_to_catalog(cat, expand([work]), Tagger(debug_model), workers=1)
        assert (r.added, r.skipped) == (1, 1)
        other = build_untrained("debug", seed=1)
        r = add_to_catalog(cat, expand([work]), Tagger(other), workers=1)
        assert (r.added, r.skipped) == (2, 0)
        assert cat.count() == 2  # replaced in place, never duplicated
        assert {r.source: r.id for r in cat.tracks(setup_id=cat.setup().id)} == ids
        assert [n for _, n in cat.setups()] == [0, 2]
        assert cat.setup().weights_sha256 == other.weights_sha256


def test_lists_and_manifests_expand_with_their_metadata(tmp_path, library):
    (tmp_path / "list.m3u").write_text(f"# a playlist\n{library / 'one.wav'}\n"
                                       f"../{tmp_path.name}/x.wav\nhttp://example.com/s.mp3\n")
    (tmp_path / "m.jsonl").write_text(
        f'{{"id": "s1", "path": "{library / "one.wav"}", "tags": ["rock"], "split": "test",'
        f' "groove": "g1", "timeline": {{"big": 1}}}}\n{{"id": "s2", "path": "y.flac"}}\n'
        f'{{"id": "s3", "pa')  # a killed writer's last line is skipped, as manifests allow
    srcs = expand([tmp_path / "list.m3u", tmp_path / "m.jsonl"])
    assert [s.location for s in srcs] == [str(library / "one.wav"), str(tmp_path / "x.wav"),
                                          "http://example.com/s.mp3", str(tmp_path / "y.flac")]
    assert srcs[0].meta == {}  # first mention wins
    assert expand([tmp_path / "m.jsonl"])[0].meta == {"id": "s1", "tags": ["rock"],
                                                      "split": "test", "groove": "g1"}
    with pytest.raises(ConfigError, match="no such file"):
        expand([tmp_path / "missing"])
