"""The unlabelled pool: folder scan, .pk3 members, durations, failures, resume, CLI.

Fixture audio is encoded here with PyAV's own FFmpeg encoders, so no Debian music package is
needed; one test runs against the real packages when they are installed.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.train.data import cli as data_cli
from rtagger.train.data import pool
from rtagger.train.data.manifest import parse_zip_ref, read_manifest
from rtagger.train.data.pool import build_pool, build_pool_report, load_track_audio, probe


def encode(dest: Path | io.BytesIO, codec: str, rate: int, channels: int, seconds: float,
           fmt: str | None = None) -> None:
    """A two-tone test signal encoded with ``codec`` (native vorbis needs stereo)."""
    import av

    n = int(rate * seconds)
    t = np.arange(n) / rate
    sig = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234 * t)
    layout = "mono" if channels == 1 else "stereo"
    opts = {"strict": "experimental"} if codec == "vorbis" else {}
    target = dest if isinstance(dest, io.BytesIO) else str(dest)
    with av.open(target, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate, layout=layout)
        s.codec_context.options = opts
        sample_fmt = s.codec_context.format
        for start in range(0, n, 1024):
            x = np.tile(sig[start:start + 1024], (channels, 1))
            if sample_fmt.name.startswith("s16"):
                x = (x * 32767).astype(np.int16)
            else:
                x = x.astype(np.float32)
            if not sample_fmt.is_planar:
                x = x.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format=sample_fmt.name,
                                               layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def ogg_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    encode(buf, "vorbis", 44100, 2, seconds, fmt="ogg")
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("music")
    (root / "sub").mkdir()
    encode(root / "a.wav", "pcm_s16le", 22050, 1, 1.5)
    encode(root / "sub" / "b.flac", "flac", 44100, 2, 2.0)
    encode(root / "sub" / "c.ogg", "vorbis", 44100, 2, 2.5)
    encode(root / "d.opus", "libopus", 48000, 2, 1.0)
    (root / "corrupt.mp3").write_bytes(np.random.default_rng(0).bytes(4000))
    (root / "notes.txt").write_text("not audio")
    with zipfile.ZipFile(root / "game.pk3", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("music/intro.ogg", ogg_bytes(1.2))
        z.writestr("music/battle.ogg", ogg_bytes(0.8))
        z.writestr("music/bad.ogg", b"OggS" + bytes(200))
        z.writestr("readme.txt", "not audio")
    (root / "broken.pk3").write_bytes(b"this is not a zip archive")
    return root


EXPECTED = {"a.wav": 1.5, "sub/b.flac": 2.0, "sub/c.ogg": 2.5, "d.opus": 1.0,
            "game.pk3!music/intro.ogg": 1.2, "game.pk3!music/battle.ogg": 0.8}


def test_folder_and_pk3_durations_and_failures(source, tmp_path):
    out = build_pool(tmp_path / "pool" / "manifest.jsonl", [source], progress=False)
    tracks = read_manifest(out)
    by_rel = {t.id.split("/", 1)[1]: t for t in tracks}
    assert set(by_rel) == set(EXPECTED)
    for rel, seconds in EXPECTED.items():
        t = by_rel[rel]
        assert t.split == "unlabelled" and t.tags == ()
        assert t.extra["source"] == source.name
        assert t.duration == pytest.approx(seconds, abs=0.03), rel
    zipped = parse_zip_ref(by_rel["game.pk3!music/intro.ogg"].path)
    assert zipped == (str(source / "game.pk3"), "music/intro.ogg")
    failures = [json.loads(line) for line in
                (tmp_path / "pool" / "manifest.failures.jsonl").read_text().splitlines()]
    failed = {Path(parse_zip_ref(f["path"])[1] if f["path"].startswith("zip://")
                   else f["path"]).name: f["reason"] for f in failures}
    assert set(failed) == {"corrupt.mp3", "bad.ogg", "broken.pk3"}
    assert "archive" in failed["broken.pk3"]
    assert all(failed.values())


def test_zip_member_decodes_like_the_extracted_file(source, tmp_path):
    ref = f"zip://{source / 'game.pk3'}!music/intro.ogg"
    audio = load_track_audio(ref)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == pytest.approx(1.2 * SAMPLE_RATE, abs=0.03 * SAMPLE_RATE)
    with zipfile.ZipFile(source / "game.pk3") as z:
        (tmp_path / "intro.ogg").write_bytes(z.read("music/intro.ogg"))
    ref_audio = load_audio(tmp_path / "intro.ogg")
    n = min(len(audio), len(ref_audio))
    assert abs(len(audio) - len(ref_audio)) <= 2
    np.testing.assert_allclose(audio[:n], ref_audio[:n], atol=1e-4)
    # 440 Hz dominates after the downmix to mono and the resampling to 16 kHz
    spectrum = np.abs(np.fft.rfft(audio[: SAMPLE_RATE]))
    assert abs(np.argmax(spectrum) - 440) <= 2


def test_plain_path_uses_rtagger_audio(source):
    a = load_track_audio(str(source / "sub" / "b.flac"))
    np.testing.assert_array_equal(a, load_audio(source / "sub" / "b.flac"))


def test_verify_decodes_everything(source):
    quick = probe(str(source / "sub" / "c.ogg"))
    full = probe(str(source / "sub" / "c.ogg"), verify=True)
    assert full["duration"] == pytest.approx(quick["duration"], abs=0.03)
    assert quick["channels"] == 2 and quick["codec"] == "vorbis"


def test_missing_default_sources_are_reported_not_fatal(tmp_path, monkeypatch):
    from rtagger.train.data import debian

    monkeypatch.setattr(debian, "POOL_PACKAGES", (
        debian.PoolPackage("nope-music", ("nonexistent/xyz/*",), "ambient"),))
    monkeypatch.setattr(pool, "POOL_PACKAGES", debian.POOL_PACKAGES)
    report = build_pool_report(tmp_path / "m.jsonl", None, progress=False,
                               debian_dir=tmp_path / "debian")
    assert report.n_tracks == 0
    assert report.missing_sources == [
        "nope-music (not fetched: rtagger data debian; nor installed)"]
    assert read_manifest(tmp_path / "m.jsonl") == []
    report = build_pool_report(tmp_path / "m.jsonl", [tmp_path / "absent"], progress=False)
    assert "no such file" in report.missing_sources[0]


def test_resume_after_a_killed_build(source, tmp_path, monkeypatch, caplog):
    out = build_pool(tmp_path / "m.jsonl", [source], progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:25])  # killed while writing line 4
    probed = []
    real_probe = pool.probe
    monkeypatch.setattr(pool, "probe", lambda ref, **kw: probed.append(ref) or real_probe(ref))
    with caplog.at_level("WARNING"):
        report = build_pool_report(out, [source], progress=False, resume=True)
    assert "truncated" in caplog.text
    assert report.n_tracks == len(EXPECTED)
    assert len(probed) == len(EXPECTED) - 3 + 2  # new files + the two corrupt ones again
    assert sorted(t.id for t in read_manifest(out)) == sorted(
        t.id for t in read_manifest(build_pool(tmp_path / "fresh.jsonl", [source], False)))


def test_cli_prints_summary_and_failures(source, tmp_path):
    app = typer.Typer()
    data_cli.register(app, typer.Typer())

    @app.command("noop")  # a second command keeps typer from collapsing the group
    def noop() -> None: ...

    out = tmp_path / "cli.jsonl"
    result = CliRunner().invoke(app, ["pool", "--out", str(out), "--source", str(source)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "corrupt.mp3" in result.output
    assert len(read_manifest(out)) == len(EXPECTED)
    result = CliRunner().invoke(app, ["pool", "--out", str(out), "--source", "/nonexistent"])
    assert result.exit_code == 1
    assert "not found" in result.output


def test_packages_come_with_version_licence_kind_and_duplicates_count_once(source, tmp_path,
                                                                            monkeypatch):
    """An unpacked package (as `rtagger data debian` leaves it) feeds the pool with its facts;
    the same recording in a second package (same bytes) is skipped."""
    import shutil

    from rtagger.jsonl import JsonlAppender
    from rtagger.train.data import debian

    d = tmp_path / "debian"
    for name in ("alpha-music", "beta-music"):
        music = d / "root" / name / "usr" / "share" / "games" / name
        shutil.copytree(source / "sub", music)
        doc = d / "root" / name / "usr" / "share" / "doc" / name
        doc.mkdir(parents=True)
        (doc / "copyright").write_text("Files: *\nCopyright: someone\nLicense: CC-BY-SA-3.0\n")
    with JsonlAppender(d / "packages.jsonl") as f:
        for name in ("alpha-music", "beta-music"):
            f.write({"package": name, "version": "1.2-3", "licence": "CC-BY-SA-3.0"})
    pkgs = tuple(debian.PoolPackage(n, (f"usr/share/games/{n}",), k)
                 for n, k in (("alpha-music", "rock"), ("beta-music", "ambient")))
    monkeypatch.setattr(debian, "POOL_PACKAGES", pkgs)
    monkeypatch.setattr(pool, "POOL_PACKAGES", pkgs)
    assert pool.installed_sources(d) == ["alpha-music", "beta-music"]
    report = build_pool_report(tmp_path / "p.jsonl", None, progress=False, debian_dir=d)
    tracks = read_manifest(tmp_path / "p.jsonl")
    assert tracks and {t.extra["package"] for t in tracks} == {"alpha-music"}
    assert {(t.extra["version"], t.extra["licence"], t.extra["kind"]) for t in tracks} == {
        ("1.2-3", "CC-BY-SA-3.0", "rock")}
    assert len({t.extra["sha256"] for t in tracks}) == len(tracks)
    assert len(report.duplicates) == len(tracks)  # beta's copies of the same files
    assert set(report.seconds_by_kind) == {"rock"}


def test_held_out_packages_never_enter_a_pool(tmp_path):
    from rtagger.errors import ConfigError

    for name in ("wesnoth-1.16-music", "nexuiz-music", "musescore-general-soundfont-small"):
        with pytest.raises(ConfigError, match="held out"):
            build_pool_report(tmp_path / "p.jsonl", [name], progress=False)
    from rtagger.train.data.debian import POOL_PACKAGES, is_held_out

    assert not any(is_held_out(p.name) for p in POOL_PACKAGES)


def test_real_debian_packages(tmp_path):
    if not pool.installed_sources():
        pytest.skip("no pool package fetched (rtagger data debian) or installed")
    report = build_pool_report(tmp_path / "real.jsonl", None, progress=False)
    assert report.n_tracks > 0 and report.hours > 0.5
    # a package may ship a broken file (searchandrescue's splash01.wav): named, with a reason
    assert len(report.failures) <= 0.02 * report.n_tracks
    assert all(f.reason for f in report.failures)


def test_a_package_archive_gives_only_its_music_members(tmp_path, monkeypatch):
    """Archives that mix music with effects (0ad's public.zip, openrct2's .parkobj zips)."""
    from rtagger.train.data import debian

    music = tmp_path / "debian" / "root" / "mix-data" / "usr" / "share" / "mix"
    music.mkdir(parents=True)
    for name in ("one.parkobj", "two.parkobj"):
        with zipfile.ZipFile(music / name, "w") as z:
            z.writestr("music/theme.ogg", ogg_bytes(1.0 if name == "one.parkobj" else 1.5))
            z.writestr("sfx/click.ogg", ogg_bytes(0.3))
    pkgs = (debian.PoolPackage("mix-data", ("usr/share/mix/*.parkobj",), "mixed",
                               members=("music/*.ogg",)),)
    monkeypatch.setattr(debian, "POOL_PACKAGES", pkgs)
    monkeypatch.setattr(pool, "POOL_PACKAGES", pkgs)
    build_pool_report(tmp_path / "p.jsonl", None, progress=False, debian_dir=tmp_path / "debian")
    tracks = read_manifest(tmp_path / "p.jsonl")
    assert sorted(t.id for t in tracks) == ["mix-data/one.parkobj!music/theme.ogg",
                                            "mix-data/two.parkobj!music/theme.ogg"]
    assert sorted(round(t.duration, 1) for t in tracks) == [1.0, 1.5]
