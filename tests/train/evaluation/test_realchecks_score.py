"""Scoring on the real checks: labelled tracks only, paired bootstrap, the teachers' tag map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from rtagger.errors import ConfigError
from rtagger.train.data.manifest import Track, write_manifest
from rtagger.train.evaluation import realcheck
from rtagger.train.teachers.musicnn import MSD_TAGS, MTT_TAGS


def toy(n: int = 60, seed: int = 0) -> realcheck.Checks:
    """Three tags; a third of ``strings`` is unlabelled; ``harp`` has 2 positives only."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.4).astype(float)
    y[:, 2] = 0.0
    y[:2, 2] = 1.0
    known = np.ones_like(y, bool)
    known[::3, 1] = False
    y[~known] = 0.0
    return realcheck.Checks([f"t{i}" for i in range(n)], [""] * n, [60.0] * n,
                            ["piano", "strings", "harp"], y, known)


def system(name: str, kind: str, scores: np.ndarray) -> realcheck.System:
    return realcheck.System(name, kind, name, scores)


def test_points_are_sklearn_on_the_labelled_tracks_only():
    checks = toy()
    rng = np.random.default_rng(1)
    scores = np.clip(checks.y * 0.3 + rng.random(checks.y.shape) * 0.7, 0, 1)
    a = realcheck.score_systems(checks, [system("m", "rtagger", scores)], bootstrap=200)
    entry = a["systems"]["m"]["per_tag"]["strings"]
    mask = checks.known[:, 1]
    assert entry["roc_auc"] == pytest.approx(roc_auc_score(checks.y[mask, 1], scores[mask, 1]))
    assert entry["pr_auc"] == pytest.approx(
        average_precision_score(checks.y[mask, 1], scores[mask, 1]))
    assert entry["negatives"] + entry["positives"] == mask.sum()
    lo, hi = entry["roc_auc_95"]
    assert lo <= entry["roc_auc"] <= hi
    assert a["skipped_tags"].keys() == {"harp"} and a["scorable_tags"] == ["piano", "strings"]
    macro = a["systems"]["m"]["macro"]
    assert macro["roc_auc"] == pytest.approx(np.mean(
        [a["systems"]["m"]["per_tag"][t]["roc_auc"] for t in ("piano", "strings")]))
    # scores of unlabelled tracks change nothing, intervals included
    other = scores.copy()
    other[~mask, 1] = 1.0 - other[~mask, 1]
    b = realcheck.score_systems(checks, [system("m", "rtagger", other)], bootstrap=200)
    assert b["systems"] == a["systems"]
    json.dumps(a, allow_nan=False)  # the report is strict JSON


def test_paired_difference_of_model_and_teacher():
    checks = toy(n=80)
    rng = np.random.default_rng(2)
    good = np.where(checks.y > 0, 0.7, 0.3) + rng.normal(0, 0.1, checks.y.shape)
    noise = rng.random(checks.y.shape)
    blind = noise.copy()
    blind[:, 1] = np.nan  # a teacher that does not know strings
    report = realcheck.score_systems(checks, [system("student", "rtagger", good),
                                              system("same", "musicnn", good.copy()),
                                              system("noise", "musicnn", blind)],
                                     bootstrap=300, seed=3)
    same, noisy = report["comparisons"]
    assert same["teacher"] == "same" and same["tags"] == ["piano", "strings"]
    assert same["roc_auc"]["delta"] == 0.0 and same["roc_auc"]["delta_95"] == [0.0, 0.0]
    assert same["roc_auc"]["model_ahead"] == 0.0
    assert noisy["tags"] == ["piano"] and report["common_tags"] == ["piano"]
    d = noisy["roc_auc"]
    assert d["delta"] == pytest.approx(d["model"] - d["teacher"])
    assert d["delta_95"][0] > 0.2 and d["model_ahead"] == 1.0
    assert noisy["per_tag"]["piano"]["roc_auc_delta"] == pytest.approx(d["delta"])
    assert report["systems"]["noise"]["tags"] == ["piano"]
    again = realcheck.score_systems(checks, [system("student", "rtagger", good),
                                             system("noise", "musicnn", blind)],
                                    bootstrap=300, seed=3)
    assert again["comparisons"][0]["roc_auc"] == noisy["roc_auc"]  # same seed, same draws
    text = realcheck.report_markdown(report)
    assert "| student | noise | piano |" in text and "harp (2 positive" in text


def test_teacher_columns_follow_tags_v2():
    tags = ["piano", "guitar", "choir", "bass", "strings"]
    mtt = realcheck.teacher_columns("MTT_vgg", MTT_TAGS, tags)
    assert mtt["choir"] == [MTT_TAGS.index("choir"), MTT_TAGS.index("choral")]  # synonyms
    assert mtt["piano"] == [MTT_TAGS.index("piano")] and "bass" not in mtt
    msd = realcheck.teacher_columns("MSD_musicnn", MSD_TAGS, tags)
    assert msd == {"guitar": [MSD_TAGS.index("guitar")]}


def test_load_checks_reads_labels_and_refuses_other_manifests(tmp_path):
    tracks = [Track("a", "a.flac", ("piano",), "test", 30.0,
                    extra={"labels": {"piano": 1, "guitar": 0}}),
              Track("b", "b.flac", (), "test", 40.0, extra={"labels": {"piano": 0}})]
    checks = realcheck.load_checks(write_manifest(tmp_path / "m.jsonl", tracks))
    assert checks.tags == ["piano", "guitar"]  # vocabulary order
    assert checks.known.tolist() == [[True, True], [True, False]]
    assert checks.y.tolist() == [[1.0, 0.0], [0.0, 0.0]] and checks.counts(0) == (1, 1)
    plain = write_manifest(tmp_path / "p.jsonl", [Track("a", "a.flac", (), "test")])
    with pytest.raises(ConfigError, match="labels"):
        realcheck.load_checks(plain)
    odd = write_manifest(tmp_path / "o.jsonl", [Track("a", "a.flac", (), "test",
                                                      extra={"labels": {"kazoo": 1}})])
    with pytest.raises(ConfigError, match="vocabulary v2"):
        realcheck.load_checks(odd)
