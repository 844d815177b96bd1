"""Probes of the window outputs: the breakdown and tempo-change rules, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli_with, write_audio
from test_mixes import clicks
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.model.checkpoint import build_untrained, save_model
from rtagger.train.data.manifest import Track, write_manifest
from rtagger.train.evaluation import cli as evaluation_cli
from rtagger.train.evaluation.probe import audio_tempo_score, breakdown_score, change_score

CENTRES = np.arange(2.0, 100.0, 1.0)


def test_a_drum_gap_between_drums_is_a_breakdown():
    drums = np.ones_like(CENTRES)
    assert breakdown_score(CENTRES, drums, 100.0) == pytest.approx(0.0)
    gap = drums.copy()
    gap[(CENTRES > 50) & (CENTRES < 62)] = 0.0
    assert breakdown_score(CENTRES, gap, 100.0) == pytest.approx(1.0)
    early = drums.copy()
    early[CENTRES < 14] = 0.0  # silent intro: no drums before it, and before 20 %
    assert breakdown_score(CENTRES, early, 100.0) < 0.5


def test_a_tempo_step_scores_its_size():
    flat = np.full_like(CENTRES, np.log2(120.0))
    step = np.where(CENTRES < 50, np.log2(100.0), np.log2(130.0))
    assert change_score(CENTRES, flat, 100.0) == 0.0
    assert change_score(CENTRES, step, 100.0) == pytest.approx(np.log2(1.3), abs=1e-6)
    late = np.where(CENTRES < 80, np.log2(100.0), np.log2(130.0))  # after 70 %: not counted
    assert change_score(CENTRES, late, 100.0) < 0.2


def test_the_audio_tempo_rule_hears_a_change_and_not_a_steady_pulse():
    steady = clicks(100.0, 80.0)
    changed = np.concatenate([clicks(100.0, 40.0), clicks(130.0, 40.0, seed=1)])
    assert audio_tempo_score(steady, 80.0) < 0.05
    assert audio_tempo_score(changed, 80.0) > 0.3


def _song(folder, i: int, breakdown: bool, tempo_change: bool) -> Track:
    seconds = 30.0
    a = 0.5 * clicks(100.0, 15.0, seed=i)
    b = 0.5 * clicks(130.0 if tempo_change else 100.0, 15.0, seed=i + 1)
    x = np.concatenate([a, b])
    drums = [[0.0, 30.0]]
    if breakdown:
        x[int(10 * SAMPLE_RATE):int(20 * SAMPLE_RATE)] *= 0.05
        drums = [[0.0, 10.0], [20.0, 30.0]]
    bpm2 = 130.0 if tempo_change else 100.0
    timeline = {"duration": seconds, "instruments": {"drums": drums}, "drum_notes": 60,
                "keys": [[0.0, seconds, "C", "major"]],
                "tempos": [[0.0, 15.0, 100.0], [15.0, seconds, bpm2]], "events": {}}
    tags = ["drums", "major"] + ["breakdown"] * breakdown + ["tempo_change"] * tempo_change
    path = write_audio(folder / f"s{i}.flac", x, SAMPLE_RATE, "flac", "s16")
    return Track(f"s{i}", str(path), tuple(tags), "test", seconds, extra={"timeline": timeline})


def test_the_probe_command_scores_every_rule(tmp_path):
    model = save_model(build_untrained("debug", seed=2), tmp_path / "m.safetensors")
    songs = [_song(tmp_path, i, i % 2 == 0, i // 2 % 2 == 0) for i in range(4)]
    valid = write_manifest(tmp_path / "valid.jsonl", songs[:2])
    test = write_manifest(tmp_path / "test.jsonl", songs)
    app = cli_with(lambda a: evaluation_cli.register(a, a))
    res = CliRunner().invoke(app, ["probe", str(model), "--valid", str(valid), "--test",
                                   str(test), "--out", str(tmp_path / "out"), "--hops", "3.0,2.0"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    rows = report["rows"]
    assert {r["hop_s"] for r in rows} == {3.0, 2.0}
    assert sum(r["signal"].startswith("onset") for r in rows) == 1  # once, at the first hop
    assert all(r["positives"] == 2 and 0 <= r["roc_auc"] <= 1 for r in rows)
    ceiling = next(r for r in rows if r["tag"] == "tempo_change" and "ceiling" in r["signal"])
    assert ceiling["roc_auc"] == 1.0  # the true tempi show the change
    assert "| tempo_change |" in res.output and "R^2" in res.output
    bad = CliRunner().invoke(app, ["probe", str(model), "--valid", str(valid), "--test",
                                   str(test), "--out", str(tmp_path / "o2"), "--hops", "soon"])
    assert bad.exit_code == 2 and "--hops" in bad.output
