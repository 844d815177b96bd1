"""Self-describing checkpoints: round trip, and a clear error for every kind of damage."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.errors import CheckpointError
from rtagger.model.checkpoint import build_untrained, load_model, save_model, tags_sha256


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


def test_a_saved_checkpoint_is_readable_by_others(ckpt):
    assert ckpt.stat().st_mode & 0o044 == 0o044  # not the owner-only mode of a temp file


def test_newer_format_version(ckpt):
    _rewrite(ckpt, lambda d, s: d.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer than this rtagger supports"):
        load_model(ckpt)


def test_mel_parameters_that_this_code_does_not_compute(ckpt):
    _rewrite(ckpt, lambda d, s: d["mel"].update(n_fft=1024))
    with pytest.raises(CheckpointError, match="mel parameters"):
        load_model(ckpt)


def test_architecture_that_does_not_match_the_weights(ckpt):
    from rtagger.model.checkpoint import weights_sha256

    def edit(desc, state):
        state = {k: v for k, v in state.items() if k != "tagger.head.bias"}
        desc["weights_sha256"] = weights_sha256(state)
        return state

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"missing \['head.bias'\]"):
        load_model(ckpt)


def test_tag_count_mismatch(ckpt):
    def edit(desc, state):  # a consistent but short tag list: caught by the output count
        desc["tags"] = desc["tags"][:-1]
        desc["tags_sha256"] = tags_sha256(desc["tags"])

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match="35 tags for a model with 36 outputs"):
        load_model(ckpt)


def _renamed(desc):
    desc["tags"][0] = "renamed"


def _swapped(desc):
    desc["tags"][0], desc["tags"][1] = desc["tags"][1], desc["tags"][0]


@pytest.mark.parametrize("edit", [_renamed, _swapped], ids=["renamed", "reordered"])
def test_an_edited_tag_list_fails_its_checksum(ckpt, edit):
    before = load_model(ckpt).weights_sha256
    _rewrite(ckpt, lambda d, s: edit(d))  # weights untouched: weights_sha256 still matches
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*tag list was changed after "
                                              r"saving: sha256 of the 36 tag names"):
        load_model(ckpt)
    _rewrite(ckpt, lambda d, s: d.update(tags_sha256=tags_sha256(d["tags"])))
    assert load_model(ckpt).weights_sha256 == before  # the weights' identity is unchanged


def test_a_format_2_checkpoint_without_tag_checksum_is_refused(ckpt):
    _rewrite(ckpt, lambda d, s: d.update(tags_sha256=None))
    with pytest.raises(CheckpointError, match="tag list was changed"):
        load_model(ckpt)


def test_a_format_1_checkpoint_loads_with_a_warning_that_its_tags_are_unverified(ckpt):
    _rewrite(ckpt, lambda d, s: d.update(format_version=1, tags_sha256=None))
    with pytest.warns(UserWarning, match="no tag-list checksum"):
        model = load_model(ckpt)
    assert len(model.tags) == 36
    save_model(model, ckpt)  # re-saving records the checksum
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(ckpt).describe()["tags_sha256"] == tags_sha256(model.tags)


def test_the_bundled_default_verifies_its_tags_and_holds_no_absolute_paths():
    from safetensors import safe_open

    from rtagger.model.checkpoint import bundled_model_path

    path = bundled_model_path()
    assert path is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format 2: nothing left unverified
        model = load_model("default")
    with safe_open(str(path), "pt") as f:
        desc = json.loads(f.metadata()["rtagger"])
    assert desc["format_version"] == 2 and desc["tags_sha256"] == tags_sha256(model.tags)
    strings = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            strings.append(v)

    walk(desc)
    assert strings and not [s for s in strings if s.startswith("/") or s[1:3] == ":\\"]


def test_default_model_error_is_explicit_when_none_is_bundled(monkeypatch):
    import rtagger.model.checkpoint as ck

    monkeypatch.setattr(ck, "bundled_model_path", lambda: None)
    with pytest.raises(CheckpointError, match="no trained default model is bundled"):
        ck.load_model("default")


def test_safetensors_tools_see_a_torch_file_and_older_files_still_load(ckpt):
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "pt" and meta["rtagger_format"] == "rtagger-checkpoint"
    # before rtagger_format existed, rtagger's format name sat under `format`
    old = {"format": "rtagger-checkpoint", "rtagger": meta["rtagger"]}
    save_file(state, str(ckpt), metadata=old)
    assert load_model(ckpt).weights_sha256 == json.loads(meta["rtagger"])["weights_sha256"]
    save_file(state, str(ckpt), metadata={"format": "pt", "rtagger": meta["rtagger"]})
    with pytest.raises(CheckpointError, match="without rtagger metadata"):
        load_model(ckpt)
