"""The musicnn teachers in torch: front end, architectures, conversion, converted files.

Runs without TensorFlow: the stored fixture (train/teachers/reference.json, computed once by
musicnn's own TensorFlow graphs) checks both architectures through seeded weights and the
bundled MTT_vgg teacher through its real weights. Converted teachers in ``data/teachers``
(or ``$RTAGGER_TEACHERS``) are checked too when present; tests that run TensorFlow itself
skip unless it and musicnn are installed (the teachers extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import cli_with
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rtagger.errors import CheckpointError, ConfigError
from rtagger.train.teachers import cli as teachers_cli
from rtagger.train.teachers.convert import (
    ConversionError,
    tf_shapes,
    tf_to_torch,
    variable_map,
)
from rtagger.train.teachers.musicnn import (
    META_KEY,
    MTT_TAGS,
    PATCH_FRAMES,
    SAMPLE_RATE,
    TEACHER_NAMES,
    MusicnnMel,
    Teacher,
    TeacherConfig,
    build_network,
    compress,
    load_teacher,
    patches,
    read_description,
    teacher_config,
    teacher_tags,
)
from rtagger.train.teachers.reference import (
    load_reference,
    reference_signal,
    seeded_patches,
    seeded_tf_variables,
)

BUNDLED = Path(str(resources.files("rtagger.train.teachers").joinpath("MTT_vgg.safetensors")))
CONVERTED = Path(os.environ.get("RTAGGER_TEACHERS", "data/teachers"))
HAS_TF = all(importlib.util.find_spec(m) for m in ("tensorflow", "musicnn", "tf_keras"))
PATCH_SAMPLES = (PATCH_FRAMES - 1) * 256  # the fewest samples that give one patch


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_reference()


def test_compression_is_float32_where_float16_overflows():
    mel = np.array([0.0, 1.0, 6.5, 6.56, 100.0, 1e4], dtype=np.float32)
    with np.errstate(over="ignore"):
        f16 = np.log10(np.float16(10_000) * mel.astype(np.float16) + np.float16(1))
    assert np.isinf(f16[3:]).all()  # musicnn's batch_data(): inf from 6.55 up
    ours = compress(torch.from_numpy(mel).half())  # even a float16 input is widened first
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    exact = np.log10(1e4 * mel.astype(np.float16).astype(np.float64) + 1)
    np.testing.assert_allclose(ours.numpy(), exact, rtol=1e-6)


def test_front_end_matches_stored_librosa_mel(ref):
    spec = MusicnnMel()(torch.from_numpy(reference_signal())[None])[0]
    assert spec.shape == (1 + len(reference_signal()) // 256, 96)
    assert float(spec.max()) > np.log10(1e4 * 6.55 + 1)  # the signal is loud enough to matter
    np.testing.assert_allclose(spec.mean(0).numpy(), ref["librosa_band_mean"], atol=1e-5)


def test_front_end_matches_librosa():
    librosa = pytest.importorskip("librosa")
    wave = reference_signal(4.0)
    want = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, hop_length=256, n_fft=512,
                                          n_mels=96).T
    got = MusicnnMel().power(torch.from_numpy(wave)[None])[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max())


def test_patches_follow_musicnn_batching():
    spec = torch.arange(400 * 2, dtype=torch.float32).reshape(400, 2)
    cut = patches(spec)
    assert cut.shape == (2, PATCH_FRAMES, 2)  # 400 frames: two whole patches, tail dropped
    assert torch.equal(cut[1], spec[PATCH_FRAMES:2 * PATCH_FRAMES])
    assert patches(spec, hop_frames=100).shape[0] == 3
    with pytest.raises(ConfigError, match="shorter than one"):
        patches(spec[:PATCH_FRAMES - 1])


@pytest.mark.parametrize("name", TEACHER_NAMES)
def test_architectures_shapes(name):
    torch.manual_seed(0)
    net = build_network(teacher_config(name)).eval()
    x = torch.rand(2, PATCH_FRAMES, 96) * 3
    feats = net.features(x)
    assert feats["logits"].shape == (2, 50)
    if teacher_config(name).arch == "musicnn":
        assert feats["front"].shape == (2, 2 * 204 + 3 * 51, PATCH_FRAMES)
        assert feats["midend"].shape == (2, 3 * 64, PATCH_FRAMES)
        assert feats["penultimate"].shape == (2, 200)
        assert net(torch.rand(1, 300, 96)).shape == (1, 50)  # pools over any length
    else:
        assert feats["pool5"].shape == (2, 128, 2, 1)
        with pytest.raises(ConfigError, match="187-frame"):
            net(torch.rand(1, 300, 96))


def test_variable_map_covers_every_weight_once():
    for arch in ("musicnn", "vgg"):
        state = build_network(TeacherConfig(arch)).state_dict()
        mapped = [pt for _, pt, _ in variable_map(arch)]
        assert len(mapped) == len(set(mapped))
        assert set(mapped) == {k for k in state if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("arch", ["musicnn", "vgg"])
def test_seeded_weights_match_tensorflow_graph(ref, arch):
    """TF-layout arrays -> tf_to_torch -> torch == musicnn's TF graph on the same arrays."""
    net = build_network(TeacherConfig(arch)).eval()
    net.load_state_dict(tf_to_torch(arch, seeded_tf_variables(arch, tf_shapes(arch))))
    x = torch.from_numpy(seeded_patches())
    want = np.array(ref["seeded"][arch]["logits"]).reshape(x.shape[0], -1)
    with torch.inference_mode():
        got = net(x).numpy()
    assert np.abs(want).max() > 1.0  # logits, not a collapsed constant
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tf_to_torch_names_what_is_wrong():
    variables = seeded_tf_variables("vgg", tf_shapes("vgg"))
    slots = {"3CNN/kernel/Adam": variables["3CNN/kernel"], "beta1_power": np.float32(0.9)}
    assert "out.weight" in tf_to_torch("vgg", {**variables, **slots})  # slots are ignored
    with pytest.raises(ConversionError, match="lacks 5CNN/bias"):
        tf_to_torch("vgg", {k: v for k, v in variables.items() if k != "5CNN/bias"})
    with pytest.raises(ConversionError, match="unexpected variables extra/kernel"):
        tf_to_torch("vgg", {**variables, "extra/kernel": np.zeros(1, np.float32)})


def test_bundled_teacher_matches_tensorflow(ref):
    teacher = load_teacher(BUNDLED)
    desc = read_description(BUNDLED)
    assert teacher.name == "MTT_vgg" and teacher.tags == MTT_TAGS
    prov = desc["provenance"]
    assert (prov["source_package"], prov["source_version"], prov["licence"]) == \
        ("musicnn", "0.1.0", "ISC")
    assert "Universitat Pompeu Fabra" in prov["copyright"]
    got = teacher.taggram(torch.from_numpy(reference_signal())).numpy()
    want = np.array(ref["teachers"]["probs"]["MTT_vgg"]).reshape(got.shape)
    assert got.shape == (ref["teachers"]["patches"], 50)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_loud_patches_are_told_apart():
    """musicnn's float16 cast gave every patch with a mel cell above 6.55 the same output;
    here loud patches of different music must get different tags."""
    teacher = load_teacher(BUNDLED)
    music = reference_signal()
    t = np.arange(len(music)) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t) * (t % 0.4 < 0.2)).astype(np.float32)
    outs = []
    for wave in (music, tone):
        x = torch.from_numpy(wave)
        loud = patches(teacher.mel.power(x[None])[0]).amax(dim=(1, 2))
        assert (loud > 6.55).all()  # each patch would have hit inf in float16
        outs.append(teacher.taggram(x))
    assert float((outs[0] - outs[1]).abs().max()) > 0.05


def test_teacher_forward_batches_windows():
    teacher = load_teacher(BUNDLED)
    wave = torch.from_numpy(reference_signal())
    windows = torch.stack([wave[:PATCH_SAMPLES], wave[PATCH_SAMPLES:2 * PATCH_SAMPLES]])
    probs = teacher(windows)
    assert probs.shape == (2, 1, 50)
    assert ((probs > 0) & (probs < 1)).all()
    with pytest.raises(ConfigError):
        teacher(windows[:, :PATCH_SAMPLES - 256])


@pytest.mark.parametrize("name", TEACHER_NAMES)
def test_converted_teachers_match_tensorflow(ref, name):
    path = CONVERTED / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not converted (rtagger data teachers)")
    teacher = load_teacher(path)
    assert teacher.tags == teacher_tags(name)
    got = teacher.taggram(torch.from_numpy(reference_signal())).numpy()
    want = np.array(ref["teachers"]["probs"][name]).reshape(got.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_load_teacher_refuses_bad_files(tmp_path):
    state = load_file(str(BUNDLED))
    meta = {META_KEY: json.dumps(read_description(BUNDLED))}
    state["out.bias"] = state["out.bias"] + 1
    save_file(state, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="sha256"):
        load_teacher(tmp_path / "tampered.safetensors")
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a converted teacher"):
        load_teacher(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        load_teacher(tmp_path / "junk.safetensors")


def test_teacher_rejects_mismatched_tags():
    with pytest.raises(ConfigError):
        Teacher("x", TeacherConfig("vgg"), ("a", "b"))


def test_cli_names_the_models():
    assert teachers_cli.TEACHER_NAMES == TEACHER_NAMES


@pytest.mark.skipif(HAS_TF, reason="TensorFlow and musicnn are installed")
def test_cli_without_tensorflow_says_what_to_install(tmp_path):
    res = CliRunner().invoke(cli_with(lambda app: teachers_cli.register(app, typer.Typer())),
                             ["teachers", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2
    assert "rtagger[teachers]" in res.output
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(not HAS_TF, reason="needs the teachers extra (TensorFlow, musicnn)")
def test_convert_and_compare_with_tensorflow(tmp_path, ref):
    from rtagger.train.teachers.convert import INDEX_FILE, LICENCE_FILE, convert_teachers
    from rtagger.train.teachers.parity import tf_logits

    [path] = convert_teachers(tmp_path, ["MTT_vgg"])
    index = json.loads((tmp_path / INDEX_FILE).read_text())["teachers"]
    assert [e["name"] for e in index] == ["MTT_vgg"]
    assert index[0]["weights_sha256"] == read_description(BUNDLED)["weights_sha256"]
    assert "ISC" in (tmp_path / LICENCE_FILE).read_text()
    x = seeded_patches()
    for arch in ("musicnn", "vgg"):
        variables = seeded_tf_variables(arch, tf_shapes(arch))
        net = build_network(TeacherConfig(arch)).eval()
        net.load_state_dict(tf_to_torch(arch, variables))
        with torch.inference_mode():
            got = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, tf_logits(f"MTT_{arch}", variables)(x), rtol=1e-4,
                                   atol=1e-4)
    got = load_teacher(path).net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, tf_logits("MTT_vgg")(x), atol=1e-4)
