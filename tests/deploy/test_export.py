"""Export folders: ONNX and ExportedProgram round trips against eager torch, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from conftest import cli_with, pretend_tensorrt_fails
from typer.testing import CliRunner

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.audio.signals import music_like
from rtagger.deploy.cli import register
from rtagger.deploy.export import export_model
from rtagger.engines.exported import (
    MANIFEST,
    is_export_dir,
    load_exported,
    load_exported_model,
    read_manifest,
)
from rtagger.errors import CheckpointError, ConfigError, EngineUnavailable
from rtagger.model.checkpoint import build_untrained

# Max |difference| of the reloaded artefact to eager torch fp32 (measured ~3e-7 for ONNX,
# 0 for the ExportedProgram, which runs the same torch kernels).
PROBS_ATOL = {"onnx": 1e-5, "exported-program": 1e-6}
EMB_ATOL = {"onnx": 1e-4, "exported-program": 1e-5}


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    song = music_like(3 * 3.7, seed=11)
    return np.stack([song[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES] for i in range(3)])


def _cli() -> typer.Typer:
    return cli_with(register)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """An ONNX export of untrained:debug, written by the ``export`` command."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("exp") / "onnx"
    res = CliRunner().invoke(_cli(), ["export", "untrained:debug", "--format", "onnx",
                                      "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "max |probs - eager torch|" in res.output
    return out


def _eager(model, windows):
    with torch.inference_mode():
        logits, emb = model.tagger.eval()(torch.from_numpy(windows))
    return torch.sigmoid(logits).numpy(), emb.numpy()


def test_onnx_export_round_trip(onnx_dir, windows):
    debug_model = build_untrained("debug")  # what the command exported (untrained:debug)
    assert is_export_dir(onnx_dir)
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["checkpoint.safetensors",
                                                         "model.onnx", MANIFEST]
    engine, manifest = load_exported(onnx_dir)
    assert manifest["artifact"] == "onnx" and engine.name == "onnx"
    assert manifest["model"] == json.loads(json.dumps(debug_model.describe()))
    assert manifest["outputs"]["probs"]["shape"] == ["batch", len(debug_model.tags)]
    assert manifest["parity"]["max_abs_diff_probs"] <= manifest["parity"]["tolerance_probs"]
    probs, emb = engine.run(windows)
    ref_p, ref_e = _eager(debug_model, windows)
    np.testing.assert_allclose(probs, ref_p, atol=PROBS_ATOL["onnx"])
    np.testing.assert_allclose(emb, ref_e, atol=EMB_ATOL["onnx"])
    model = load_exported_model(onnx_dir)
    assert model.tags == debug_model.tags and model.aggregator is not None
    assert model.weights_sha256 == debug_model.weights_sha256


def test_exported_program_round_trip(debug_model, windows, tmp_path):
    out = export_model(debug_model, "exported-program", tmp_path / "ep")
    engine, manifest = load_exported(out)
    assert manifest["file"] == "model.pt2"
    probs, emb = engine.run(windows[:2])  # exported with batch 2, run at 2 and 3
    ref_p, ref_e = _eager(debug_model, windows)
    np.testing.assert_allclose(probs, ref_p[:2], atol=PROBS_ATOL["exported-program"])
    probs, emb = engine.run(windows)
    np.testing.assert_allclose(emb, ref_e, atol=EMB_ATOL["exported-program"])


def test_export_never_replaces_silently(onnx_dir, debug_model, tmp_path):
    with pytest.raises(ConfigError, match="already holds an export"):
        export_model(debug_model, "onnx", onnx_dir)
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ConfigError, match="not an rtagger export"):
        export_model(debug_model, "onnx", stranger, overwrite=True)
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(debug_model, "tflite", tmp_path / "x")


def test_tensorrt_export_without_gpu_fails_cleanly(debug_model, tmp_path):
    from rtagger.engines import unavailable_reason

    if unavailable_reason("tensorrt", "cuda") is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(EngineUnavailable, match="tensorrt"):
        export_model(debug_model, "tensorrt", tmp_path / "trt")
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no temp folder


def test_broken_export_folders_are_named(onnx_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not an rtagger export"):
        read_manifest(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        read_manifest(copy)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="missing"):
        read_manifest(copy)


def test_export_command_refuses_to_overwrite(onnx_dir):
    res = CliRunner().invoke(_cli(), ["export", "untrained:debug", "-f", "onnx", "-o",
                                      str(onnx_dir)])
    assert res.exit_code == 2 and "--force" in res.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensorrt_export_loads_without_recompiling(debug_model, windows, tmp_path):
    pytest.importorskip("torch_tensorrt")
    out = export_model(debug_model, "tensorrt", tmp_path / "trt", max_batch=8)
    engine, _ = load_exported(out, "cuda", cache_dir=tmp_path / "cache")
    assert not engine.compiled_now and engine.path.parent == out
    probs, _ = engine.run(windows)
    np.testing.assert_allclose(probs, _eager(debug_model, windows)[0], atol=2e-2)


def test_tag_and_serve_paths_load_an_export_folder(onnx_dir, encoded):
    """`rtagger tag --model DIR` runs the exported graph and matches the checkpoint."""
    from rtagger.cli.main import app as rtagger_app
    from rtagger.pipeline.tagger import Tagger

    via_export = Tagger(str(onnx_dir))
    assert via_export.engine.name == "onnx"
    direct = Tagger(build_untrained("debug"))
    a, b = via_export.tag_file(encoded["wav"]), direct.tag_file(encoded["wav"])
    np.testing.assert_allclose(a.taggram(), b.taggram(), atol=1e-4)
    res = CliRunner().invoke(rtagger_app, ["tag", "--model", str(onnx_dir), "-f", "json",
                                           str(encoded["wav"])])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["results"][0]["model"]["engine"] == "onnx"


def test_an_engine_the_export_does_not_hold_is_refused(onnx_dir, encoded):
    from rtagger.cli.main import app as rtagger_app
    from rtagger.pipeline.tagger import Tagger

    assert Tagger(str(onnx_dir), engine="auto").engine.name == "onnx"
    assert Tagger(str(onnx_dir), engine="onnx").engine.name == "onnx"
    for other in ("torch", "tensorrt"):
        with pytest.raises(ConfigError, match="onnx export") as info:
            Tagger(str(onnx_dir), engine=other)
        assert "checkpoint.safetensors" in str(info.value)  # how to run another engine
    res = CliRunner().invoke(rtagger_app, ["tag", "--model", str(onnx_dir), "--engine",
                                           "torch", str(encoded["wav"])])
    assert res.exit_code == 2 and "cannot apply" in res.output
    # The checkpoint inside the folder runs with the engine asked for.
    assert Tagger(onnx_dir / "checkpoint.safetensors", engine="torch").engine.name == "torch"


def test_a_tensorrt_export_that_fails_to_build_falls_back_to_torch(onnx_dir, monkeypatch,
                                                                   tmp_path, windows):
    from rtagger.pipeline.tagger import Tagger

    # A TensorRT export folder whose engine does not match this "GPU": it must recompile,
    # and the compile fails.
    folder = tmp_path / "trt"
    folder.mkdir()
    (folder / "checkpoint.safetensors").write_bytes(
        (onnx_dir / "checkpoint.safetensors").read_bytes())
    (folder / "other-gpu.ep").write_bytes(b"compiled elsewhere")
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    manifest.update(artifact="tensorrt", file="other-gpu.ep",
                    tensorrt={"key": "other-gpu", "gpu": "Other GPU", "version": "0.0-other",
                              "precision": "fp32", "max_batch": 8, "opt_batch": 4})
    (folder / MANIFEST).write_text(json.dumps(manifest))
    pretend_tensorrt_fails(monkeypatch, RuntimeError("[TRT] builder failed"), tmp_path / "c")
    t = Tagger(str(folder), device="cpu")
    assert t.engine.name == "torch"
    assert "[TRT] builder failed" in t.model_info()["engine_fallback"]
    ref = _eager(build_untrained("debug"), windows)
    np.testing.assert_allclose(t.engine.run(windows)[0], ref[0], atol=PROBS_ATOL["onnx"])
