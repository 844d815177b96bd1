"""Fidelity to the teachers (train/evaluation/fidelity.py): the figures on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from rtagger.errors import ConfigError
from rtagger.model.vocab import tags_v2
from rtagger.train.evaluation.fidelity import fidelity_markdown, fidelity_metrics


def _teacher(n: int = 40, k: int = 6, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, (n, k)), tags_v2()[-k:]


def test_a_student_equal_to_its_teachers_has_r_one_and_no_error():
    t, tags = _teacher()
    rep = fidelity_metrics(t.copy(), t, tags, n_boot=50)
    assert rep["tracks"] == 40 and rep["macro"]["tags"] == 6
    assert rep["macro"]["pearson_r"] == pytest.approx(1.0)
    assert rep["macro"]["mae"] == pytest.approx(0.0)
    assert rep["top5_overlap"] == pytest.approx(1.0)
    assert rep["macro"]["mae_constant"] > 0.2  # uniform targets: mean |t - 0.5| = 0.25


def test_a_constant_student_is_no_better_than_the_constant_reference():
    t, tags = _teacher()
    s = np.tile(t.mean(axis=0), (len(t), 1))
    rep = fidelity_metrics(s, t, tags, n_boot=50)
    assert rep["macro"]["pearson_r"] is None or np.isnan(rep["macro"]["pearson_r"])
    assert rep["macro"]["mae"] == pytest.approx(rep["macro"]["mae_constant"])
    assert all(v["pearson_r"] is None for v in rep["per_tag"].values())


def test_a_noisy_student_sits_between_and_its_interval_holds_the_estimate():
    t, tags = _teacher(n=200)
    rng = np.random.default_rng(1)
    s = np.clip(t + rng.normal(0, 0.2, t.shape), 0, 1)
    rep = fidelity_metrics(s, t, tags, n_boot=200)
    m = rep["macro"]
    assert 0.6 < m["pearson_r"] < 0.95
    assert m["pearson_r_ci"][0] <= m["pearson_r"] <= m["pearson_r_ci"][1]
    assert m["mae"] < m["mae_constant"]
    assert set(rep["groups"]) <= {"genre", "mood", "vocals", "instrument", "era", "tempo",
                                  "mode", "structure", "other"}
    table = fidelity_markdown({"model": {"name": "m"}, **rep})
    assert table.count("\n| ") == 1 + len(rep["groups"]) + 1  # header rule, all, groups


def test_too_few_tracks_and_mismatched_shapes_are_refused():
    t, tags = _teacher(n=2)
    with pytest.raises(ConfigError, match="at least 3"):
        fidelity_metrics(t, t, tags)
    t, tags = _teacher()
    with pytest.raises(ValueError, match="do not match"):
        fidelity_metrics(t[:, :3], t, tags)
