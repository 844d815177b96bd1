"""Self-describing checkpoints: round trip, and a clear error for every kind of damage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rtagger.audio import WINDOW_SAMPLES
from rtagger.checkpoint import build_untrained, load_model, save_model
from rtagger.errors import CheckpointError


@pytest.fixture()
def ckpt(tmp_path, debug_model):
    debug_model.recipe = {"stage": "test"}
    debug_model.metrics = {"macro_pr_auc": 0.5}
    return save_model(debug_model, tmp_path / "m.safetensors")


def test_round_trip_rebuilds_the_same_model(ckpt, debug_model):
    loaded = load_model(ckpt)
    assert loaded.tags == debug_model.tags
    assert loaded.tagger.cfg == debug_model.tagger.cfg
    assert loaded.aggregator.cfg == debug_model.aggregator.cfg
    assert loaded.recipe == {"stage": "test"} and loaded.metrics == {"macro_pr_auc": 0.5}
    assert loaded.weights_sha256 == debug_model.weights_sha256
    assert loaded.tag_groups["breakdown"] == "structure"
    x = torch.randn(2, WINDOW_SAMPLES)
    with torch.no_grad():
        torch.testing.assert_close(loaded.tagger(x), debug_model.tagger(x))
    desc = loaded.describe()
    assert desc["audio"] == {"sample_rate": 16000, "window_samples": WINDOW_SAMPLES}
    assert desc["mel"]["n_mels"] == 128 and desc["rtagger_version"]


def test_untrained_names_are_flagged():
    m = load_model("untrained:debug")
    assert not m.trained and m.name == "untrained:debug"
    with pytest.raises(CheckpointError, match="unknown model size"):
        load_model("untrained:giant")
    # deterministic: the same weights every time
    assert build_untrained("debug").weights_sha256 == m.weights_sha256


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")


def test_flipped_weight_byte_fails_the_checksum(ckpt):
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupted: sha256"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(ckpt)


def test_random_bytes(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(CheckpointError, match=r"junk\.safetensors"):
        load_model(p)


def test_plain_safetensors_without_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not an rtagger checkpoint"):
        load_model(p)


def _rewrite(path, edit):
    """Rewrite a checkpoint's description with `edit(desc)` (weights unchanged)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    desc = json.loads(meta["rtagger"])
    state = edit(desc, state) or state
    meta["rtagger"] = json.dumps(desc)
    save_file(state, str(path), metadata=meta)


def test_newer_format_version(ckpt):
    _rewrite(ckpt, lambda d, s: d.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer than this rtagger supports"):
        load_model(ckpt)


def test_mel_parameters_that_this_code_does_not_compute(ckpt):
    _rewrite(ckpt, lambda d, s: d["mel"].update(n_fft=1024))
    with pytest.raises(CheckpointError, match="mel parameters"):
        load_model(ckpt)


def test_architecture_that_does_not_match_the_weights(ckpt):
    from rtagger.checkpoint import weights_sha256

    def edit(desc, state):
        state = {k: v for k, v in state.items() if k != "tagger.head.bias"}
        desc["weights_sha256"] = weights_sha256(state)
        return state

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"missing \['head.bias'\]"):
        load_model(ckpt)


def test_tag_count_mismatch(ckpt):
    _rewrite(ckpt, lambda d, s: d.update(tags=d["tags"][:-1]))
    with pytest.raises(CheckpointError, match="35 tags for a model with 36 outputs"):
        load_model(ckpt)


def test_default_model_error_is_explicit_when_none_is_bundled(monkeypatch):
    import rtagger.checkpoint as ck

    monkeypatch.setattr(ck, "bundled_model_path", lambda: None)
    with pytest.raises(CheckpointError, match="no trained default model is bundled"):
        ck.load_model("default")
