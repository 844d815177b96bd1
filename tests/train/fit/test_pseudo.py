"""Pseudo-label shards: what their meta records, and what a resume refuses or rewrites."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import write_audio

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.audio.signals import music_like
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import build_untrained, save_model
from rtagger.train.data.cache import FeatureCache, build_cache
from rtagger.train.data.manifest import Track
from rtagger.train.data.windows import read_shard
from rtagger.train.fit import pseudo
from rtagger.train.fit.pseudo import pseudo_label, shard_path

HOP_S = 1.0  # 5 s songs: 2 windows each


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Six 5 s songs ``t0``..``t5`` in a feature cache, and two untrained debug teachers."""
    d = tmp_path_factory.mktemp("pool")
    tracks = [_song(d, f"t{i}", seed=i) for i in range(6)]
    assert build_cache(tracks, d / "cache", progress=False).n_failed == 0
    teacher = save_model(build_untrained("debug", seed=0), d / "teacher.safetensors")
    other = save_model(build_untrained("debug", seed=1), d / "other.safetensors")
    tags = build_untrained("debug").tags
    swapped = save_model(build_untrained("debug", tags=[tags[1], tags[0], *tags[2:]]),
                         d / "swapped.safetensors")
    return {"dir": d, "tracks": tracks, "cache": d / "cache", "teacher": teacher,
            "other": other, "swapped": swapped}


def _song(d, name: str, seed: int) -> Track:
    p = write_audio(d / f"{name}.flac", music_like(5.0, seed=seed), SAMPLE_RATE, "flac", "s16")
    return Track(name, str(p), (), "unlabelled", 5.0)


@pytest.fixture(autouse=True)
def two_tracks_per_shard(monkeypatch):
    monkeypatch.setattr(pseudo, "TRACKS_PER_SHARD", 2)


def _label(pool, tracks, out, teacher="teacher", hop_s=HOP_S):
    return pseudo_label(pool[teacher], tracks, pool["cache"], out, hop_s=hop_s, progress=False)


def _contents(out) -> dict[str, tuple]:
    return {p.name: (s.refs, s.starts.tolist(), s.probs.tolist())
            for p in sorted(out.glob("shard-*.npz")) for s in [read_shard(p)]}


def test_a_shard_meta_records_teacher_tags_hop_and_its_tracks(pool, tmp_path):
    rep = _label(pool, pool["tracks"], tmp_path / "out")
    assert (rep.shards_total, rep.shards_written, rep.windows) == (3, 3, 6 * 2)
    meta = read_shard(shard_path(tmp_path / "out", 1)).meta
    cache = FeatureCache(pool["cache"])
    assert meta["teacher_sha256"] == build_untrained("debug", seed=0).weights_sha256
    assert meta["tags"] == build_untrained("debug").tags
    assert meta["hop_samples"] == round(HOP_S * SAMPLE_RATE)
    assert meta["window_samples"] == WINDOW_SAMPLES
    t2, t3 = pool["tracks"][2:4]
    assert meta["tracks"] == [{"id": t.id, "path": t.path, "content": cache.entry(t).key}
                              for t in (t2, t3)]
    assert meta["tracks_sha256"] == pseudo.tracks_sha256(meta["tracks"])
    again = _label(pool, pool["tracks"], tmp_path / "out")
    assert (again.shards_written, again.shards_skipped) == (0, 3)


@pytest.mark.parametrize(("change", "key"), [
    ({"hop_s": 0.5}, "hop_samples = 16000, this run has 8000"),
    ({"teacher": "other"}, "teacher_sha256"),
    ({"teacher": "swapped"}, "tags = 36 tags"),  # same tags, another order
])
def test_another_teacher_tag_list_or_hop_is_refused_and_nothing_is_touched(
        pool, tmp_path, change, key):
    out = tmp_path / "out"
    _label(pool, pool["tracks"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=rf"shard-00000\.npz was made with {key}.*use a new "
                                          r"output folder"):
        _label(pool, pool["tracks"], out, **change)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_changed_tracks_rewrite_their_shards_and_log_why(pool, tmp_path, caplog):
    out = tmp_path / "out"
    tracks = pool["tracks"]
    _label(pool, tracks[:3] + tracks[4:], out)  # t3 left out: [t0 t1] [t2 t4] [t5]
    caplog.set_level(logging.WARNING, logger="rtagger.train.fit.pseudo")
    rep = _label(pool, tracks, out)  # t3 back: [t0 t1] [t2 t3] [t4 t5]
    assert (rep.shards_skipped, rep.shards_rewritten, rep.shards_written) == (1, 2, 2)
    assert ("rewriting" in caplog.text and "shard-00001.npz: its tracks changed: 1 tracks "
            "added (t3); 1 removed (t4)" in caplog.text)
    assert "shard-00002.npz: its tracks changed: 1 tracks added (t4)" in caplog.text
    fresh = tmp_path / "fresh"
    _label(pool, tracks, fresh)
    assert _contents(out) == _contents(fresh)  # as if labelled from scratch

    caplog.clear()
    rep = _label(pool, tracks[:3], out)  # fewer tracks: [t0 t1] [t2]; shard 2 is stale
    assert (rep.shards_total, rep.shards_removed, rep.shards_rewritten) == (2, 1, 1)
    assert "removing" in caplog.text and "shard-00002.npz" in caplog.text
    assert sorted(p.name for p in out.glob("shard-*.npz")) == ["shard-00000.npz",
                                                                "shard-00001.npz"]
    assert [s.refs for s in map(read_shard, sorted(out.glob("shard-*.npz")))] == [
        [tracks[0].path] * 2 + [tracks[1].path] * 2, [tracks[2].path] * 2]


def test_changed_audio_under_the_same_path_rewrites_its_shard(pool, tmp_path, caplog):
    song = _song(tmp_path, "t9", seed=9)
    build_cache([song], pool["cache"], progress=False)
    out = tmp_path / "out"
    first = _label(pool, [song], out)
    assert first.shards_written == 1
    _song(tmp_path, "t9", seed=10)  # new content at the same path
    build_cache([song], pool["cache"], progress=False)
    caplog.set_level(logging.WARNING, logger="rtagger.train.fit.pseudo")
    rep = _label(pool, [song], out)
    assert rep.shards_rewritten == 1
    assert "1 with another path or audio (t9)" in caplog.text


def test_shards_of_an_older_rtagger_or_unreadable_ones_are_rewritten(pool, tmp_path, caplog):
    out = tmp_path / "out"
    _label(pool, pool["tracks"][:4], out)
    old = read_shard(shard_path(out, 0))
    v1 = {k: old.meta[k] for k in ("teacher", "teacher_sha256", "tags", "hop_samples")}
    np.savez(shard_path(out, 0), refs=np.array(old.refs), starts=old.starts,
             probs=old.probs.astype(np.float16), meta=json.dumps(v1))
    shard_path(out, 1).write_bytes(b"not a zip file")
    caplog.set_level(logging.WARNING, logger="rtagger.train.fit.pseudo")
    rep = _label(pool, pool["tracks"][:4], out)
    assert rep.shards_rewritten == 2
    assert "lacks ['window_samples', 'tracks_sha256'] (written by an older rtagger)" in caplog.text
    assert "shard-00001.npz: it is unreadable" in caplog.text
    assert read_shard(shard_path(out, 0)).meta["tracks_sha256"]
