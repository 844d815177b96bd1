"""Feature cache: equivalence with direct decoding and LogMel, resume, dedup, failures, CLI.

Tolerances used below, and why:

- PCM: int16 rounding of the decoded float32, so ``|cached / 32768 - decoded| <= 0.5 / 32768``.
- Mel: float16 storage rounds to half an ulp, ``|cached - LogMel| <= 2**-11 * |value|``
  (<= 0.031 dB for values within +-64 dB), plus 1e-3 dB for float32 arithmetic.
- Chunked vs one-piece STFT: 1e-3 dB (float32 arithmetic only; the inputs are the same).
"""

from __future__ import annotations

import json
import os
import shutil
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import write_audio
from typer.testing import CliRunner

from rtagger.audio.decode import FRAMES_PER_WINDOW, HOP_LENGTH, SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.audio.signals import music_like
from rtagger.model.features import LogMel
from rtagger.train.data import cache
from rtagger.train.data import cli as data_cli
from rtagger.train.data.cache import CacheError, FeatureCache, build_cache, logmel_chunked
from rtagger.train.data.manifest import Track, write_manifest, zip_ref
from rtagger.train.data.pool import load_track_audio

MEL_RTOL, MEL_ATOL = 2.0**-11, 1e-3
FRONTEND = LogMel()


def _logmel(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return FRONTEND(torch.from_numpy(x)[None])[0].numpy()


def _wav(path: Path, x: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def encoded_dir(tmp_path_factory) -> Path:
    """wav (16 kHz mono), flac (22.05 kHz stereo), ogg in a zip, a copy, a corrupt file."""
    d = tmp_path_factory.mktemp("audio")
    a = _wav(d / "a.wav", music_like(5.0, seed=1))
    shutil.copy(a, d / "copy_of_a.wav")
    stereo = np.tile(music_like(4.0, sr=22_050, seed=2), 2)
    write_audio(d / "b.flac", stereo, 22_050, "flac", "s16", channels=2)
    write_audio(d / "c.ogg", np.tile(music_like(3.0, sr=44_100, seed=3), 2), 44_100, "vorbis",
                "fltp", channels=2)
    with zipfile.ZipFile(d / "music.pk3", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(d / "c.ogg", "music/c.ogg")
    (d / "corrupt.mp3").write_bytes(np.random.default_rng(0).bytes(5000))
    return d


@pytest.fixture()
def library(encoded_dir, tmp_path) -> list[Track]:
    """The tracks of a private copy of ``encoded_dir`` (tests modify files)."""
    d = shutil.copytree(encoded_dir, tmp_path / "audio")
    a = d / "a.wav"
    refs = [str(a), str(d / "copy_of_a.wav"), str(d / "b.flac"),
            zip_ref(d / "music.pk3", "music/c.ogg"), str(d / "corrupt.mp3")]
    return [Track(Path(r).name, r, (), "unlabelled") for r in refs]


@pytest.fixture()
def decodes(monkeypatch) -> list[str]:
    """Paths decoded by builds in this process (jobs=1 decodes in-process)."""
    seen: list[str] = []

    def counting(ref):
        seen.append(str(ref))
        return load_track_audio(ref)

    monkeypatch.setattr(cache, "load_track_audio", counting)
    return seen


def test_cached_arrays_equal_direct_decoding(library, tmp_path, decodes):
    report = build_cache(library, tmp_path / "c", progress=False)
    assert (report.n_done, report.n_skipped, report.n_failed) == (3, 1, 1)
    assert len(decodes) == 4 and library[1].path not in decodes  # the copy is not decoded
    fc = FeatureCache(tmp_path / "c")
    for t in library[:4]:
        ref = load_track_audio(t.path)
        pcm = fc.pcm(t)
        assert pcm.dtype == np.int16 and len(pcm) == len(ref)
        np.testing.assert_allclose(pcm / 32768.0, ref, rtol=0, atol=0.5 / 32768 + 1e-7)
        mel = fc.mel(t)
        assert mel.dtype == np.float16 and mel.shape == (128, 1 + len(ref) // HOP_LENGTH)
        np.testing.assert_allclose(mel.astype(np.float32), _logmel(ref), rtol=MEL_RTOL,
                                   atol=MEL_ATOL)
        assert fc.duration(t) == pytest.approx(len(ref) / SAMPLE_RATE)
        assert t in fc and t.path in fc
    assert library[4] not in fc
    assert report.audio_s == pytest.approx(sum(fc.duration(t) for t in library[:4]))


@pytest.mark.parametrize("n", [512, SAMPLE_RATE + 17, 40 * HOP_LENGTH])
@pytest.mark.parametrize("chunk_frames", [1, 7, 50, 10**6])
def test_chunked_logmel_equals_one_piece_everywhere(n, chunk_frames):
    # Including the first and last frames: pieces at the true ends get the same padding.
    x = music_like(n / SAMPLE_RATE + 0.01, seed=4)[:n]
    got = logmel_chunked(x, FRONTEND, chunk_frames)
    np.testing.assert_allclose(got, _logmel(x), rtol=0, atol=1e-3)


def test_window_mel_matches_logmel_of_window_pcm_inside(library, tmp_path):
    build_cache(library[:1], tmp_path / "c", progress=False)
    fc, t = FeatureCache(tmp_path / "c"), library[0]
    start = 37
    direct = _logmel(fc.window_pcm(t, start * HOP_LENGTH))
    got = fc.window_mel(t, start)
    assert got.shape == direct.shape == (128, FRAMES_PER_WINDOW) and got.dtype == np.float32
    # Frames 1..229 see only samples inside the window: equal up to int16 + float16 rounding.
    inner = slice(1, FRAMES_PER_WINDOW - 1)
    np.testing.assert_allclose(got[:, inner], direct[:, inner], rtol=MEL_RTOL, atol=0.01)
    # Frames 0 and 230 reach past the window: the window's own STFT reflect-pads there,
    # while the cache saw the real neighbouring samples.
    for edge in (0, FRAMES_PER_WINDOW - 1):
        assert np.abs(got[:, edge] - direct[:, edge]).max() > 0.1


def test_windows_past_the_end_are_padded(library, tmp_path):
    build_cache(library[:1], tmp_path / "c", progress=False)
    fc, t = FeatureCache(tmp_path / "c"), library[0]
    n, frames = len(fc.pcm(t)), fc.mel(t).shape[1]
    w = fc.window_pcm(t, n - 100)
    assert w.shape == (WINDOW_SAMPLES,) and not w[100:].any() and w[:100].any()
    m = fc.window_mel(t, frames - 10)
    assert (m[:, 10:] == cache.MEL_FLOOR_DB).all()
    np.testing.assert_array_equal(m[:, :10], fc.mel(t)[:, -10:].astype(np.float32))
    with pytest.raises(ValueError):
        fc.window_pcm(t, -1)


def _drop_last_entry(root: Path) -> dict:
    """Rewrite the index without its last entry (and that entry's path records)."""
    lines = (root / "index.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    last = [r for r in recs if r["type"] == "entry"][-1]
    keep = [line for line, r in zip(lines, recs, strict=True) if r["key"] != last["key"]]
    (root / "index.jsonl").write_text("".join(line + "\n" for line in keep))
    return last


@pytest.mark.parametrize("kill", ["index_line_lost", "data_cut_mid_entry", "index_cut_mid_line",
                                  "data_cut_under_index"])
def test_resume_after_kill_recomputes_only_the_lost_entry(library, tmp_path, decodes, kill):
    good = library[:4]
    build_cache(good, tmp_path / "ref", progress=False)
    root = tmp_path / "c"
    build_cache(good, root, progress=False)
    idx = root / "index.jsonl"
    if kill == "data_cut_under_index":  # data lost although indexed: e.g. a copy cut short
        last = [json.loads(x) for x in idx.read_text().splitlines()][-2]
        os.truncate(root / "pcm.i16", 2 * (last["pcm_offset"] + last["n_samples"] // 2))
    else:
        last = _drop_last_entry(root)
        if kill == "data_cut_mid_entry":
            os.truncate(root / "mel.f16", 2 * last["mel_offset"] + 1001)
        elif kill == "index_cut_mid_line":
            with open(idx, "a") as f:
                f.write(json.dumps(last)[:40])
    decodes.clear()
    report = build_cache(good, root, progress=False)
    assert len(decodes) == 1 and (report.n_done, report.n_skipped) == (1, 3)
    fresh, ref = FeatureCache(root), FeatureCache(tmp_path / "ref")
    for t in good:
        np.testing.assert_array_equal(fresh.pcm(t), ref.pcm(t))
        np.testing.assert_array_equal(fresh.mel(t), ref.mel(t))
    for name in ("pcm.i16", "mel.f16"):  # nothing left over from the lost entry
        assert (root / name).stat().st_size == (tmp_path / "ref" / name).stat().st_size
    decodes.clear()
    assert build_cache(good, root, progress=False).n_skipped == 4 and not decodes


def test_corrupt_and_missing_files_are_listed_and_the_rest_cached(library, tmp_path):
    missing = Track("gone", str(tmp_path / "gone.wav"), (), "unlabelled")
    report = build_cache([*library, missing], tmp_path / "c", progress=False)
    assert report.n_done == 3 and report.n_failed == 2
    failed = [json.loads(x) for x in (tmp_path / "c" / "failures.jsonl").read_text().splitlines()]
    assert {f["id"] for f in failed} == {"corrupt.mp3", "gone"}
    assert all(f["reason"] for f in failed)
    assert len(FeatureCache(tmp_path / "c")) == 3


def test_same_content_is_stored_once_and_found_by_content(library, tmp_path, decodes):
    root = tmp_path / "c"
    build_cache(library[:2], root, progress=False)
    fc = FeatureCache(root)
    assert fc.entry(library[0]) == fc.entry(library[1]) and len(fc) == 1
    assert (root / "pcm.i16").stat().st_size == 2 * len(fc.pcm(library[0]))
    # A third name for the same bytes is hashed, not decoded.
    third = Path(library[0].path).with_name("renamed.wav")
    shutil.copy(library[0].path, third)
    decodes.clear()
    report = build_cache([Track("r", str(third), (), "unlabelled")], root, progress=False)
    assert (report.n_done, report.n_skipped) == (0, 1) and not decodes


def test_lookup_rehashes_only_changed_files(library, tmp_path, monkeypatch):
    root = tmp_path / "c"
    build_cache(library[:3], root, progress=False)
    a, b, flac = (Path(t.path) for t in library[:3])
    os.utime(a, ns=(1, 1))  # same bytes, new mtime: found again by content
    b.write_bytes(b.read_bytes()[:-2000])  # other bytes: no longer the cached content
    flac.unlink()  # audio gone: the cache still serves it
    hashed: list[str] = []
    monkeypatch.setattr(cache, "file_sha256", lambda r: hashed.append(r) or _sha(r))
    fc = FeatureCache(root)
    assert library[0] in fc and library[2] in fc and library[1] not in fc
    assert sorted(hashed) == sorted([str(a), str(b)])


def _sha(ref: str) -> str:
    import hashlib

    return hashlib.sha256(Path(ref).read_bytes()).hexdigest()


def test_other_frontend_parameters_are_refused(library, tmp_path):
    root = tmp_path / "c"
    build_cache(library[:1], root, progress=False)
    with pytest.raises(CacheError, match=r"f_max: cache 8000\.0 vs requested 4000\.0"):
        build_cache(library[:1], root, progress=False, frontend=LogMel(f_max=4000.0))
    with pytest.raises(CacheError, match="n_mels"):
        FeatureCache(root, frontend=LogMel(n_mels=64))
    other = build_cache(library[:1], tmp_path / "c64", progress=False,
                        frontend=LogMel(n_mels=64))
    assert other.n_done == 1
    assert FeatureCache(tmp_path / "c64", LogMel(n_mels=64)).mel(library[0]).shape[0] == 64


def test_one_writer_at_a_time(library, tmp_path):
    root = tmp_path / "c"
    build_cache(library[:1], root, progress=False)
    writer = cache._Writer(root, FRONTEND.params(), 128)
    try:
        with pytest.raises(CacheError, match="another build"):
            build_cache(library[:1], root, progress=False)
    finally:
        writer.close()


def test_parallel_build_equals_serial(library, tmp_path):
    serial = build_cache(library, tmp_path / "s", progress=False)
    parallel = build_cache(library, tmp_path / "p", jobs=2, progress=False)
    assert (parallel.n_done, parallel.n_skipped, parallel.n_failed) == (
        serial.n_done, serial.n_skipped, serial.n_failed)
    s, p = FeatureCache(tmp_path / "s"), FeatureCache(tmp_path / "p")
    for t in library[:4]:
        np.testing.assert_array_equal(s.pcm(t), p.pcm(t))
        np.testing.assert_array_equal(s.mel(t), p.mel(t))


def test_cli_prints_summary_and_failures(library, tmp_path):
    app = typer.Typer()
    data_cli.register(app, typer.Typer())

    @app.command("noop")  # a second command keeps typer from collapsing the group
    def noop() -> None: ...

    manifest = write_manifest(tmp_path / "m.jsonl", library)
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["cache", str(manifest), "--out", str(out), "--jobs", "1"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "tracks cached now" in result.output and "corrupt.mp3" in result.output
    assert len(FeatureCache(out)) == 3
    result = CliRunner().invoke(app, ["cache", str(tmp_path / "none.jsonl"), "--out", str(out)])
    assert result.exit_code == 2 and "manifest not found" in result.output


def test_feature_cache_pickles_without_its_data(library, tmp_path):
    import pickle

    build_cache(library[:3], tmp_path / "c", progress=False)
    fc = FeatureCache(tmp_path / "c")
    before = fc.mel(library[2]).copy()  # maps the files
    blob = pickle.dumps(fc)  # what a DataLoader worker receives
    assert len(blob) < 20_000 < (tmp_path / "c" / "pcm.i16").stat().st_size
    np.testing.assert_array_equal(pickle.loads(blob).mel(library[2]), before)
