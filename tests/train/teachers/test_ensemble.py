"""The multi-source teacher ensemble (v1 tagger + musicnn) and a student on vocabulary v2.

Runs with the MTT_vgg teacher bundled for CI (no TensorFlow, no conversion needed).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_song, write_audio

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.audio.signals import music_like, music_windows
from rtagger.model.checkpoint import build_untrained, load_model, save_model
from rtagger.model.vocab import tags_v1, tags_v2
from rtagger.train.data.cache import build_cache
from rtagger.train.data.manifest import Track, write_manifest
from rtagger.train.data.windows import read_shard
from rtagger.train.fit.loop import train
from rtagger.train.fit.pseudo import pseudo_label
from rtagger.train.fit.recipe import recipe_from_dict
from rtagger.train.fit.tasks import TaggerTask
from rtagger.train.teachers.ensemble import load_ensemble
from rtagger.train.teachers.musicnn import load_teacher

MTT_VGG = Path(str(resources.files("rtagger.train.teachers").joinpath("MTT_vgg.safetensors")))


@pytest.fixture(scope="module")
def v1_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("v1")
    return save_model(build_untrained("debug", seed=3, with_aggregator=False),
                      d / "v1.safetensors")


def test_each_v2_tag_comes_from_the_members_its_sources_name(v1_teacher):
    ens = load_ensemble(v1_teacher, [MTT_VGG])
    waves = torch.from_numpy(music_windows(3, seed=4))
    out = ens(waves)
    tags = tags_v2()
    assert out.shape == (3, len(tags)) and ens.tags == tags
    col = {t: out[:, i] for i, t in enumerate(tags)}
    # MTT synonyms merge by their maximum over the window's two 3 s patches' mean
    vgg = load_teacher(MTT_VGG)
    with torch.inference_mode():
        p = vgg(waves, hop_frames=44).mean(1).numpy()
    names = ["female", "woman", "female vocal", "female voice"]
    expected = p[:, [vgg.tags.index(n) for n in names]].max(1)
    np.testing.assert_allclose(col["female_vocals"], expected, rtol=1e-6)
    # a synth-only tag comes from the v1 tagger; an MSD-only tag has no member: NaN
    v1 = load_model(v1_teacher)
    with torch.inference_mode():
        v1p = torch.sigmoid(v1.tagger(waves)[0]).numpy()
    np.testing.assert_allclose(col["latin"], v1p[:, tags_v1().index("latin")], rtol=1e-6)
    assert np.isnan(col["80s"]).all() and not np.isnan(col["piano"]).any()
    assert "80s" not in ens.labelled_tags and len(ens.members) == 2


def test_a_student_learns_vocabulary_v2_from_labels_and_the_ensemble(v1_teacher, tmp_path):
    d = tmp_path
    tracks = {}
    for split, n in (("train", 4), ("valid", 2)):
        tracks[split] = []
        for i in range(n):
            kind = "piano" if i % 2 == 0 else "drums"
            p = write_audio(d / f"{split}-{i}.flac", toy_song(kind, 5.0, 10 * i + len(split)),
                            SAMPLE_RATE, "flac", "s16")
            tracks[split].append(Track(f"{split}-{i}", str(p), (kind,), split, 5.0))
        write_manifest(d / f"{split}.jsonl", tracks[split])
    pool = [Track(f"u{i}", str(write_audio(d / f"u{i}.flac", music_like(5.0, seed=i),
                                           SAMPLE_RATE, "flac", "s16")), (), "unlabelled", 5.0)
            for i in range(2)]
    everything = [*tracks["train"], *tracks["valid"], *pool]
    assert build_cache(everything, d / "cache", progress=False).n_failed == 0
    for name, group in (("pool", pool), ("labelled", tracks["train"])):
        pseudo_label(v1_teacher, group, d / "cache", d / name, hop_s=1.0, progress=False,
                     musicnn=(MTT_VGG,))
    shard = read_shard(next((d / "pool").glob("shard-*.npz")))
    assert shard.meta["tags"] == tags_v2() and len(shard.meta["members"]) == 2
    assert np.isnan(shard.probs[:, tags_v2().index("80s")]).all()
    r = recipe_from_dict({
        "name": "v2-student", "stage": "tagger", "seed": 0,
        "model": {"size": "debug", "dropout": 0.0},
        "data": {"labelled": str(d / "train.jsonl"), "valid": str(d / "valid.jsonl"),
                 "cache": str(d / "cache"), "valid_windows_per_song": 2, "vocabulary": "v2",
                 "labelled_pseudo": [str(d / "labelled")], "pseudo": [str(d / "pool")],
                 "pseudo_ratio": 0.5},
        "optim": {"batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": 6},
        "eval": {"every_steps": 3, "patience": 10},
    })
    task = TaggerTask(r)
    y = task.labelled.targets
    v2 = tags_v2()
    assert (y[:, v2.index("piano")] == [1, 0, 1, 0]).all()  # the songs' own labels
    assert (y[:, v2.index("major")] == 0).all()  # v1 decides it: absent, not unknown
    assert not np.isnan(y[:, v2.index("female_vocals")]).any()  # the teacher's song mean
    assert np.isnan(y[:, v2.index("80s")]).all()  # nobody labels it: masked
    model = load_model(train(task, r, d / "run", progress=False))
    assert model.tags == v2 and model.describe()["vocabulary"] == "v2"
    assert model.tag_groups["female_vocals"] == "vocals"
    assert np.isfinite(model.metrics["macro_pr_auc"])
