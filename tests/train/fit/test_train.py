"""Training stages on a toy labelled set: learning, resume after a kill, pseudo-labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import toy_song, write_audio

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import load_model
from rtagger.train.data.cache import build_cache
from rtagger.train.data.manifest import Track, write_manifest
from rtagger.train.fit.loop import train
from rtagger.train.fit.pseudo import pseudo_label
from rtagger.train.fit.recipe import load_recipe, recipe_from_dict
from rtagger.train.fit.tasks import AggregatorTask, TaggerTask


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    splits = {"train": 8, "valid": 4}
    for split, n in splits.items():
        tracks = []
        for i in range(n):
            kind = "piano" if i % 2 == 0 else "drums"
            p = write_audio(d / f"{split}-{i}.flac", toy_song(kind, 8.0, hash((split, i)) % 999),
                            SAMPLE_RATE, "flac", "s16")
            tracks.append(Track(f"{split}-{i}", str(p), (kind,), split, 8.0))
        write_manifest(d / f"{split}.jsonl", tracks)
    report = build_cache([t for s in splits for t in _read(d / f"{s}.jsonl")], d / "cache",
                         progress=False)
    assert report.n_failed == 0
    return d


def _read(path):
    from rtagger.train.data.manifest import read_manifest

    return read_manifest(path)


def _recipe(toy, **over):
    """A tiny recipe on the toy set; sections in ``over`` update the defaults."""
    raw = {
        "name": "toy", "stage": "tagger", "seed": 0,
        "model": {"size": "debug", "dropout": 0.0},
        "data": {"labelled": str(toy / "train.jsonl"), "valid": str(toy / "valid.jsonl"),
                 "cache": str(toy / "cache"), "valid_windows_per_song": 2},
        "optim": {"batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": 12},
        "eval": {"every_steps": 4, "patience": 10},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe_from_dict(raw)


def test_tagger_learns_the_toy_tags_and_writes_a_checkpoint(toy, tmp_path):
    r = _recipe(toy, optim={"batch_size": 8, "max_steps": 30}, eval={"every_steps": 15})
    best = train(TaggerTask(r), r, tmp_path / "run", progress=False)
    model = load_model(best)
    assert model.trained and model.name == "toy"
    assert model.metrics["macro_pr_auc"] > 0.9  # separable toy data
    assert model.recipe["name"] == "toy"
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in hist["history"]] == [15, 30]


def test_a_killed_run_resumes_to_the_same_weights(toy, tmp_path, monkeypatch):
    r = _recipe(toy)
    straight = load_model(train(TaggerTask(r), r, tmp_path / "a", progress=False))

    task = TaggerTask(r)
    calls = {"n": 0}
    real = task.batch

    def dying(rng, n):
        calls["n"] += 1
        if calls["n"] == 7:  # after the step-4 checkpoint, before step 8
            raise KeyboardInterrupt
        return real(rng, n)

    monkeypatch.setattr(task, "batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train(task, r, tmp_path / "b", progress=False)
    snap = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert snap["state"]["step"] == 4
    resumed = load_model(train(TaggerTask(r), r, tmp_path / "b", progress=False))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_resume_refuses_a_different_recipe(toy, tmp_path):
    r = _recipe(toy, optim={"max_steps": 2}, eval={"every_steps": 2})
    train(TaggerTask(r), r, tmp_path / "run", progress=False)
    other = _recipe(toy, optim={"max_steps": 2, "lr": 1e-3}, eval={"every_steps": 2})
    with pytest.raises(ConfigError, match="another recipe"):
        train(TaggerTask(other), other, tmp_path / "run", progress=False)


def test_pseudo_labels_resume_and_feed_a_noisy_student(toy, tmp_path):
    r = _recipe(toy, optim={"max_steps": 4})
    teacher = train(TaggerTask(r), r, tmp_path / "teacher", progress=False)
    pool = _read(toy / "valid.jsonl")  # labels are ignored by pseudo-labelling
    rep = pseudo_label(teacher, pool, toy / "cache", tmp_path / "pseudo", hop_s=2.0,
                       progress=False)
    assert rep.shards_written == 1 and rep.windows == 4 * 3
    again = pseudo_label(teacher, pool, toy / "cache", tmp_path / "pseudo", hop_s=2.0,
                         progress=False)
    assert again.shards_written == 0 and again.shards_skipped == 1
    student = _recipe(toy, name="student", model={"size": "debug", "drop_path": 0.1},
                      data={"pseudo": [str(tmp_path / "pseudo")], "pseudo_ratio": 0.5},
                      optim={"max_steps": 4, "batch_size": 8},
                      augment={"pitch_p": 0.0, "noise_p": 0.5, "time_mask_p": 0.5})
    task = TaggerTask(student)
    waves, targets = task.batch(np.random.default_rng(0), 8)
    assert waves.shape == (8, 59049)
    soft = targets[4:].numpy()
    assert ((soft > 0) & (soft < 1)).any()  # teacher probabilities, not hard labels
    best = train(task, student, tmp_path / "student", progress=False)
    assert load_model(best).name == "student"


def test_aggregator_stage_trains_on_frozen_embeddings(toy, tmp_path):
    r = _recipe(toy, optim={"max_steps": 4})
    tagger = train(TaggerTask(r), r, tmp_path / "tagger", progress=False)
    pseudo_label(tagger, _read(toy / "valid.jsonl"), toy / "cache", tmp_path / "pseudo",
                 progress=False)
    ar = _recipe(toy, name="agg", stage="aggregator",
                 model={"size": "debug", "init": str(tagger)},
                 data={"pseudo": [str(tmp_path / "pseudo")], "pseudo_ratio": 0.5},
                 aggregator={"max_windows": 4, "hop_s": 1.0},
                 optim={"max_steps": 8, "lr": 1e-3})
    task = AggregatorTask(ar, tmp_path / "agg")
    assert len(task.pseudo_seqs) == 4  # unlabelled songs with song-level soft targets
    (emb, valid), y = task.batch(np.random.default_rng(0), 6)
    assert emb.shape[1] <= 4 and valid.any(1).all()
    soft = y[3:].numpy()
    assert ((soft > 0) & (soft < 1)).all()
    best = train(task, ar, tmp_path / "agg", progress=False)
    model = load_model(best)
    assert model.aggregator is not None and model.aggregator.cfg.max_windows == 4
    assert "aggregator_macro_pr_auc" in model.metrics
    # the tagger inside is the frozen one, unchanged
    base = load_model(tagger)
    for a, b in zip(base.tagger.state_dict().values(), model.tagger.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_recipe_errors_are_specific(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\n[optim]\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rate'\]"):
        load_recipe(p)
    p.write_text('name = "x"\n[data]\npseudo_ratio = 0.5\n')
    with pytest.raises(ConfigError, match=r"needs data\.pseudo"):
        load_recipe(p)
    p.write_text('name = "x"\n')
    r = load_recipe(p, ["optim.lr=0.01", "model.size=large"])
    with pytest.raises(ConfigError, match=r"model\.size: model size 'teacher' is now called"):
        load_recipe(p, ["model.size=teacher"])
    assert r.optim.lr == 0.01 and r.model.size == "large"
    with pytest.raises(ConfigError, match=r"no such file"):
        load_recipe(tmp_path / "missing.toml")


def test_a_tagger_warm_starts_from_a_checkpoint_of_the_same_shape(toy, tmp_path):
    r = _recipe(toy, optim={"max_steps": 4})
    first = train(TaggerTask(r), r, tmp_path / "round0", progress=False)
    nxt = _recipe(toy, name="round1", model={"size": "debug", "init": str(first),
                                             "drop_path": 0.1})
    task = TaggerTask(nxt)
    for (k, a), b in zip(load_model(first).tagger.state_dict().items(),
                         task.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    wider = _recipe(toy, name="wider", model={"size": "debug", "init": str(first),
                                              "arch": {"d_model": 64}})
    with pytest.raises(ConfigError, match=r"differs in \['d_model'\]"):
        TaggerTask(wider)


def test_the_recipe_name_does_not_change_its_digest(toy):
    assert _recipe(toy).digest() == _recipe(toy, name="renamed").digest()
    assert _recipe(toy).digest() != _recipe(toy, seed=1).digest()


def test_every_shipped_recipe_and_pipeline_loads():
    from pathlib import Path

    from rtagger.train.pipeline import load_pipeline

    root = Path(__file__).resolve().parents[3] / "train" / "recipes"
    recipes = [p for p in root.rglob("*.toml") if not p.name.startswith("pipeline")]
    assert len(recipes) >= 14
    for p in recipes:
        assert load_recipe(p).name
    for p in root.glob("pipeline*.toml"):
        for step in load_pipeline(p):
            if step["run"] == "train":
                load_recipe(step["recipe"], step["set"])


def _pipeline(tmp_path, step: str, top: str = "") -> object:
    (tmp_path / "r.toml").write_text('name = "r"\n')
    p = tmp_path / "p.toml"
    p.write_text(f"{top}\n[[steps]]\n{step}\n")
    return p


@pytest.mark.parametrize(("step", "key", "kind"), [
    ('name = "t"\nrun = "train"\nrecipe = "r.toml"\nout = "o"\nsets = ["optim.lr=1"]',
     "sets", "train"),
    ('name = "s"\nrun = "synth"\nsplit = "train"\nsongs = 2\nout = "o"\nmax_second = 9.0',
     "max_second", "synth"),
    ('name = "p"\nrun = "pseudo"\nteacher = "t"\nmanifests = []\nout = "o"\nhop = 1.0',
     "hop", "pseudo"),
    ('name = "e"\nrun = "evaluate"\nmodel = "m"\nmanifest = "x"\nout = "o"\ncahce = "c"',
     "cahce", "evaluate"),
])
def test_an_unknown_pipeline_step_key_names_the_key_the_step_and_the_allowed_keys(
        tmp_path, step, key, kind):
    from rtagger.train.pipeline import STEP_KEYS, load_pipeline

    p = _pipeline(tmp_path, step)
    with pytest.raises(ConfigError) as e:
        load_pipeline(p)
    msg = str(e.value)
    assert f"unknown keys ['{key}']" in msg and f"(run = '{kind}')" in msg
    assert "step '" in msg and str(p) in msg
    required, optional = STEP_KEYS[kind]
    assert all(k in msg.split("allowed:")[1] for k in required | optional)


def test_pipeline_top_level_nested_and_required_keys_are_checked(tmp_path):
    from rtagger.train.pipeline import load_pipeline

    ok = 'name = "t"\nrun = "train"\nrecipe = "r.toml"\nout = "o"'
    with pytest.raises(ConfigError, match=r"unknown keys \['sett'\]; allowed: \['set', 'steps'\]"):
        load_pipeline(_pipeline(tmp_path, ok, top='sett = ["optim.lr=1"]'))
    with pytest.raises(ConfigError, match=r"step 't' \(run = 'train'\): missing required keys "
                                          r"\['out'\]"):
        load_pipeline(_pipeline(tmp_path, 'name = "t"\nrun = "train"\nrecipe = "r.toml"'))
    pseudo = ('name = "p"\nrun = "pseudo"\nteacher = "t"\nmanifests = []\nout = "o"\n'
              'exclude_labelled = { manifest = "m", fraction = 0.5, sed = 1 }')
    with pytest.raises(ConfigError, match=r"exclude_labelled: unknown keys \['sed'\]; allowed: "
                                          r"\['fraction', 'manifest', 'seed'\]"):
        load_pipeline(_pipeline(tmp_path, pseudo))
    # a typo in a train step's overrides is found when the pipeline is read, not hours later
    with pytest.raises(ConfigError, match=r"unknown keys \['lrr'\]"):
        load_pipeline(_pipeline(tmp_path, ok + '\nset = ["optim.lrr=1"]'))
    with pytest.raises(ConfigError, match=r"unknown \[augment\] keys: pitch_pp \(did you mean "
                                          r"pitch_p\?\)"):
        load_pipeline(_pipeline(tmp_path, ok, top='set = ["augment.pitch_pp=0.0"]'))
    steps = load_pipeline(_pipeline(tmp_path, ok, top='set = ["optim.lr=0.01"]'))
    assert steps[0]["set"] == ["optim.lr=0.01"] and steps[0]["out"] == "o"


def test_recipe_typos_in_arch_augment_and_top_level_keys_are_errors(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\n[model.arch]\nd_modle = 64\n')
    with pytest.raises(ConfigError, match=r"\[model\.arch\]: unknown keys \['d_modle'\] for the "
                                          r"tagger.*allowed: \[.*'d_model'"):
        load_recipe(p)
    p.write_text('name = "x"\nstage = "aggregator"\n[model.arch]\npooling = "cls"\n')
    with pytest.raises(ConfigError, match=r"unknown keys \['pooling'\] for the aggregator stage"):
        load_recipe(p)  # a tagger field is not an aggregator field
    p.write_text('name = "x"\n[augment]\nenabled = false\nnoise_pp = 0.5\n')
    with pytest.raises(ConfigError, match=r"r\.toml: unknown \[augment\] keys: noise_pp"):
        load_recipe(p)  # checked even when augmentation is off
    p.write_text('name = "x"\nsede = 1\n')
    with pytest.raises(ConfigError, match=r"unknown keys or sections \['sede'\]; allowed: "
                                          r"\['aggregator', 'augment', 'base'"):
        load_recipe(p)
    p.write_text('name = "x"\n[optim]\nlr = 0.1\n[model.arch]\nd_model = 64\n')
    assert load_recipe(p).model.arch == {"d_model": 64}


def test_a_checkpoint_records_the_recipe_without_this_machines_folders(toy, tmp_path):
    from dataclasses import replace
    from pathlib import Path

    from rtagger.train.fit.recipe import portable_source

    shipped = Path(__file__).resolve().parents[3] / "train" / "recipes" / "teacher.toml"
    assert portable_source(str(shipped)) == "train/recipes/teacher.toml"
    assert portable_source("train/recipes/teacher.toml") == "train/recipes/teacher.toml"
    r = replace(_recipe(toy, optim={"max_steps": 1}, eval={"every_steps": 1}),
                source=str(tmp_path / "mine.toml"))  # as when read from an absolute path
    model = load_model(train(TaggerTask(r), r, tmp_path / "run", progress=False))
    assert model.recipe["source"] == "mine.toml"


def test_the_same_recipe_starts_from_the_same_weights_in_any_process(toy):
    # torch seeds itself randomly per process; the initial weights must come from the recipe
    r = _recipe(toy)
    a = TaggerTask(r).model.state_dict()
    torch.manual_seed(12345)  # another global RNG state, as in another process
    state = torch.random.get_rng_state()
    b = TaggerTask(r).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = TaggerTask(_recipe(toy, seed=1)).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_masked_bce_ignores_missing_targets_and_equals_bce_without_them():
    import torch

    from rtagger.train.fit.loop import masked_bce

    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], requires_grad=True)
    full = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, full)
    assert torch.equal(masked_bce(logits, full), plain)
    partial = full.clone()
    partial[0, 1] = partial[1, 2] = float("nan")
    loss = masked_bce(logits, partial)
    keep = ~torch.isnan(partial)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], full[keep])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0 and logits.grad[0, 0] != 0


def test_a_tonal_aggregator_learns_on_chroma_and_tempo_and_cut_songs_get_prefix_tags(toy,
                                                                                 tmp_path):
    r = _recipe(toy, optim={"max_steps": 4})
    tagger = train(TaggerTask(r), r, tmp_path / "tagger", progress=False)
    ar = _recipe(toy, name="agg", stage="aggregator",
                 model={"size": "debug", "init": str(tagger), "arch": {"tempo_split": True}},
                 aggregator={"max_windows": 4, "hop_s": 1.0, "chroma": True, "tempo": True},
                 optim={"max_steps": 4, "lr": 1e-3})
    task = AggregatorTask(ar, tmp_path / "agg")
    d_model = task.base.tagger.cfg.d_model
    assert task.train_seqs[0][0].shape[1] == d_model + 12 + 16  # chroma, then tempo
    # A song whose drums come in at 4 s: its first windows do not have them yet.
    song = Track("s", "s.flac", ("drums",), "train", 10.0, extra={"timeline": {
        "duration": 10.0, "instruments": {"drums": [[4.0, 10.0]]}, "keys": [], "tempos": [],
        "events": {}}})
    y = np.zeros(len(task.tags), np.float32)
    y[task.tags.index("drums")] = 1.0
    assert task._prefix_target(song, y, 2)[task.tags.index("drums")] == 0.0  # 0-4.7 s
    assert task._prefix_target(song, y, 4)[task.tags.index("drums")] == 1.0  # 0-6.7 s
    best = train(task, ar, tmp_path / "agg", progress=False)
    model = load_model(best)
    assert model.tagger.cfg.chroma_bins == 12 and model.aggregator.cfg.chroma_bins == 12
    assert model.tagger.cfg.tempo_bins == 16 and model.aggregator.cfg.tempo_bins == 16
    assert model.aggregator.cfg.tempo_split and model.aggregator.split_head.weight.shape[1] == 1
    assert model.aggregator.cfg.d_in == d_model + 12 + 16
