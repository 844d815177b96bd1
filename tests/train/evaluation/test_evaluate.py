"""Evaluation library: hand-computed AUCs, skipped tags, groups, reports, tables, bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from rtagger.errors import ConfigError
from rtagger.model.vocab import tag_groups_v1, tags_v1
from rtagger.train.evaluation.compare import Row, paired_delta
from rtagger.train.evaluation.evaluate import (
    bootstrap_ci,
    compare_table,
    evaluate_levels,
    tag_metrics,
    weighted_scores,
    write_report,
)

TAGS = ["rock", "jazz", "piano", "drums"]
GROUPS = {"rock": "genre", "jazz": "genre", "piano": "instrument", "drums": "instrument"}


def small_case() -> tuple[np.ndarray, np.ndarray]:
    """4 items x 4 tags with hand-computed metrics (see test_hand_computed)."""
    y = np.array([[0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1], [1, 0, 0, 0]])
    s = np.array([[0.1, 0.9, 0.2, 0.5], [0.4, 0.1, 0.3, 0.5],
                  [0.35, 0.8, 0.4, 0.5], [0.8, 0.2, 0.1, 0.5]])
    return y, s


def synthetic(n: int = 200, n_tags: int = 6, seed: int = 0, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_tags)) < 0.3).astype(int)
    return y, y + noise * rng.standard_normal((n, n_tags))


def test_hand_computed() -> None:
    y, s = small_case()
    r = tag_metrics(y, s, TAGS, GROUPS)
    # rock: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> 3 of 4 pairs ordered;
    # ranked 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 1/2 * 1 + 1/2 * 2/3
    assert r["per_tag"]["rock"]["roc_auc"] == pytest.approx(0.75)
    assert r["per_tag"]["rock"]["pr_auc"] == pytest.approx(5 / 6)
    # jazz: perfectly ranked
    assert r["per_tag"]["jazz"]["roc_auc"] == pytest.approx(1.0)
    assert r["per_tag"]["jazz"]["pr_auc"] == pytest.approx(1.0)
    # drums: all scores tied -> one threshold: AUC 1/2, AP = prevalence 3/4
    assert r["per_tag"]["drums"]["roc_auc"] == pytest.approx(0.5)
    assert r["per_tag"]["drums"]["pr_auc"] == pytest.approx(0.75)
    assert [r["per_tag"][t]["positives"] for t in TAGS] == [2, 2, 0, 3]
    assert r["n_items"] == 4 and r["n_tags"] == 4
    assert r["micro"]["pr_auc"] == pytest.approx(average_precision_score(y.ravel(), s.ravel()))
    assert r["micro"]["roc_auc"] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()))


def test_tag_without_positives_is_skipped_and_reported() -> None:
    y, s = small_case()
    r = tag_metrics(y, s, TAGS, GROUPS)
    assert r["skipped"] == {"piano": "no positives"}
    assert r["per_tag"]["piano"]["roc_auc"] is None and r["per_tag"]["piano"]["pr_auc"] is None
    assert r["macro"]["n_tags"] == 3 and r["macro"]["skipped"] == ["piano"]
    assert r["macro"]["roc_auc"] == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    assert r["macro"]["pr_auc"] == pytest.approx((5 / 6 + 1.0 + 0.75) / 3)
    assert r["groups"]["instrument"]["skipped"] == ["piano"]
    y[:, 3] = 1  # drums now has no negatives
    r = tag_metrics(y, s, TAGS, GROUPS)
    assert r["skipped"] == {"piano": "no positives", "drums": "no negatives"}
    assert r["groups"]["instrument"] == {"roc_auc": None, "pr_auc": None, "pr_auc_chance": None,
                                         "n_tags": 0, "skipped": ["piano", "drums"]}
    json.dumps(r, allow_nan=False)  # None, never NaN


def test_group_averages() -> None:
    y, s = small_case()
    r = tag_metrics(y, s, TAGS, GROUPS)
    assert list(r["groups"]) == ["genre", "instrument"]
    assert r["groups"]["genre"]["roc_auc"] == pytest.approx((0.75 + 1.0) / 2)
    assert r["groups"]["genre"]["pr_auc"] == pytest.approx((5 / 6 + 1.0) / 2)
    assert r["groups"]["instrument"]["roc_auc"] == pytest.approx(0.5)
    assert r["groups"]["genre"]["pr_auc_chance"] == pytest.approx(0.5)
    assert tag_metrics(y, s, TAGS)["groups"] == {}


def test_v1_vocabulary_groups_and_curves() -> None:
    tags = tags_v1()
    y, s = synthetic(n=120, n_tags=len(tags))
    r = tag_metrics(y, s, tags, tag_groups_v1())
    assert list(r["groups"]) == ["genre", "instrument", "tempo", "mode", "structure"]
    assert sum(g["n_tags"] for g in r["groups"].values()) == len(tags)
    curves = r["curves"]
    assert set(curves["roc"]) == {"macro", *r["groups"]} == set(curves["pr"])
    roc = np.array(curves["roc"]["macro"])
    assert roc[0] >= 0 and roc[-1] == pytest.approx(1.0) and np.all(np.diff(roc) >= -1e-9)
    assert np.all((np.array(curves["pr"]["macro"]) >= 0) & (np.array(curves["pr"]["macro"]) <= 1))


def test_invalid_input_raises() -> None:
    y, s = small_case()
    with pytest.raises(ValueError, match="non-finite"):
        tag_metrics(y, np.where(s > 0.7, np.nan, s), TAGS)
    with pytest.raises(ValueError, match="0 and 1"):
        tag_metrics(y * 2, s, TAGS)
    with pytest.raises(ValueError, match="tags"):
        tag_metrics(y, s, TAGS[:3])
    with pytest.raises(ValueError, match="without a group"):
        tag_metrics(y, s, TAGS, {"rock": "genre"})


def test_evaluate_levels_keys() -> None:
    yw, sw = synthetic(n=80, n_tags=4, seed=1)
    ys, ss = synthetic(n=30, n_tags=4, seed=2)
    res = evaluate_levels(yw, sw, ys, {"mean": ss, "aggregator": ss * 2}, TAGS, GROUPS)
    assert list(res) == ["window", "song/mean", "song/aggregator"]
    assert res["window"]["n_items"] == 80 and res["song/mean"]["n_items"] == 30
    assert res["song/mean"]["macro"]["roc_auc"] == pytest.approx(
        res["song/aggregator"]["macro"]["roc_auc"])  # a monotone rescale changes nothing
    assert list(evaluate_levels(None, None, ys, {"mean": ss}, TAGS)) == ["song/mean"]
    with pytest.raises(ValueError):
        evaluate_levels(yw, None, ys, {"mean": ss}, TAGS)


def test_write_report(tmp_path) -> None:
    yw, sw = synthetic(n=80, n_tags=4, seed=1)
    ys, ss = synthetic(n=30, n_tags=4, seed=2)
    ys[:, 2] = 0  # piano: no positive song
    res = evaluate_levels(yw, sw, ys, {"mean": ss, "aggregator": ss}, TAGS, GROUPS)
    paths = write_report(res, tmp_path / "out", "tiny | test")
    names = sorted(p.name for p in paths)
    assert names == ["curves_song_aggregator.png", "curves_song_mean.png", "curves_window.png",
                     "metrics.json", "metrics.md"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temp files left
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["levels"]["song/mean"]["skipped"] == {"piano": "no positives"}
    assert data["levels"]["window"]["macro"]["pr_auc"] == pytest.approx(
        res["window"]["macro"]["pr_auc"])
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert ("| group | window ROC-AUC | window PR-AUC | song/mean ROC-AUC | song/mean PR-AUC "
            "| song/aggregator ROC-AUC | song/aggregator PR-AUC |") in md
    assert "| macro |" in md and "| genre |" in md and "| chance | 0.500 |" in md
    assert "| piano | instrument |" in md
    assert "piano (no positives)" in md
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_all_tags_skipped(tmp_path) -> None:
    y = np.zeros((5, 4), int)
    res = {"song/mean": tag_metrics(y, np.zeros((5, 4)), TAGS, GROUPS)}
    assert res["song/mean"]["macro"]["pr_auc"] is None
    assert res["song/mean"]["micro"]["pr_auc"] is None
    paths = write_report(res, tmp_path, "empty")
    assert [p.name for p in paths] == ["metrics.json", "metrics.md"]
    assert "| macro | n/a | n/a |" in (tmp_path / "metrics.md").read_text()


def test_compare_table() -> None:
    rows = [
        {"model": "teacher", "macro_pr_auc": 0.5, "macro_roc_auc": 0.91234,
         "macs_per_window": 2_340_000_000, "cpu_ms_per_window": 41.27, "params": 12_500_000},
        {"model": "student|s", "macro_pr_auc": 0.45, "macro_roc_auc": 0.9,
         "macs_per_window": 120_000_000, "cpu_ms_per_window": 1.234, "params": 800_000},
        {"model": "mean-only", "macro_pr_auc": None, "macro_roc_auc": 0.8,
         "macro_pr_auc_ci": (0.41, 0.47)},
    ]
    lines = compare_table(rows).splitlines()
    assert lines[0] == ("| model | macro_pr_auc | % of teacher | macro_roc_auc | macs_per_window "
                        "| cpu_ms_per_window | params | macro_pr_auc_ci |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| teacher | 0.500 | 100.0% | 0.912 | 2.34 G | 41.3 | 12.5 M | - |"
    assert lines[3] == "| student\\|s | 0.450 | 90.0% | 0.900 | 120 M | 1.23 | 800 k | - |"
    assert lines[4] == "| mean-only | - | - | 0.800 | - | - | - | [0.410, 0.470] |"
    assert "% of student\\|s" in compare_table(rows, reference="student|s")
    assert "| 111.1% |" in compare_table(rows, reference="student|s")
    with pytest.raises(ValueError, match="reference"):
        compare_table(rows, reference="nobody")


def testweighted_scores_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 25)
    s = rng.integers(0, 6, 25).astype(float)  # many ties
    w = rng.integers(0, 3, (4, 25)).astype(float)  # bootstrap counts, zeros included
    got = weighted_scores(y, s, w)
    for b in range(4):
        assert got["roc_auc"][b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]))
        assert got["pr_auc"][b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]))


@pytest.mark.parametrize("metric", ["pr_auc", "roc_auc"])
def test_bootstrap_ci(metric: str) -> None:
    y, s = synthetic(n=150, n_tags=5, seed=4)
    y[:, 4] = 0  # unscorable tag: ignored, as in the point estimate
    point = tag_metrics(y, s, [f"t{i}" for i in range(5)])["macro"][metric]
    low, high = bootstrap_ci(y, s, metric=metric, n=300, seed=7)
    assert low < point < high and high - low < 0.2
    assert bootstrap_ci(y, s, metric=metric, n=300, seed=7) == (low, high)
    assert bootstrap_ci(y, s, metric=metric, n=300, seed=8) != (low, high)


def test_bootstrap_paired_difference() -> None:
    y, s = synthetic(n=150, n_tags=5, seed=5)
    assert bootstrap_ci(y, s, n=50, reference=s) == (0.0, 0.0)
    noisy = s + 2.0 * np.random.default_rng(0).standard_normal(s.shape)
    low, high = bootstrap_ci(y, s, n=200, reference=noisy)
    assert 0.0 < low < high  # the cleaner scores are reliably better
    with pytest.raises(ValueError, match="metric"):
        bootstrap_ci(y, s, metric="f1")
    with pytest.raises(ValueError, match="both positives and negatives"):
        bootstrap_ci(np.zeros_like(y), s)


def _row(label: str, tags: list[str], y: np.ndarray, s: np.ndarray) -> Row:
    from rtagger.train.evaluation.evaluate import macro_auc

    songs = {"ids": np.array([f"song{i}" for i in range(len(y))]), "tags": np.array(tags),
             "true": y, "mean": s}
    return Row(label, Path(label), "song/mean", {"macro": macro_auc(y, s)}, None, {}, songs)


def test_paired_delta_compares_two_vocabularies_on_their_common_tags() -> None:
    y, s = synthetic(n=120, n_tags=4, seed=3)
    noisy = s + 2.0 * np.random.default_rng(1).standard_normal(s.shape)
    old = _row("old", ["a", "b", "c", "d"], y, noisy)
    # the newer model emits two more tags (unlabelled here), in between the old ones
    wide = np.insert(s, [1, 3], 0.5, axis=1)
    new = _row("new", ["a", "x", "b", "c", "y", "d"], np.insert(y, [1, 3], 0, axis=1), wide)
    delta, low, high = paired_delta(new, old, n=200)
    assert delta == pytest.approx(paired_delta(_row("same", old.songs["tags"].tolist(), y, s),
                                               old, n=200)[0])
    assert 0.0 < low <= delta <= high
    other = _row("other", ["p", "q", "r", "s"], y, s)
    with pytest.raises(ConfigError, match="no tag in common"):
        paired_delta(other, old)
    relabelled = _row("relabelled", ["a", "b", "c", "d"], 1 - y, s)
    with pytest.raises(ConfigError, match="other labels"):
        paired_delta(relabelled, old)


def test_compare_gives_each_tag_group_its_own_paired_interval() -> None:
    from rtagger.train.evaluation.compare import compare_markdown
    from rtagger.train.evaluation.evaluate import macro_auc

    y, s = synthetic(n=120, n_tags=4, seed=3)
    noisy = s.copy()
    noisy[:, 2:] += 2.0 * np.random.default_rng(1).standard_normal((len(s), 2))
    rows = []
    for label, scores in (("ref", noisy), ("better", s)):
        row = _row(label, ["a", "b", "c", "d"], y, scores)
        per_tag = {t: {"group": g} for t, g in zip("abcd", ["genre", "genre", "mode", "mode"],
                                                    strict=True)}
        groups = {g: macro_auc(y[:, cols], scores[:, cols])
                  for g, cols in (("genre", [0, 1]), ("mode", [2, 3]))}
        row.metrics.update(per_tag=per_tag, groups={**groups, "era": {}})
        rows.append(row)
    genre, _, _ = paired_delta(rows[1], rows[0], n=100, group="genre")
    mode, low, _ = paired_delta(rows[1], rows[0], n=100, group="mode")
    assert genre == 0.0 and mode > 0 and low > 0  # only the mode tags were made noisy
    text = compare_markdown(rows, bootstrap=100)
    line = [x for x in text.splitlines() if x.startswith("| better |")][-1]
    assert "+0.000 [+0.000, +0.000]" in line and line.endswith("| - |")  # era: no tag
