"""The live convergence curve (tags early in a stream vs the whole song) and CPU time vs musicnn."""

from __future__ import annotations

import json

import numpy as np
from conftest import cli_with, toy_song, write_audio

from rtagger.audio.decode import SAMPLE_RATE
from rtagger.model.checkpoint import build_untrained, save_model
from rtagger.train.data.manifest import Track, write_manifest
from rtagger.train.evaluation import cli as evaluation_cli
from rtagger.train.evaluation.convergence import convergence, song_curve


def _songs(d, n=4, seconds=20.0):
    out = []
    for i in range(n):
        kind = "piano" if i % 2 == 0 else "drums"
        p = write_audio(d / f"s{i}.flac", toy_song(kind, seconds, i), SAMPLE_RATE, "flac", "s16")
        out.append(Track(f"s{i}", str(p), (kind,), "test", seconds))
    return out


def test_the_curve_reaches_the_whole_song_tags(tmp_path):
    from rtagger.pipeline.tagger import Tagger

    model = save_model(build_untrained("debug", seed=2), tmp_path / "m.safetensors")
    tracks = _songs(tmp_path)
    tagger = Tagger(model, hop_s=1.0)
    curve = song_curve(tagger, tracks[0], (5.0, 10.0, 60.0))
    assert curve.at[60.0] is None  # a 20 s song never reaches 60 s
    assert not np.array_equal(curve.at[5.0], curve.final)  # the context grows
    offline = tagger.tag_file(tracks[0].path).track_probs  # the same hop, all at once
    np.testing.assert_allclose(curve.final, offline, atol=1e-5)
    report = convergence(model, tracks, checkpoints=(5.0, 10.0, 60.0), progress=False)
    rows = {r["at_s"]: r for r in report["rows"]}
    assert rows[60.0]["songs"] == 0 and rows["final"]["mean_abs_delta_to_final"] == 0.0
    assert rows["final"]["top5_overlap_with_final"] == 1.0
    assert rows[5.0]["mean_abs_delta_to_final"] >= rows[10.0]["mean_abs_delta_to_final"] > 0
    assert 0 <= rows[5.0]["song_macro_roc_auc"] <= 1


def test_the_command_writes_json_markdown_and_a_plot(tmp_path):
    model = save_model(build_untrained("debug", seed=2), tmp_path / "m.safetensors")
    manifest = write_manifest(tmp_path / "test.jsonl", _songs(tmp_path, n=2, seconds=12.0))
    app = cli_with(lambda a: evaluation_cli.register(a, a))
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["convergence", str(model), "--manifest", str(manifest),
                                   "--out", str(tmp_path / "out"), "--at", "5,10"])
    assert res.exit_code == 0, res.output
    assert "| 5 s | 2 |" in res.output
    report = json.loads((tmp_path / "out" / "convergence.json").read_text())
    assert [r["at_s"] for r in report["rows"]] == [5.0, 10.0, "final"]
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["convergence", str(model), "--manifest", str(manifest),
                                   "--out", str(tmp_path / "o2"), "--at", "soon"])
    assert bad.exit_code == 2 and "--at" in bad.output


def test_speed_compares_cpu_time_with_a_musicnn_teacher(tmp_path):
    from importlib import resources

    from rtagger.train.evaluation.speed import compare_cpu, speed_markdown

    vgg = resources.files("rtagger.train.teachers").joinpath("MTT_vgg.safetensors")
    model = save_model(build_untrained("debug", seed=2), tmp_path / "m.safetensors")
    files = [t.path for t in _songs(tmp_path, n=2, seconds=8.0)]
    report = compare_cpu(files, str(vgg), str(model), threads=1)
    assert report["files"] == 2 and abs(report["audio_s"] - 16.0) < 0.1
    assert all(r["cpu_s"] > 0 for r in report["rows"].values())
    assert report["cpu_ratio_musicnn_over_rtagger"] > 0
    assert "x the CPU time" in speed_markdown(report)
