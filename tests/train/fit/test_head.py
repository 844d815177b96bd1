"""train head: a platform's tags on catalog embeddings; its checkpoint works with `tag`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import toy_song, write_audio
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.catalog.add import add_to_catalog
from rtagger.catalog.sources import expand
from rtagger.catalog.store import Catalog
from rtagger.cli.main import app
from rtagger.model.checkpoint import load_model
from rtagger.pipeline.tagger import Tagger
from rtagger.train.fit.head import HeadConfig, load_windows, read_labels, track_probs, train_head

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, debug_model):
    d = tmp_path_factory.mktemp("head")
    for i in range(5):
        write_audio(d / f"drums{i}.wav", toy_song("drums", 5.0 + i, seed=i), SAMPLE_RATE,
                    "pcm_s16le", "s16")
        write_audio(d / f"piano{i}.wav", toy_song("piano", 5.0 + i, seed=i), SAMPLE_RATE,
                    "pcm_s16le", "s16")
    db = d / "cat.db"
    with Catalog(db) as cat:
        add_to_catalog(cat, expand([d]), Tagger(debug_model, hop_s=2.0), workers=1)
        recs = cat.tracks(setup_id=cat.setup().id)
    lines = ["track,percussive,calm"]
    for n, r in enumerate(recs):
        drums = "drums" in r.source
        # one label of each tag missing; the source path, the id: both name a track
        perc = "" if n == 0 else str(int(drums))
        calm = "" if n == 1 else str(int(not drums))
        lines.append(f"{r.source if n % 2 else r.id},{perc},{calm}")
    labels = d / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    return d, db, labels


def test_the_head_learns_the_tags_and_its_checkpoint_is_used_by_tag(labelled, tmp_path):
    d, db, labels = labelled
    out = tmp_path / "platform.safetensors"
    cfg = HeadConfig(epochs=150, folds=2, bootstrap=50)
    report = train_head(db, labels, out, cfg)
    cv = report["cross_validated"]
    assert report["tracks"] == 10 and cv["per_tag"]["percussive"]["labelled"] == 9
    assert cv["per_tag"]["percussive"]["roc_auc"] > 0.9
    lo, hi = cv["per_tag"]["percussive"]["roc_auc_95"]
    assert lo <= cv["per_tag"]["percussive"]["roc_auc"] <= hi
    assert sum(b["count"] for b in cv["calibration"]) == 18  # every labelled entry once

    model = load_model(out)  # a standard, self-describing checkpoint
    assert model.tags == ["percussive", "calm"] and model.aggregator is None
    assert model.recipe["stage"] == "head" and model.metrics["head_cv_macro_roc_auc"] > 0.9
    files = sorted(str(p) for p in d.glob("*.wav"))
    res = CliRunner().invoke(app, ["tag", "--model", str(out), "--hop", "2.0", "--engine",
                                   "torch", "--format", "json", *files])
    assert res.exit_code == 0, res.output
    tagged = {r["source"]: r["track"] for r in json.loads(res.stdout)["results"]}
    for f in files:
        assert (tagged[f]["percussive"] > 0.5) == ("drums" in f)
        assert (tagged[f]["calm"] > 0.5) == ("piano" in f)
    # what `tag` computes is what the head was trained to compute from the catalog
    with Catalog(db, create=False) as cat:
        ids, _, _ = read_labels(labels, cat)
        w = load_windows(cat, ids)
        sources = [r.source for r in cat.tracks(ids)]
    head = model.tagger.head
    with torch.no_grad():
        p = track_probs(w, head.weight.T, head.bias).numpy()
    for i, s in enumerate(sources):
        np.testing.assert_allclose(p[i], [tagged[s]["percussive"], tagged[s]["calm"]],
                                   atol=2e-3)
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and json.loads(info.stdout)["tags"] == ["percussive", "calm"]
