"""train head-bench: a valid synthetic catalog, recoverable planted tags, a complete report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.audio.ringbuffer import Windower
from rtagger.catalog.store import Catalog
from rtagger.cli.main import app
from rtagger.errors import ConfigError
from rtagger.machine import cpu_model
from rtagger.model.checkpoint import load_model
from rtagger.train.fit import head as head_mod
from rtagger.train.fit.head import HeadConfig, load_windows, read_labels
from rtagger.train.fit.head_bench import SyntheticSpec, build_catalog, head_bench, window_valid

pytest.importorskip("sklearn")


@pytest.mark.parametrize("total", [1, 1000, WINDOW_SAMPLES - 1, WINDOW_SAMPLES,
                                   WINDOW_SAMPLES + 1, 3 * WINDOW_SAMPLES,
                                   3 * WINDOW_SAMPLES + 5, round(77.652 * SAMPLE_RATE)])
def test_windows_are_cut_as_the_windower_cuts_them(total):
    windower = Windower()
    cut = windower.push(np.zeros(total, np.float32)) + windower.flush()
    assert window_valid(total).tolist() == [w.valid for w in cut]


def test_the_synthetic_catalog_is_one_that_catalog_search_and_the_head_read(tmp_path):
    spec = SyntheticSpec(tracks=24, tags=3, seed=1)
    db = tmp_path / "cat.db"
    built = build_catalog(db, spec)  # the default model, as the benchmark runs
    base = load_model("default")
    with Catalog(db, create=False) as cat:
        setup = cat.setup()
        recs = cat.tracks(setup_id=setup.id, taggram=True, window_embeddings=True)
    assert setup.weights_sha256 == base.weights_sha256 and setup.model_source == "default"
    assert setup.tags == tuple(base.tags) and setup.aggregation == "mean"
    assert setup.embedding_dim == base.tagger.cfg.embedding_dim == built["embedding_dim"]
    assert len(recs) == 24 and sum(len(r.taggram) for r in recs) == built["windows"]
    present = built["_truth"]
    for i, r in enumerate(recs):
        assert 40 <= r.duration_s <= 120 and len(r.content_sha256) == 64
        valid = window_valid(round(r.duration_s * SAMPLE_RATE))
        assert r.window_embeddings.shape == (len(valid), setup.embedding_dim)
        assert r.taggram.shape == (len(valid), len(setup.tags))
        share = valid / WINDOW_SAMPLES
        np.testing.assert_allclose(r.probs, share @ r.taggram.astype(np.float32) / share.sum(),
                                   atol=2e-3)  # the mean aggregation, on the float16 taggram
        assert abs(np.linalg.norm(r.embedding) - 1) < 1e-5
        assert r.meta["tags"] == [t for t, p in zip(spec.tag_names(), present[i], strict=True)
                                  if p]
    # the same seed writes the same catalog
    again = build_catalog(tmp_path / "again.db", spec)
    assert again["planted"] == built["planted"]
    with Catalog(tmp_path / "again.db", create=False) as cat:
        assert [r.content_sha256 for r in cat.tracks(setup_id=cat.setup().id)] == [
            r.content_sha256 for r in recs]
    with pytest.raises(ConfigError, match="exists"):
        build_catalog(db, spec)

    res = CliRunner().invoke(app, ["catalog", "search", "--db", str(db), "--tag", base.tags[0],
                                   "--min", "0", "-k", "5", "--format", "json"])
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert found["tracks_searched"] == 24 and len(found["results"]) == 5

    labels = tmp_path / "labels.csv"
    head_mod.noisy_labels(db, spec.tag_names(), 0.5, 0.1, 0, labels, tmp_path / "truth.csv")
    with Catalog(db, create=False) as cat:
        ids, tags, y = read_labels(labels, cat)
        w = load_windows(cat, ids)
    assert tags == spec.tag_names() and y.shape == (24, 3) and len(w.emb) == built["windows"]


def test_the_head_recovers_the_planted_tags_and_the_report_is_complete(tmp_path):
    # stronger tags than the benchmark's 0.25-1.5: 100 labels a tag must be enough here
    spec = SyntheticSpec(tracks=200, tags=3, seed=0, strength=(2.0, 3.0))
    cfg = HeadConfig(epochs=150, bootstrap=20)
    fit_head = head_mod.fit_head
    r = head_bench(spec, hide=0.5, flip=0.1, cfg=cfg, model="untrained:debug",
                   workdir=tmp_path, threads=1)
    assert head_mod.fit_head is fit_head  # the timing wrappers are gone
    assert r["machine"]["cpu"] == cpu_model() and r["machine"]["torch_threads"] == 1
    assert r["catalog"]["tracks"] == 200 and r["head_report"]["tracks"] == 200
    assert r["head_config"] == {**cfg.__dict__}
    assert 0.4 < r["labels"]["shown"] < 0.6
    t = r["time"]["train_head"]
    phases = t["phases"]
    assert set(phases) == {"read_labels", "load_windows", "cross_validate", "score_noisy",
                           "read_truth", "score_truth", "final_fit", "checkpoint", "other"}
    assert len(phases["cross_validate"]["fold_fits_wall_s"]) == cfg.folds
    for k in ("wall_s", "cpu_s"):
        assert sum(p[k] for p in phases.values()) == pytest.approx(t[k])
        assert r["time"]["catalog_build"][k] >= 0
    assert r["peak_rss_mib"]["after_train_head"] >= r["peak_rss_mib"]["after_build_and_labels"] > 0
    cv = r["cross_validated"]
    assert set(cv) == {"against_noisy_labels", "against_truth", "oracle_against_truth"}
    # planted tags are found: well above chance against the clean labels, below the oracle
    assert cv["against_truth"]["macro_roc_auc"] > 0.8
    assert cv["against_noisy_labels"]["macro_roc_auc"] > 0.7
    assert cv["oracle_against_truth"]["macro_roc_auc"] > cv["against_truth"]["macro_roc_auc"]
    assert set(r["head_report"]["against_truth"]["per_tag"]) == set(spec.tag_names())
    assert load_model(tmp_path / "head.safetensors").tags == spec.tag_names()


def test_the_command_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    args = ["train", "head-bench", "--tracks", "30", "--tags", "2", "--epochs", "20",
            "--model", "untrained:debug", "--threads", "1", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    report = json.loads(out.read_text())
    assert summary["train_head_wall_s"] == report["time"]["train_head"]["wall_s"]
    assert report["catalog"]["tracks"] == 30 and report["head_config"]["epochs"] == 20
    assert report["labels"]["hide"] == 0.7 and report["labels"]["flip"] == 0.1

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "catalog.db").write_bytes(b"")
    res = CliRunner().invoke(app, [*args, "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 2 and "exists" in res.output
