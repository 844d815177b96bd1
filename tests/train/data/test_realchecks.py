"""The real checks: labels from MIDI files written here, the build, its manifest, the CLI."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

mido = pytest.importorskip("mido")

from rtagger.errors import ConfigError  # noqa: E402
from rtagger.train.data import debian, realchecks  # noqa: E402
from rtagger.train.data.manifest import read_manifest  # noqa: E402
from rtagger.train.synth import grooves  # noqa: E402
from rtagger.train.synth import midi as synth_midi  # noqa: E402

TPQ = 480
BPM = 120.0  # one beat = 0.5 s


def tick(seconds: float) -> int:
    return round(seconds / 0.5 * TPQ)


def song(parts: list[tuple[int, int, list[tuple[float, float]]]], bpm: float = BPM,
         key: str | None = None) -> mido.MidiFile:
    """A type-1 file: ``(channel, program, [(start_s, end_s), ...])`` per part."""
    midi = mido.MidiFile(type=1, ticks_per_beat=TPQ)
    meta = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=round(60e6 / bpm), time=0)])
    if key:
        meta.append(mido.MetaMessage("key_signature", key=key, time=0))
    midi.tracks.append(meta)
    for channel, program, notes in parts:
        ev = [(0, mido.Message("program_change", channel=channel, program=program))]
        for a, b in notes:
            ev.append((tick(a), mido.Message("note_on", channel=channel, note=60, velocity=90)))
            ev.append((tick(b), mido.Message("note_off", channel=channel, note=60)))
        midi.tracks.append(synth_midi.track_from_abs(ev))
    return midi


def every(step: float, length: float, until: float, start: float = 0.0):
    out, t = [], start
    while t < until:
        out.append((t, t + length))
        t += step
    return out


def to_bytes(midi: mido.MidiFile) -> bytes:
    buf = io.BytesIO()
    midi.save(file=buf)
    return buf.getvalue()


def test_labels_positive_negative_and_unlabelled():
    midi = song([
        (0, 0, every(0.5, 0.2, 30.0)),  # piano staccato all along: bridged into one passage
        (1, 48, [(10.0, 13.0)]),  # a string ensemble for 3 s of 30: plays, too little
        (2, 24, every(1.5, 0.2, 30.0)),  # guitar notes 1.3 s apart: never one passage
        (9, 0, every(0.5, 0.1, 30.0)),  # drums throughout
    ])
    labels, shares, length = realchecks.midi_labels(midi)
    assert length == pytest.approx(29.7)
    assert labels["piano"] == 1 and shares["piano"] > 0.99
    assert labels["drums"] == 1
    assert "strings" not in labels and shares["strings"] == pytest.approx(3 / 29.7, abs=1e-3)
    assert "guitar" not in labels  # plays (20 notes), but only 13 % of the time
    # a string ensemble holds violins and cellos: neither may be called absent
    assert "violin" not in labels and "cello" not in labels
    # absent families and their near programs: negatives
    for tag in ("harpsichord", "organ", "flute", "synth", "harp", "sitar", "choir"):
        assert labels[tag] == 0
    assert set(labels) <= set(realchecks.CHECK_TAGS)


def test_near_programs_bar_a_negative():
    labels, _, _ = realchecks.midi_labels(song([(0, 6, [(0.0, 20.0)])]))  # harpsichord
    assert labels["harpsichord"] == 1 and "piano" not in labels  # piano's near program
    labels, _, _ = realchecks.midi_labels(song([(0, 40, [(0.0, 20.0)])]))  # violin
    assert labels["violin"] == 1 and labels["strings"] == 1 and labels["cello"] == 0
    with pytest.raises(realchecks.RealcheckError, match="no note"):
        realchecks.midi_labels(song([]))


def test_read_midi_gzip_and_a_broken_key_signature():
    data = to_bytes(song([(0, 0, [(0.0, 20.0)])], key="F"))
    at = data.index(b"\xff\x59\x02")
    broken = data[:at + 4] + b"\xff" + data[at + 5:]  # mode 255, as two simutrans files
    with pytest.raises(Exception, match="key"):
        mido.MidiFile(file=io.BytesIO(broken))
    for raw in (broken, gzip.compress(broken)):
        labels, _, _ = realchecks.midi_labels(realchecks.read_midi(raw, "x.mid"))
        assert labels["piano"] == 1
    with pytest.raises(realchecks.RealcheckError, match="not a readable MIDI"):
        realchecks.read_midi(b"MThd" + bytes(3), "bad.mid")


def test_one_piece_in_another_layout_has_the_same_fingerprint():
    parts = [(0, 0, every(1.0, 0.5, 20.0)), (1, 40, [(2.0, 9.0)])]
    a = song(parts)
    b = realchecks.merged(a)
    assert b.type == 0 and len(b.tracks) == 1
    assert realchecks.notes_fingerprint(a) == realchecks.notes_fingerprint(b)
    assert realchecks.notes_fingerprint(a) != realchecks.notes_fingerprint(song(parts[:1]))


def test_sources_are_neither_pool_nor_held_out():
    realchecks.check_sources(realchecks.SOURCES)
    pool = {p.name for p in debian.POOL_PACKAGES}
    assert not {s.package for s in realchecks.SOURCES} & pool
    with pytest.raises(ConfigError, match="pool"):
        realchecks.check_sources([realchecks.MidiSource("freedink-data", ("*.mid",))])
    with pytest.raises(ConfigError, match="held out"):
        realchecks.check_sources([realchecks.MidiSource("planetblupi-music-midi", ("*",))])
    assert not debian.is_held_out(realchecks.SOUNDFONT_PACKAGE)


def test_soundfont_choice(tmp_path):
    with pytest.raises(ConfigError, match="held out"):
        realchecks.resolve_soundfont(tmp_path / "MuseScore_General.sf3", tmp_path)
    training = tmp_path / "TimGM6mb.sf2"
    training.write_bytes(b"RIFF")
    with pytest.warns(UserWarning, match="synthetic training set"):
        assert realchecks.resolve_soundfont(training, tmp_path) == training
    with pytest.raises(ConfigError, match="not found"):
        realchecks.resolve_soundfont(None, tmp_path)


# --- The build, end to end (a .deb built here; FluidSynth renders) ----------------------------
def _fluidsynth_font() -> Path | None:
    if shutil.which("fluidsynth") is None or shutil.which("dpkg-deb") is None:
        return None
    return next((f for f in reversed(grooves.default_soundfonts()) if f.is_file()), None)


needs_fluidsynth = pytest.mark.skipif(_fluidsynth_font() is None,
                                      reason="needs fluidsynth, dpkg-deb and a GM soundfont")
PKG = "demo-midi-music"


def _deb(tmp_path: Path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN" / "control").write_text(
        f"Package: {PKG}\nVersion: 2.0-1\nArchitecture: all\nMaintainer: x <x@x>\n"
        f"Installed-Size: 4\nDescription: test music\n")
    for name, data in files.items():
        (src / "usr/share/games/demo").mkdir(parents=True, exist_ok=True)
        (src / "usr/share/games/demo" / name).write_bytes(data)
    doc = src / "usr/share/doc" / PKG
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: dep5\n\nFiles: *\nLicense: GPL-2+\n")
    deb = tmp_path / f"{PKG}_2.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(src), str(deb)],
                   check=True, capture_output=True)
    return deb


@pytest.fixture
def offline_package(tmp_path, monkeypatch):
    """``fetch_packages`` of a package built here, as `apt-get download` would leave it."""
    piece = to_bytes(song([(0, 0, every(0.5, 0.4, 20.0)), (9, 0, every(0.5, 0.1, 20.0)),
                           (1, 73, [(4.0, 6.0)])]))
    files = {"theme.mid": piece,
             "copy.mid.gz": gzip.compress(piece),  # the same piece again: a duplicate
             "jingle.mid": to_bytes(song([(0, 0, [(0.0, 4.0)])]))}  # under 15 s
    deb = _deb(tmp_path, files)
    monkeypatch.setattr(debian, "_candidate_version", lambda name, env=None: "2.0-1")
    monkeypatch.setattr(debian, "_download",
                        lambda name, debs, env=None: Path(shutil.copy(deb, debs / deb.name)))
    source = realchecks.MidiSource(PKG, ("usr/share/games/demo/*.mid*",))
    monkeypatch.setattr(realchecks, "SOURCES", (source,))
    return source


@needs_fluidsynth
def test_build_renders_labels_and_resumes(tmp_path, offline_package):
    out = tmp_path / "checks"
    with pytest.warns(UserWarning, match="synthetic training set"):
        report = realchecks.build_realchecks(out, soundfont=_fluidsynth_font(), progress=False)
    assert report.n_new == 1 and report.duplicates == [f"{PKG}/usr/share/games/demo/theme.mid"]
    assert [i for i, _ in report.failures] == [f"{PKG}/usr/share/games/demo/jingle.mid"]
    assert json.loads((out / "failures.jsonl").read_text())["reason"].endswith("under 15 s")
    (track,) = read_manifest(out / "manifest.jsonl")
    assert track.id == f"{PKG}/usr/share/games/demo/copy.mid.gz"  # sorted: copy before theme
    assert Path(track.path) == out / "audio" / PKG / "copy.flac" and Path(track.path).is_file()
    assert track.split == "test" and 20.0 < track.duration < 23.0
    assert track.tags == ("piano", "drums")
    assert track.extra["labels"]["piano"] == 1 and track.extra["labels"]["guitar"] == 0
    assert "flute" not in track.extra["labels"]  # 2 s of 20: plays, too little
    assert (track.extra["package"], track.extra["version"], track.extra["licence"]) == (
        PKG, "2.0-1", "GPL-2+")
    assert track.extra["rules"] == realchecks.RULES_VERSION
    rendered = (out / track.extra["midi"]).read_bytes()
    assert realchecks.midi_labels(realchecks.read_midi(rendered, "x"))[0] == \
        track.extra["labels"]  # the labels follow from the very bytes rendered
    raw = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert raw["path"] == f"audio/{PKG}/copy.flac"  # relative to the manifest
    with pytest.warns(UserWarning):
        again = realchecks.build_realchecks(out, soundfont=_fluidsynth_font(), progress=False)
    assert again.n_new == 0 and again.n_kept == 1 and again.n_tracks == 1


@needs_fluidsynth
def test_commands_build_and_score_a_tiny_check(tmp_path, offline_package, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from rtagger.model.checkpoint import build_untrained, save_model
    from rtagger.train.data import cli as data_cli
    from rtagger.train.evaluation import cli as evaluation_cli

    app, data_app, train_app = typer.Typer(), typer.Typer(), typer.Typer()
    data_cli.register(data_app, train_app)
    evaluation_cli.register(data_app, train_app)
    app.add_typer(data_app, name="data")
    app.add_typer(train_app, name="train")
    out = tmp_path / "checks"
    with pytest.warns(UserWarning, match="synthetic training set"):
        res = CliRunner().invoke(app, ["data", "realchecks", "--out", str(out),
                                       "--soundfont", str(_fluidsynth_font())])
    assert res.exit_code == 1, res.output  # the jingle fails; the others are built
    assert "jingle.mid" in res.output and PKG in res.output
    assert len(read_manifest(out / "manifest.jsonl")) == 1
    bad = CliRunner().invoke(app, ["data", "realchecks", "--out", str(out), "-p", "nexuiz"])
    assert bad.exit_code == 2 and "not check sources" in bad.output

    model = save_model(build_untrained("debug", seed=1), tmp_path / "m.safetensors")
    teacher = resources.files("rtagger.train.teachers").joinpath("MTT_vgg.safetensors")
    score = ["train", "realcheck", "--checks", str(out / "manifest.jsonl"), "--model",
             str(model), "--musicnn", str(teacher), "--bootstrap", "20"]
    res = CliRunner().invoke(app, [*score, "--out", str(tmp_path / "r.json"),
                                   "--markdown", str(tmp_path / "r.md")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checks"]["tracks"] == 1
    assert report["scorable_tags"] == []  # one track has no negatives: nothing is scored
    assert set(report["systems"]) == {"untrained:debug", "MTT_vgg"}
    scores = report["scores"]
    assert 0.0 <= scores["MTT_vgg"][0][scores["tags"].index("piano")] <= 1.0
    assert scores["MTT_vgg"][0][scores["tags"].index("bass")] is None  # MTT has no bass
    assert (tmp_path / "r.md").read_text().startswith("# Real checks")
    assert len(list((out / "scores").glob("*.jsonl"))) == 2  # one score log per system

    def no_decoding(*args, **kwargs):
        raise AssertionError("every score was cached: nothing to decode")

    monkeypatch.setattr("rtagger.audio.decode.load_audio", no_decoding)
    res = CliRunner().invoke(app, [*score, "--out", str(tmp_path / "r2.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r2.json").read_text())["scores"] == scores
