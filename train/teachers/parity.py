"""The torch teachers measured against musicnn 0.1.0's TensorFlow graph (needs the extra).

The TensorFlow side is musicnn's own ``models.define_model`` graph restored from the shipped
checkpoint, fed musicnn's own front end (librosa ``melspectrogram``) with the float16
defect fixed: ``log10(10000 * mel + 1)`` in float32, as the torch side computes it. Both
sides get the same 16 kHz waveform (decoded once by :func:`rtagger.audio.decode.load_audio`), so
the figures measure the port, not two decoders. ``float16_defect_patches`` reports the share
of patches in which musicnn's shipped pipeline would have produced inf.
"""

from __future__ import annotations

import json
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rtagger.audio.decode import load_audio
from rtagger.machine import cpu_model
from rtagger.train.teachers.convert import (
    ConversionError,
    import_tensorflow,
    musicnn_package_dir,
    tf_shapes,
    tf_to_torch,
)
from rtagger.train.teachers.musicnn import (
    HOP_LENGTH,
    LOG_GAIN,
    N_FFT,
    N_MELS,
    PATCH_FRAMES,
    SAMPLE_RATE,
    TEACHER_NAMES,
    Teacher,
    load_teacher,
    patches,
    teacher_tags,
)
from rtagger.train.teachers.reference import reference_signal, seeded_patches, seeded_tf_variables

PARITY_FILE = "parity.json"
TfRun = Callable[[np.ndarray], np.ndarray]


def tf_logits(name: str, variables: dict[str, np.ndarray] | None = None) -> TfRun:
    """musicnn's graph for ``name``: ``(n, 187, 96)`` -> ``(n, 50)`` logits, with the
    shipped checkpoint restored, or with ``variables`` assigned by name instead."""
    tf = import_tensorflow()
    try:
        from musicnn import models
    except ImportError as e:
        raise ConversionError(f"musicnn's graph code cannot be imported ({e})") from e
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, PATCH_FRAMES, N_MELS])
        training = tf.compat.v1.placeholder(tf.bool)
        with warnings.catch_warnings():  # musicnn's 2019 graph code: one notice per layer
            warnings.simplefilter("ignore", UserWarning)
            logits = models.define_model(x, training, name, len(teacher_tags(name)))[0]
        sess = tf.compat.v1.Session(graph=graph)
        if variables is None:
            tf.compat.v1.train.Saver().restore(sess, str(musicnn_package_dir() / name) + "/")
        else:
            for v in tf.compat.v1.global_variables():
                sess.run(v.assign(variables[v.op.name]))

    def run(batch: np.ndarray) -> np.ndarray:
        return sess.run(logits, {x: batch, training: False})

    return run


def librosa_mel(wave: np.ndarray) -> np.ndarray:
    """musicnn's front end: librosa mel power ``(frames, 96)``, before compression."""
    import librosa

    return librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, hop_length=HOP_LENGTH,
                                          n_fft=N_FFT, n_mels=N_MELS).T


def compress_f32(mel: np.ndarray) -> np.ndarray:
    return np.log10(LOG_GAIN * mel.astype(np.float32) + np.float32(1)).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def compare_file(wave: np.ndarray, teachers: dict[str, tuple[Teacher, TfRun]],
                 batch: int = 32) -> dict[str, dict]:
    """Per teacher: max and mean |delta prob| over every patch and tag of ``wave``."""
    mel = librosa_mel(wave)
    spec_tf = compress_f32(mel)
    with torch.inference_mode():
        spec_pt = next(iter(teachers.values()))[0].mel(torch.from_numpy(wave)[None])[0]
    cut = patches(torch.from_numpy(spec_tf)).numpy()
    with np.errstate(over="ignore"):
        f16 = np.log10(np.float16(LOG_GAIN) * mel.astype(np.float16) + np.float16(1))
    f16_cut = patches(torch.from_numpy(np.isinf(f16).astype(np.float32))).numpy()
    out = {}
    for name, (teacher, run) in teachers.items():
        p_tf = np.concatenate([_sigmoid(run(cut[i:i + batch]))
                               for i in range(0, len(cut), batch)])
        p_pt = teacher.taggram(torch.from_numpy(wave)).numpy()
        d = np.abs(p_pt - p_tf)
        out[name] = {"patches": len(cut), "max_abs_dprob": float(d.max()),
                     "mean_abs_dprob": float(d.mean()),
                     "max_abs_dlogmel": float(np.abs(spec_pt.numpy() - spec_tf).max()),
                     "float16_defect_patches": float((f16_cut.max(axis=(1, 2)) > 0).mean())}
    return out


def _machine() -> str:
    return (f"{cpu_model()}, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}")


def measure(teacher_dir: Path, files: Sequence[Path],
            names: Sequence[str] = TEACHER_NAMES) -> dict:
    """Torch vs TensorFlow on ``files``: per teacher and file, and the worst per teacher."""
    import librosa

    tf = import_tensorflow()
    teachers = {n: (load_teacher(teacher_dir / f"{n}.safetensors"), tf_logits(n))
                for n in names}
    per_file = {}
    for f in files:
        per_file[Path(f).name] = compare_file(load_audio(f), teachers)
    worst = {n: {"max_abs_dprob": max(r[n]["max_abs_dprob"] for r in per_file.values()),
                 "patches": sum(r[n]["patches"] for r in per_file.values())} for n in names}
    return {"machine": _machine(), "versions": {"tensorflow": tf.__version__,
                                                 "torch": torch.__version__,
                                                 "librosa": librosa.__version__},
            "teachers": worst, "files": per_file}


def write_parity(teacher_dir: Path, files: Sequence[Path],
                 names: Sequence[str] = TEACHER_NAMES) -> dict:
    result = measure(teacher_dir, files, names)
    (teacher_dir / PARITY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def parity_markdown(result: dict) -> str:
    rows = ["| teacher | patches | max abs delta prob |", "|---|---|---|"]
    rows += [f"| {n} | {r['patches']} | {r['max_abs_dprob']:.2e} |"
             for n, r in result["teachers"].items()]
    return "\n".join(rows) + f"\n\nmachine: {result['machine']}"


def _round(a: np.ndarray) -> list:
    return [float(f"{v:.7g}") for v in np.asarray(a, dtype=np.float64).ravel()]


def write_fixture(teacher_dir: Path, path: Path) -> Path:
    """The CI fixture (see :mod:`rtagger.train.teachers.reference`), computed by
    TensorFlow: seeded-weight logits per architecture and every converted teacher's
    probabilities on the reference signal."""
    tf = import_tensorflow()
    x = seeded_patches()
    seeded = {}
    for arch in ("musicnn", "vgg"):
        variables = seeded_tf_variables(arch, tf_shapes(arch))
        tf_to_torch(arch, variables)  # the same arrays must map, or the fixture is useless
        seeded[arch] = {"shape": list(x.shape), "logits": _round(tf_logits(f"MTT_{arch}",
                                                                           variables)(x))}
    wave = reference_signal()
    mel = librosa_mel(wave)
    cut = patches(torch.from_numpy(compress_f32(mel))).numpy()
    taught = {}
    for name in TEACHER_NAMES:
        if (teacher_dir / f"{name}.safetensors").is_file():
            taught[name] = _round(_sigmoid(tf_logits(name)(cut)))
    import librosa

    doc = {"about": "TensorFlow reference outputs of musicnn 0.1.0's graphs; see "
                    "reference.py",
           "versions": {"tensorflow": tf.__version__, "librosa": librosa.__version__},
           "seeded": seeded,
           "teachers": {"patches": int(cut.shape[0]), "probs": taught},
           "librosa_band_mean": _round(compress_f32(mel).mean(axis=0))}
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return path
