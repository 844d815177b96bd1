"""Simulated DJ mixes and the segmentation evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_audio

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.audio.signals import music_like
from rtagger.model.checkpoint import save_model
from rtagger.train.data.manifest import Track
from rtagger.train.evaluation.mixes import (
    boundary_scores,
    build_mixes,
    evaluate_segmentation,
    read_mixes,
)


def test_boundary_scores_match_one_to_one_within_tolerance():
    s = boundary_scores([30.0, 60.0, 90.0], [31.0, 32.0, 70.0, 89.5], 120.0, 3.0)
    assert (s["hits"], s["false"], s["true"], s["found"]) == (2, 2, 3, 4)


@pytest.fixture()
def songs(tmp_path):
    tracks = []
    for i in range(3):
        p = write_audio(tmp_path / f"s{i}.flac", music_like(6.0, seed=i), SAMPLE_RATE, "flac",
                        "s16")
        tracks.append(Track(f"s{i}", str(p), (), "test", 6.0))
    return tracks


def test_mixes_have_true_boundaries_and_resume(songs, tmp_path):
    mixes = build_mixes(songs, tmp_path / "mixes", 2, tracks_per_mix=3, max_crossfade_s=2.0,
                        seed=1, progress=False)
    for m in mixes:
        audio = load_audio(m.path)
        assert len(m.boundaries_s) == 2 and len(m.track_ids) == 3
        assert abs(len(audio) / SAMPLE_RATE - m.duration_s) < 0.01
        assert 4.0 < m.boundaries_s[0] < 6.0 < m.boundaries_s[1] < 12.0
    again = build_mixes(songs, tmp_path / "mixes", 2, tracks_per_mix=3, max_crossfade_s=2.0,
                        seed=1, progress=False)
    assert again == mixes and len(read_mixes(tmp_path / "mixes")) == 2


def test_segmentation_evaluation_runs_the_live_session(songs, tmp_path, debug_model):
    mixes = build_mixes(songs, tmp_path / "mixes", 1, tracks_per_mix=3, seed=0,
                        progress=False)
    ckpt = save_model(debug_model, tmp_path / "m.safetensors")
    r = evaluate_segmentation(ckpt, mixes, hop_s=1.0, progress=False)
    assert r["true"] == 2 and r["mixes"] == 1
    assert 0.0 <= r["f_measure"] <= 1.0 and np.isfinite(r["false_per_hour"])


def test_a_sweep_tags_once_and_scores_every_setting(songs, tmp_path, debug_model):
    from rtagger.pipeline.session import SegmenterConfig
    from rtagger.train.evaluation.mixes import sweep_segmentation

    mixes = build_mixes(songs, tmp_path / "mixes", 1, tracks_per_mix=3, seed=0,
                        progress=False)
    ckpt = save_model(debug_model, tmp_path / "m.safetensors")
    r = sweep_segmentation(ckpt, mixes, [-1.0, 2.1], [1, 2], hop_s=1.0,
                           base=SegmenterConfig(min_segment_s=1.0), progress=False)
    grid = {(g["threshold"], g["confirm"]): g for g in r["grid"]}
    assert set(grid) == {(-1.0, 1), (-1.0, 2), (2.1, 1), (2.1, 2)}
    assert grid[(2.1, 1)]["found"] == 0  # no window is ever that far: no boundary
    assert grid[(-1.0, 1)]["found"] > 0  # every window is novel: a boundary when allowed
    assert r["best"]["f_measure"] == max(g["f_measure"] for g in r["grid"])
