"""catalog add on Ray (local, 2 CPUs): rows equal the local add's; failures; resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli_with, music_like, write_audio
from typer.testing import CliRunner

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")  # ray[data] brings it; skip cleanly without

from rtagger.audio.decode import SAMPLE_RATE  # noqa: E402
from rtagger.catalog import cluster  # noqa: E402
from rtagger.catalog.add import add_to_catalog  # noqa: E402
from rtagger.catalog.sources import expand  # noqa: E402
from rtagger.catalog.store import Catalog  # noqa: E402
from rtagger.cli.catalog import register  # noqa: E402
from rtagger.model.checkpoint import build_untrained, save_model  # noqa: E402
from rtagger.pipeline.tagger import Tagger  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

N_GOOD = 20


@pytest.fixture(scope="module")
def local_ray():
    """One small local instance for the module: 2 CPUs, a 200 MB object store, no
    dashboard, worker logs kept out of pytest's output."""
    ray.init("local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """20 short songs (WAV, FLAC, one 44.1 kHz stereo MP3), a corrupt MP3 among them."""
    d = tmp_path_factory.mktemp("songs")
    for i in range(N_GOOD):
        seconds = 2.0 + (i % 4) * 1.5  # 1 to 3 windows
        if i == 7:
            stereo = np.stack([music_like(seconds, 44_100, seed=i)] * 2)
            write_audio(d / f"s{i:02d}.mp3", stereo, 44_100, "libmp3lame", "fltp", channels=2)
        elif i % 3 == 0:
            write_audio(d / f"s{i:02d}.flac", music_like(seconds, seed=i), SAMPLE_RATE,
                        "flac", "s16")
        else:
            write_audio(d / f"s{i:02d}.wav", music_like(seconds, seed=i), SAMPLE_RATE,
                        "pcm_s16le", "s16")
    (d / "s99-broken.mp3").write_bytes(b"ID3" + bytes(range(256)) * 40)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(build_untrained("debug", seed=0),
                      tmp_path_factory.mktemp("model") / "debug.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, songs, checkpoint):
    """The same files through the local `catalog add`."""
    path = tmp_path_factory.mktemp("ref") / "local.db"
    with Catalog(path) as cat:
        report = add_to_catalog(cat, expand([songs]), Tagger(checkpoint, hop_s=2.0),
                                workers=1)
    assert (report.added, report.failed) == (N_GOOD, 1)
    return path


def _rows(path):
    with Catalog(path, create=False) as cat:
        tracks = {t.source: t for t in cat.tracks(setup_id=cat.setup().id, taggram=True,
                                                  window_embeddings=True)}
        failures = {f["source"]: (f["error"], f["reason"]) for f in cat.failures()}
        return tracks, failures, cat.setup()


def _assert_same_catalog(path, reference_path):
    tracks, failures, setup = _rows(path)
    ref_tracks, ref_failures, ref_setup = _rows(reference_path)
    assert setup.weights_sha256 == ref_setup.weights_sha256
    assert (setup.hop_s, setup.aggregation) == (ref_setup.hop_s, ref_setup.aggregation)
    assert failures == ref_failures and len(failures) == 1
    assert sorted(tracks) == sorted(ref_tracks) and len(tracks) == N_GOOD
    for source, ref in ref_tracks.items():
        got = tracks[source]
        assert got.content_sha256 == ref.content_sha256
        assert got.duration_s == pytest.approx(ref.duration_s, abs=1e-9)
        np.testing.assert_allclose(got.probs, ref.probs, atol=1e-5)
        np.testing.assert_allclose(got.embedding, ref.embedding, atol=1e-5)
        np.testing.assert_allclose(got.taggram, ref.taggram, atol=1e-3)  # float16
        np.testing.assert_allclose(got.window_embeddings, ref.window_embeddings, atol=2e-3)


def _tagger(checkpoint):
    return Tagger(checkpoint, engine="torch", hop_s=2.0)


def test_ray_add_equals_local_add_and_a_rerun_skips_everything(tmp_path, local_ray, songs,
                                                              checkpoint, reference):
    db = tmp_path / "ray.db"
    sources = expand([songs])
    with Catalog(db) as cat:
        report = cluster.add_on_ray(cat, sources, _tagger(checkpoint), engine="torch",
                                    tracks_per_shard=4)
    assert (report.added, report.failed, report.skipped) == (N_GOOD, 1, 0)
    assert report.shards >= 6 and report.workers == 2  # 21 tracks, 4 a shard
    assert report.failures[0]["source"].endswith("s99-broken.mp3")
    _assert_same_catalog(db, reference)
    assert not (tmp_path / "ray.db.shards").exists()  # every shard merged, then removed

    with Catalog(db) as cat:
        again = cluster.add_on_ray(cat, sources, _tagger(checkpoint), engine="torch")
    assert (again.added, again.failed, again.skipped) == (0, 0, N_GOOD + 1)
    assert again.decode_s == 0.0  # hashed, not decoded


class _Killed(Exception):
    pass


def test_a_killed_run_leaves_shards_that_the_rerun_command_merges_without_redoing(
        tmp_path, local_ray, songs, checkpoint, reference, monkeypatch):
    db, shards = tmp_path / "ray.db", tmp_path / "shards"
    merge = cluster.merge_shard

    def killed_at_first_merge(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(cluster, "merge_shard", killed_at_first_merge)
    with Catalog(db) as cat, pytest.raises(_Killed):
        cluster.add_on_ray(cat, expand([songs]), _tagger(checkpoint), engine="torch",
                           tracks_per_shard=4, shard_dir=shards)
    with Catalog(db) as cat:
        assert cat.count() == 0
        folder = cluster.shard_folder(shards, cat.setup())
    left = cluster._leftover_shards(folder)
    assert left  # the shard whose merge was "killed", and any written after it
    merged: list[dict] = []

    def spy(catalog, path, *args, **kwargs):
        merged.append(pq.read_table(path, columns=["source", "status"]).to_pydict())
        return merge(catalog, path, *args, **kwargs)

    monkeypatch.setattr(cluster, "merge_shard", spy)
    res = CliRunner().invoke(cli_with(register), [
        "catalog", "add", str(songs), "--db", str(db), "--model", str(checkpoint),
        "--engine", "torch", "--hop", "2", "--ray", "--tracks-per-shard", "8",
        "--shard-dir", str(shards), "--format", "json"])
    assert res.exit_code == 1, res.output  # one file failed
    report = json.loads(res.stdout)
    assert (report["added"], report["failed"], report["skipped"]) == (N_GOOD, 1, 0)
    recovered = {s for m in merged[: len(left)] for s in m["source"]}
    assert report["recovered"] == len(recovered) >= 1
    # the recovered tracks were hashed again (their files may have changed), not re-tagged
    for m in merged[len(left) :]:
        for source, status in zip(m["source"], m["status"], strict=True):
            assert source not in recovered or status == "unchanged"
    _assert_same_catalog(db, reference)
    assert not shards.exists()


@pytest.mark.parametrize("args, message", [
    (["--gpu"], "need --ray"),
    (["--inference-actors", "2"], "need --ray"),
    (["--ray-address", "127.0.0.1:6379", "--workers", "2"], "a cluster has its own CPUs"),
])
def test_cluster_options_are_checked_before_anything_runs(tmp_path, args, message):
    res = CliRunner().invoke(cli_with(register), [
        "catalog", "add", str(tmp_path), "--db", str(tmp_path / "x.db"), *args])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "x.db").exists()
