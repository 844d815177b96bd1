"""Engines against eager torch fp32 on the same batch, auto fallback, and clear errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import pretend_tensorrt_fails

from rtagger import engines as engines_module
from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.audio.signals import music_like
from rtagger.engines import AUTO_ORDER, available_engines, create_engine, unavailable_reason
from rtagger.errors import ConfigError, EngineUnavailable

# Max |difference| to eager torch fp32 (CPU) on music-like and noise windows. Measured:
# ~3e-7 (probs) and ~2e-6 (embeddings) for BatchNorm folding and for ONNX Runtime. The
# GPU bounds are stated, not measured here (no GPU): fp32 on CUDA runs TF32 convolutions
# by default (~1e-3 relative), fp16/bf16 keep ~3/~2 significant digits.
PROBS_ATOL = 1e-5
EMB_ATOL = 1e-4
CUDA_FP32_ATOL = (1e-3, 1e-2)  # (probs, embeddings)
HALF_ATOL = {"fp16": (2e-2, 0.2), "bf16": (5e-2, 0.3)}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    song = music_like(4 * 3.7, seed=5)
    rng = np.random.default_rng(0)
    w = [song[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES] for i in range(3)]
    w.append((0.1 * rng.standard_normal(WINDOW_SAMPLES)).astype(np.float32))
    w.append(np.zeros(WINDOW_SAMPLES, np.float32))  # silence: -100 dB everywhere
    return np.stack(w)


@pytest.fixture(scope="module")
def reference(debug_model, windows):
    with torch.inference_mode():
        logits, emb = debug_model.tagger.eval()(torch.from_numpy(windows))
    return torch.sigmoid(logits).numpy(), emb.numpy()


def _check(engine, windows, reference, probs_atol=PROBS_ATOL, emb_atol=EMB_ATOL):
    probs, emb = engine.run(windows)
    assert probs.dtype == np.float32 and emb.dtype == np.float32
    assert probs.shape == reference[0].shape and emb.shape == reference[1].shape
    np.testing.assert_allclose(probs, reference[0], atol=probs_atol)
    np.testing.assert_allclose(emb, reference[1], atol=emb_atol)


def test_torch_engine_with_folded_batchnorm_matches_eager(debug_model, windows, reference):
    engine = create_engine(debug_model, "torch")
    assert engine.describe()["optimized"]
    _check(engine, windows, reference)
    # The engine works on its own copy: the caller's model is untouched.
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in debug_model.tagger.frontend
               .modules())


def test_onnx_engine_matches_eager_torch_at_any_batch(debug_model, windows, reference):
    pytest.importorskip("onnxruntime")
    engine = create_engine(debug_model, "onnx")
    _check(engine, windows, reference)
    probs, _ = engine.run(windows[:1])  # dynamic batch axis
    np.testing.assert_allclose(probs, reference[0][:1], atol=PROBS_ATOL)


def test_four_step_log_mel_matches_log_mel(windows):
    from rtagger.engines.onnx_engine import FourStepLogMel
    from rtagger.model.features import LogMel

    mel = LogMel()
    x = torch.from_numpy(windows)
    with torch.no_grad():
        a, b = mel(x), FourStepLogMel(mel)(x)
    assert a.shape == b.shape
    # Same STFT, different float32 rounding (measured <= 3e-4 dB on these windows).
    assert float((a - b).abs().max()) < 1e-2


def test_auto_on_a_missing_gpu_falls_back_and_says_why(debug_model, windows, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to fall back from")
    with caplog.at_level("WARNING", logger="rtagger.engines"):
        engine = create_engine(debug_model, "auto", "cuda", precision="fp16",
                               cuda_graph_batch_sizes=(1, 8))
    assert engine.device == "cpu"
    assert engine.name in available_engines("cpu")
    assert "CUDA is not available" in engine.fallback_reason
    assert "fell back" in caplog.text
    assert engine.describe()["fallback_reason"] == engine.fallback_reason
    assert engine.run(windows[:2])[0].shape[0] == 2
    # Asked for the CPU, auto takes its first choice there when it can: nothing to report
    # (without onnxruntime, the fallback to torch is reported instead).
    on_cpu = create_engine(debug_model, "auto", "cpu")
    if unavailable_reason("onnx", "cpu") is None:
        assert on_cpu.name == "onnx" and on_cpu.fallback_reason is None
    else:
        assert on_cpu.name == "torch" and "onnxruntime" in on_cpu.fallback_reason


def test_auto_without_onnxruntime_falls_back_to_torch(debug_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    engine = create_engine(debug_model, "auto", "cpu", threads=torch.get_num_threads())
    assert engine.name == "torch"
    assert "onnxruntime is not installed" in engine.fallback_reason


def test_auto_on_cuda_takes_torch_never_unmeasured_tensorrt(debug_model, monkeypatch,
                                                            tmp_path):
    assert "tensorrt" not in AUTO_ORDER["cuda"] and AUTO_ORDER["cuda"][0] == "torch"
    # Even where CUDA and TensorRT both look available, auto builds torch first and only.
    pretend_tensorrt_fails(monkeypatch, AssertionError("must not be compiled"), tmp_path)
    monkeypatch.setattr(engines_module, "cuda_available", lambda: True)
    tried: list[str] = []
    real_build = engines_module._build

    def build_on_cpu(name, model, device, options):
        tried.append(name)
        return real_build(name, model, "cpu", options)  # no GPU here to build on

    monkeypatch.setattr(engines_module, "_build", build_on_cpu)
    engine = create_engine(debug_model, "auto", "cuda")
    assert tried == ["torch"] and engine.name == "torch"
    assert engine.fallback_reason is None  # torch is auto's first choice on CUDA
    # The bench still measures TensorRT when asked for all engines: it is listed, last.
    assert available_engines("cuda")[-1] == "tensorrt"


@pytest.mark.parametrize("error", [RuntimeError("[TRT] unsupported op aten::stft"),
                                   TypeError("compile() got an unexpected keyword"),
                                   AssertionError("lowering failed"),
                                   OSError("libnvinfer.so.10: cannot open shared object"),
                                   EngineUnavailable("torch_tensorrt vanished")])
def test_a_failing_tensorrt_compile_falls_back_to_torch_and_says_why(debug_model, windows,
                                                                     reference, monkeypatch,
                                                                     tmp_path, caplog, error):
    pretend_tensorrt_fails(monkeypatch, error, tmp_path)
    with caplog.at_level("WARNING", logger="rtagger.engines"):
        engine = create_engine(debug_model, "tensorrt", "cpu", cache_dir=tmp_path,
                               max_batch=8, opt_batch=4)
    assert engine.name == "torch" and engine.device == "cpu"
    assert type(error).__name__ in engine.fallback_reason
    assert str(error) in engine.fallback_reason
    assert engine.describe()["fallback_reason"] == engine.fallback_reason
    assert "tensorrt fell back to torch" in caplog.text
    _check(engine, windows, reference)  # and it tags like torch


def test_bad_tensorrt_settings_are_errors_not_fallbacks(debug_model, monkeypatch, tmp_path):
    pretend_tensorrt_fails(monkeypatch, RuntimeError("not reached"), tmp_path)
    with pytest.raises(ConfigError, match="precision"):
        create_engine(debug_model, "tensorrt", "cpu", precision="int8")
    with pytest.raises(ConfigError, match="opt_batch"):
        create_engine(debug_model, "tensorrt", "cpu", max_batch=4, opt_batch=8)
    with pytest.raises(ConfigError, match="takes no options"):
        create_engine(debug_model, "tensorrt", "cpu", threads=2)


def test_auto_falls_back_when_a_build_fails_with_any_error(debug_model, monkeypatch, caplog):
    from rtagger.engines.onnx_engine import OnnxEngine

    if unavailable_reason("onnx", "cpu") is not None:
        pytest.skip(unavailable_reason("onnx", "cpu"))

    def broken(self, *args, **kwargs):
        raise RuntimeError("onnxruntime: session creation failed")

    monkeypatch.setattr(OnnxEngine, "__init__", broken)
    with caplog.at_level("WARNING", logger="rtagger.engines"):
        engine = create_engine(debug_model, "auto", "cpu")
    assert engine.name == "torch"
    assert "onnx failed to build (RuntimeError: onnxruntime: session creation failed)" in \
        engine.fallback_reason
    assert "fell back" in caplog.text


def test_tensorrt_request_without_gpu_is_a_clear_error(debug_model):
    with pytest.raises(EngineUnavailable, match="TensorRT needs a CUDA device"):
        create_engine(debug_model, "tensorrt", "cpu")
    reason = unavailable_reason("tensorrt", "cuda")
    if reason is not None:
        with pytest.raises(EngineUnavailable, match="tensorrt") as info:
            create_engine(debug_model, "tensorrt", "cuda")
        assert reason in str(info.value)
        assert "available here" in str(info.value)


def test_bad_requests_are_typed_errors(debug_model, windows):
    with pytest.raises(EngineUnavailable, match="unknown engine"):
        create_engine(debug_model, "tflite")
    with pytest.raises(ConfigError, match="takes no options"):
        create_engine(debug_model, "torch", precision="fp32", max_batch=8)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        create_engine(debug_model, "torch", precision="fp16")
    engine = create_engine(debug_model, "torch")
    with pytest.raises(ConfigError, match="windows"):
        engine.run(windows[:, :1000])


# --- GPU (skipped without CUDA) -------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_torch_fp32_and_fp16_match_cpu(debug_model, windows, reference):
    _check(create_engine(debug_model, "torch", "cuda"), windows, reference, *CUDA_FP32_ATOL)
    for precision in ("fp16", "bf16"):
        engine = create_engine(debug_model, "torch", "cuda", precision=precision)
        _check(engine, windows, reference, *HALF_ATOL[precision])


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_pad_the_batch_and_equal_eager(debug_model, windows):
    eager = create_engine(debug_model, "torch", "cuda")
    graphs = create_engine(debug_model, "torch", "cuda", cuda_graph_batch_sizes=(1, 4))
    for n in (1, 3, 5):  # padded to 1, 4, and split 4 + 1
        a, b = eager.run(windows[:n]), graphs.run(windows[:n])
        assert b[0].shape == (n, len(debug_model.tags))
        # cuDNN may pick other (TF32) algorithms for the padded batch size.
        np.testing.assert_allclose(a[0], b[0], atol=CUDA_FP32_ATOL[0])
        np.testing.assert_allclose(a[1], b[1], atol=CUDA_FP32_ATOL[1])


@pytest.mark.gpu
@needs_cuda
def test_auto_on_cuda_is_the_measured_torch_path(debug_model, windows, reference):
    engine = create_engine(debug_model, "auto", "cuda")
    assert engine.name == "torch" and engine.device.startswith("cuda")
    assert engine.fallback_reason is None
    _check(engine, windows, reference, *CUDA_FP32_ATOL)


@pytest.mark.gpu
@needs_cuda
def test_onnx_on_cuda_matches(debug_model, windows, reference):
    pytest.importorskip("onnxruntime")
    if unavailable_reason("onnx", "cuda") is not None:
        pytest.skip(unavailable_reason("onnx", "cuda"))
    _check(create_engine(debug_model, "onnx", "cuda"), windows, reference, *CUDA_FP32_ATOL)


@pytest.mark.gpu
@needs_cuda
def test_tensorrt_compiles_once_then_loads_from_cache(debug_model, windows, reference,
                                                      tmp_path):
    pytest.importorskip("torch_tensorrt")
    first = create_engine(debug_model, "tensorrt", "cuda", cache_dir=tmp_path, max_batch=8,
                          opt_batch=4)
    assert first.compiled_now and first.path.is_file()
    _check(first, windows, reference, *HALF_ATOL["fp16"])
    second = create_engine(debug_model, "tensorrt", "cuda", cache_dir=tmp_path, max_batch=8,
                           opt_batch=4)
    assert not second.compiled_now and second.path == first.path
    _check(second, windows, reference, *HALF_ATOL["fp16"])


def test_a_tagger_with_chroma_and_tempo_profiles_runs_alike_on_every_engine(debug_model,
                                                                           windows):
    from rtagger.engines.onnx_engine import FourStepChroma
    from rtagger.model.checkpoint import TaggingModel
    from rtagger.model.network import with_window_features

    tagger = with_window_features(debug_model.tagger, tempo=True).eval()
    model = TaggingModel(tagger, None, list(debug_model.tags), dict(debug_model.tag_groups),
                         name="debug-chroma", trained=False)
    x = torch.from_numpy(windows)
    with torch.inference_mode():
        logits, emb = tagger(x)
        assert float((FourStepChroma(tagger.chroma)(x) - tagger.chroma(x)).abs().max()) < 1e-5
    reference = torch.sigmoid(logits).numpy(), emb.numpy()
    assert emb.shape[1] == tagger.cfg.embedding_dim == tagger.cfg.d_model + 12 + 16
    _check(create_engine(model, "torch"), windows, reference)
    if importlib.util.find_spec("onnxruntime") is not None:
        _check(create_engine(model, "onnx"), windows, reference)
