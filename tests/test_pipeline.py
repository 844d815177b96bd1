"""The debug pipeline: every stage of the semi-supervised recipe, end to end, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rtagger.checkpoint import load_model
from train.pipeline import load_pipeline, run_pipeline

PIPELINE = Path(__file__).parents[1] / "train" / "recipes" / "pipeline-debug.toml"

pytestmark = pytest.mark.skipif(shutil.which("mma") is None or shutil.which("fluidsynth") is None,
                                reason="needs mma and fluidsynth (bootstrap --dev installs them)")


@pytest.mark.slow
def test_debug_pipeline_runs_every_stage_and_resumes(tmp_path):
    run_pipeline(PIPELINE, tmp_path, progress=False)
    runs = tmp_path / "runs"
    for stage in ("teacher", "student_expansion", "student", "aggregator"):
        assert (runs / stage / "best.safetensors").exists(), stage
    assert sorted(p.name for p in (runs / "pseudo-teacher").glob("shard-*.npz"))
    final = load_model(runs / "aggregator" / "best.safetensors")
    assert final.aggregator is not None and final.trained
    assert final.tagger.cfg == load_model(runs / "student" / "best.safetensors").tagger.cfg
    assert final.recipe["name"] == "aggregator"
    report = json.loads((runs / "eval-aggregator" / "metrics.json").read_text())
    assert {"window", "song/mean", "song/aggregator"} <= set(report["levels"])
    # a second run finds every step done and changes nothing
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("best.safetensors")}
    run_pipeline(PIPELINE, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("best.safetensors")} == before


def test_pipeline_files_are_valid():
    for path in PIPELINE.parent.glob("pipeline*.toml"):
        steps = load_pipeline(path)
        assert steps and all(Path(s["recipe"]).exists() for s in steps if s["run"] == "train")
