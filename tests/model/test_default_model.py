"""The bundled default model: trained, described by its card, sensible on unseen songs."""

from __future__ import annotations

import json

import numpy as np
from conftest import needs_synth_tools
from typer.testing import CliRunner

from rtagger.cli.main import app
from rtagger.model.checkpoint import bundled_model_path, load_model
from rtagger.model.network import SIZES
from rtagger.model.vocab import tags_v1
from rtagger.train.synth.build import run_build

# Mean per-song ROC-AUC of the track tags (how often a true tag outranks a false one) over
# 4 fresh test-split songs. The default scored 0.82-0.93 for seeds 11-13 (2026-11-25);
# random scores give 0.5 +- 0.05. A model that fails to load its weights, mixes up its tag
# order or lost its training falls below this.
MIN_SONG_ROC_AUC = 0.70


def test_the_default_is_bundled_trained_and_documented():
    path = bundled_model_path()
    assert path is not None, "rtagger/model/weights/default.safetensors is missing"
    assert path.stat().st_size < 8 * 2**20  # a few MB inside the package
    model = load_model("default")
    assert model.trained and model.aggregator is not None and model.name == "default"
    student = SIZES["small"]
    assert (model.tagger.cfg.conv_channels, model.tagger.cfg.d_model) == (
        student["conv_channels"], student["d_model"])
    card = path.with_name("MODEL_CARD.md").read_text(encoding="utf-8")
    assert model.weights_sha256 in card  # the card describes exactly these weights
    for group in ("genre", "instrument", "tempo", "mode", "structure"):
        assert f"| {group} |" in card


def _roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Probability that a true tag outranks a false one (ties count half)."""
    pos, neg = s[y], s[~y]
    return float(((pos[:, None] > neg[None, :]).sum()
                  + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


@needs_synth_tools
def test_tag_without_a_model_gives_sensible_tags_on_unseen_benchmark_songs(tmp_path):
    manifest = run_build(tmp_path / "songs", "test", 4, seed=11, jobs=2, min_s=40, max_s=50,
                         progress=False).manifest
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    paths = [str(manifest.parent / r["path"]) for r in records]
    res = CliRunner().invoke(app, ["tag", "--format", "json", *paths])
    assert res.exit_code == 0, res.output
    assert "untrained" not in res.stderr.lower()
    doc = json.loads(res.stdout)
    aucs, benchmark_tags = [], set(tags_v1())
    for result, rec in zip(doc["results"], records, strict=True):
        assert result["model"]["trained"] is True and "warning" not in result
        tags = [t for t in result["track"] if t in benchmark_tags]  # the tags songs decide
        y = np.array([t in rec["tags"] for t in tags])
        aucs.append(_roc_auc(y, np.array([result["track"][t] for t in tags])))
    assert np.mean(aucs) >= MIN_SONG_ROC_AUC, aucs
