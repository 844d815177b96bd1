"""The debug pipeline: every stage of the semi-supervised recipe, end to end, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rtagger.cli.main import app
from rtagger.model.checkpoint import load_model
from rtagger.train.pipeline import load_pipeline, run_pipeline

PIPELINE = Path(__file__).resolve().parents[3] / "train" / "recipes" / "pipeline-debug.toml"

pytestmark = pytest.mark.skipif(shutil.which("mma") is None or shutil.which("fluidsynth") is None,
                                reason="needs mma and fluidsynth (bootstrap --dev installs them)")


@pytest.mark.slow
def test_debug_pipeline_runs_every_stage_and_resumes(tmp_path):
    run_pipeline(PIPELINE, tmp_path, progress=False)
    runs = tmp_path / "runs"
    for stage in ("teacher", "student_expansion", "student", "student_v2", "aggregator"):
        assert (runs / stage / "best.safetensors").exists(), stage
    assert sorted(p.name for p in (runs / "pseudo-teacher").glob("shard-*.npz"))
    # the multi-source stage: the ensemble's labels and a student on vocabulary v2
    assert load_model(runs / "student_v2" / "best.safetensors").describe()["vocabulary"] == "v2"
    # fidelity to the teachers on whole pool tracks, from their own shard folder
    fid = json.loads((runs / "fidelity-student-v2" / "fidelity.json").read_text())
    assert fid["tracks"] == 3 and fid["macro"]["tags"] > 0
    assert 0.0 <= fid["top5_overlap"] <= 1.0
    # the same report from the command line
    res = CliRunner().invoke(app, [
        "train", "fidelity", str(runs / "pseudo-ensemble-holdout"),
        "--model", str(runs / "student_v2" / "best.safetensors"),
        "--cache", str(tmp_path / "data" / "cache"), "--out", str(tmp_path / "fid-cli")])
    assert res.exit_code == 0, res.output
    cli = json.loads((tmp_path / "fid-cli" / "fidelity.json").read_text())
    assert cli["macro"] == fid["macro"] and "| all |" in res.stdout
    res = CliRunner().invoke(app, ["train", "fidelity", str(tmp_path / "no-shards"),
                                   "--cache", str(tmp_path / "data" / "cache"),
                                   "--out", str(tmp_path / "fid-none")])
    assert res.exit_code == 2 and "no shard-*.npz" in res.stderr
    final = load_model(runs / "aggregator" / "best.safetensors")
    assert final.aggregator is not None and final.trained
    assert final.tagger.cfg == load_model(runs / "student" / "best.safetensors").tagger.cfg
    assert final.recipe["name"] == "aggregator"
    report = json.loads((runs / "eval-aggregator" / "metrics.json").read_text())
    assert {"window", "song/mean", "song/aggregator"} <= set(report["levels"])
    # the experiment table: mean pooling vs the aggregator of the same model, paired
    ev = runs / "eval-aggregator"
    table = tmp_path / "table.md"
    res = CliRunner().invoke(app, ["train", "compare", str(ev), f"{ev}@song/aggregator",
                                   "--labels", "mean,aggregator", "--bootstrap", "50",
                                   "--latency-s", "0.2",
                                   "--out", str(table)])
    assert res.exit_code == 0, res.output
    text = table.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| mean") or
            line.startswith("| aggregator")]
    assert len(rows) == 5  # overall table, per-group table, per-group delta table
    assert "reference" in rows[0] and "[" in rows[1]  # delta with its interval
    assert rows[4].startswith("| aggregator |") and "[" in rows[4]  # a group's interval
    assert "MACs/window" in text and "CPU ms/window" in text
    assert "| model | genre |" in text.split("per tag group")[1]
    # a second run finds every step done and changes nothing
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("best.safetensors")}
    run_pipeline(PIPELINE, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("best.safetensors")} == before


def test_pipeline_files_are_valid():
    for path in PIPELINE.parent.glob("pipeline*.toml"):
        steps = load_pipeline(path)
        assert steps and all(Path(s["recipe"]).exists() for s in steps if s["run"] == "train")


def test_compare_refuses_an_unfinished_evaluation(tmp_path):
    from rtagger.errors import ConfigError
    from rtagger.train.evaluation.compare import load_row

    (tmp_path / "eval").mkdir()
    with pytest.raises(ConfigError, match=r"not a finished evaluation \(missing \['metrics"):
        load_row(str(tmp_path / "eval"))


def test_only_runs_the_named_steps_in_file_order(tmp_path, monkeypatch):
    from rtagger.errors import ConfigError
    from rtagger.train import pipeline

    recipe = tmp_path / "p.toml"
    recipe.write_text("".join(f'[[steps]]\nname = "{n}"\nrun = "pool"\nout = "data/{n}.jsonl"\n\n'
                              for n in ("a", "b", "c")))
    ran = []
    monkeypatch.setitem(pipeline._STEPS, "pool", lambda step, progress: ran.append(step["name"]))
    run_pipeline(recipe, tmp_path, only="c, a", progress=False)
    assert ran == ["a", "c"]
    with pytest.raises(ConfigError, match=r"no step named 'x', 'y'"):
        run_pipeline(recipe, tmp_path, only="a,x,y", progress=False)
    assert ran == ["a", "c"]  # nothing runs when a name is wrong
