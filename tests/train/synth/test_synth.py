"""Synthetic benchmark: tag rules on hand-built MIDI, song plans, and real small builds.

The rule tests need only mido. Planning reads MMA's groove library; building needs the apt
packages mma, fluidsynth, fluid-soundfont-gm and timgm6mb-soundfont (CI installs them; the
skips are only a guard for machines without them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

mido = pytest.importorskip("mido")

from rtagger.train.synth import arrange, build, grooves, labels, plan  # noqa: E402
from rtagger.train.synth import cli as synth_cli  # noqa: E402
from rtagger.train.synth import midi as synth_midi  # noqa: E402

TPQ = 480


def _have_mma_lib() -> bool:
    try:
        grooves.mma_lib_dir()
    except grooves.SynthError:
        return False
    return True


HAVE_MMA_LIB = _have_mma_lib()
HAVE_TOOLS = (
    HAVE_MMA_LIB
    and shutil.which("mma") is not None
    and shutil.which("fluidsynth") is not None
    and all(p.is_file() for p in grooves.default_soundfonts())
)
needs_mma_lib = pytest.mark.skipif(not HAVE_MMA_LIB, reason="MMA groove library missing")
needs_tools = pytest.mark.skipif(
    not HAVE_TOOLS, reason="apt packages mma fluidsynth fluid-soundfont-gm timgm6mb-soundfont"
)


# --- Hand-built MIDI ------------------------------------------------------------------------
def new_midi(bpm: float = 120.0) -> mido.MidiFile:
    midi = mido.MidiFile(type=1, ticks_per_beat=TPQ)
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=round(60e6 / bpm), time=0))
    midi.tracks.append(track)
    return midi


def beats(seconds: float, bpm: float = 120.0) -> int:
    return round(seconds * bpm / 60.0 * TPQ)


def add_track(midi: mido.MidiFile, events: list[tuple[int, mido.Message]]) -> None:
    midi.tracks.append(synth_midi.track_from_abs(events))


def notes_track(channel: int, program: int, notes: list[tuple[float, float, int]],
                bpm: float = 120.0) -> list[tuple[int, mido.Message]]:
    """(start_s, end_s, pitch) notes at a constant tempo -> absolute-tick events."""
    ev = [(0, mido.Message("program_change", channel=channel, program=program))]
    for start, end, pitch in notes:
        ev.append((beats(start, bpm), mido.Message("note_on", channel=channel, note=pitch,
                                                   velocity=90)))
        ev.append((beats(end, bpm), mido.Message("note_off", channel=channel, note=pitch)))
    ev.sort(key=lambda e: (e[0], e[1].type == "note_on"))
    return ev


def drum_track(onsets_s: list[float], bpm: float = 120.0) -> list[tuple[int, mido.Message]]:
    ev = []
    for t in onsets_s:
        ev.append((beats(t, bpm), mido.Message("note_on", channel=9, note=36, velocity=100)))
        ev.append((beats(t, bpm) + 60, mido.Message("note_off", channel=9, note=36)))
    return ev


def pad_to(midi: mido.MidiFile, seconds: float, bpm: float = 120.0) -> None:
    """Make the file last ``seconds`` (a silent marker at the end)."""
    synth_midi.add_marker(midi, beats(seconds, bpm), "end")


def test_vocabulary_and_program_families() -> None:
    vocab = labels.tag_vocabulary()
    assert len(vocab) == 36
    instruments = set(labels.tags_in_group("instrument"))
    assert set(labels.INSTRUMENT_PROGRAMS) == instruments - {"drums"}
    seen: set[int] = set()
    for ranges in labels.INSTRUMENT_PROGRAMS.values():
        for r in ranges:
            assert seen.isdisjoint(r)
            seen |= set(r)
    assert {labels.program_tag(p) for p in (46, 47, 55, 96, 127)} == {None}
    assert labels.program_tag(21) == "accordion" and labels.program_tag(51) == "strings"


def test_instrument_rule_counts_the_union_of_notes() -> None:
    midi = new_midi()
    # piano: 1.5 s + an overlapping 0.5 s note -> union 1.5 s (the sum would be 2.0 s)
    add_track(midi, notes_track(0, 0, [(0.0, 1.5, 60), (1.0, 1.5, 64)]))
    # organ: exactly 2.0 s in two pieces -> tagged
    add_track(midi, notes_track(1, 16, [(0.0, 1.5, 60), (3.0, 3.5, 62)]))
    # drum channel notes never count as an instrument, whatever its program
    add_track(midi, [(0, mido.Message("program_change", channel=9, program=0)),
                     *drum_track([0.5 * i for i in range(7)])])
    pad_to(midi, 10.0)
    tags = labels.midi_tags(midi, ["rock"])
    assert "piano" not in tags and "organ" in tags
    assert "drums" not in tags  # 7 drum notes
    assert tags[0] == "rock"


def test_program_at_note_onset_decides_the_family() -> None:
    midi = new_midi()
    ev = notes_track(0, 0, [(0.0, 2.5, 60), (3.0, 5.5, 62)])
    ev.append((beats(2.8), mido.Message("program_change", channel=0, program=26)))
    ev.sort(key=lambda e: e[0])
    add_track(midi, ev)
    add_track(midi, drum_track([0.5 * i for i in range(8)]))
    tags = labels.midi_tags(midi, [])
    assert {"piano", "guitar", "drums"} <= set(tags)


@pytest.mark.parametrize(("bpm", "expected"), [
    (89, {"slow"}), (90, set()), (139, set()), (140, {"fast"}), (60, {"slow"}), (200, {"fast"}),
])
def test_tempo_tags_at_the_boundaries(bpm: float, expected: set[str]) -> None:
    midi = new_midi(bpm)
    add_track(midi, notes_track(0, 0, [(0.0, 3.0, 60)], bpm))
    assert set(labels.midi_tags(midi, [])) & {"slow", "fast"} == expected


def tempo_song(first_bpm: float, second_bpm: float, change_s: float,
               total_s: float) -> mido.MidiFile:
    midi = new_midi(first_bpm)
    change_tick = beats(change_s, first_bpm)
    end_tick = change_tick + beats(total_s - change_s, second_bpm)
    synth_midi.set_tempo_from(midi, change_tick, second_bpm)
    synth_midi.add_marker(midi, end_tick, "end")
    return midi


def test_dominant_tempo_and_tempo_change_rule() -> None:
    midi = tempo_song(80, 150, 20.0, 60.0)  # 20 s slow, 40 s fast
    info = labels.analyse(midi)
    assert info.duration == pytest.approx(60.0, abs=0.01)
    tags = set(labels.midi_tags(midi, []))
    assert "fast" in tags and "slow" not in tags and "tempo_change" in tags
    # 10 % change: too small
    assert "tempo_change" not in labels.midi_tags(tempo_song(100, 110, 24.0, 60.0), [])
    # at 20 % of the duration: too early
    assert "tempo_change" not in labels.midi_tags(tempo_song(100, 130, 12.0, 60.0), [])
    # new tempo lasts 14 s: too short (the change sits at 65 % of 40 s)
    assert "tempo_change" not in labels.midi_tags(tempo_song(100, 130, 26.0, 40.0), [])
    assert "tempo_change" in labels.midi_tags(tempo_song(100, 130, 24.0, 40.0), [])


def breakdown_song(gap: tuple[float, float], total_s: float) -> mido.MidiFile:
    midi = new_midi()
    onsets = [0.5 * i for i in range(int(total_s * 2)) if not gap[0] < 0.5 * i < gap[1]]
    add_track(midi, drum_track(onsets))
    pad_to(midi, total_s)
    return midi


def test_breakdown_rule() -> None:
    tags = labels.midi_tags(breakdown_song((20.0, 30.0), 60.0), [])
    assert "breakdown" in tags and "drums" in tags
    onsets = labels.analyse(breakdown_song((20.0, 30.0), 60.0)).drum_onsets
    found = labels.find_breakdown(onsets, 60.0)
    assert found == {"start": 20.0, "end": 30.0}
    assert "breakdown" not in labels.midi_tags(breakdown_song((20.0, 27.5), 60.0), [])  # 7.5 s
    # starts before 20 % (12 s): only 12-17 s counts, too short
    assert "breakdown" not in labels.midi_tags(breakdown_song((7.0, 17.0), 60.0), [])
    # drums sound 10 s after it in a 40 s song (onsets 30-39.5 s, then a 0.5 s tail), 9 s in 39 s
    assert "breakdown" in labels.midi_tags(breakdown_song((20.0, 30.0), 40.0), [])
    assert "breakdown" not in labels.midi_tags(breakdown_song((20.0, 30.0), 39.0), [])
    # ends after 90 %: 45-54 s of a 60 s song leaves 9 s: the rule clips it to 45-54 and the
    # drums after it last 6 s only
    assert "breakdown" not in labels.midi_tags(breakdown_song((45.0, 56.0), 60.0), [])


def test_key_change_rule_reads_the_generator_markers() -> None:
    def song(at_s: float, semis: int, total_s: float = 50.0) -> mido.MidiFile:
        midi = new_midi()
        add_track(midi, notes_track(0, 0, [(0.0, total_s, 60)]))
        synth_midi.add_marker(midi, 0, synth_midi.key_marker(9, "minor"))
        synth_midi.add_marker(midi, beats(at_s), synth_midi.key_change_marker(semis))
        return midi

    tags = labels.midi_tags(song(25.0, -3), [])
    assert "key_change" in tags and "minor" in tags and "major" not in tags
    assert "key_change" not in labels.midi_tags(song(25.0, 7), [])  # more than 6 semitones
    assert "key_change" not in labels.midi_tags(song(36.0, 2), [])  # after 70 %
    assert "key_change" not in labels.midi_tags(song(32.0, 2, 45.0), [])  # new key lasts 13 s
    keys = labels.midi_timeline(song(25.0, -3))["keys"]
    assert keys == [[0.0, 25.0, "A", "minor"], [25.0, 50.0, "Gb", "minor"]]


def test_transpose_keeps_sustained_notes_and_drums() -> None:
    midi = new_midi()
    add_track(midi, notes_track(0, 0, [(0.0, 4.0, 60), (1.0, 1.5, 60), (3.0, 3.5, 64)]))
    add_track(midi, drum_track([0.0, 3.0]))
    synth_midi.transpose_from(midi, beats(2.0), 5)
    notes = synth_midi.collect_notes(midi)
    pitched = sorted((n.start_s, n.end_s, n.pitch) for n in notes if n.channel == 0)
    # the re-struck C at 1 s releases the first one (FluidSynth does the same)
    assert pitched == [(0.0, 1.0, 60), (1.0, 1.5, 60), (3.0, 3.5, 69)]
    assert {n.pitch for n in notes if n.channel == 9} == {36}
    # a key sounding across the change and re-struck after it: the old pitch is released
    midi = new_midi()
    add_track(midi, notes_track(0, 0, [(0.0, 4.0, 60), (3.0, 3.5, 60)]))
    synth_midi.transpose_from(midi, beats(2.0), 5)
    pitched = sorted((n.start_s, n.end_s, n.pitch) for n in synth_midi.collect_notes(midi))
    assert pitched == [(0.0, 3.0, 60), (3.0, 3.5, 65)]


def test_remove_drums_and_placement_satisfy_the_rule() -> None:
    import random

    midi = new_midi()
    add_track(midi, drum_track([0.5 * i for i in range(120)]))
    pad_to(midi, 60.0)
    bars = [beats(2.0 * b) for b in range(30)]  # 4/4 at 120 bpm: a bar is 2 s
    placed = arrange.place_breakdown(midi, bars, random.Random(1))
    assert placed is not None
    info = labels.analyse(midi)
    start = synth_midi.TempoMap(midi).seconds(placed["start_tick"])
    end = synth_midi.TempoMap(midi).seconds(placed["end_tick"])
    assert not [t for t in info.drum_onsets if start <= t < end]
    assert end - start >= labels.BREAKDOWN_MIN_S
    assert "breakdown" in labels.midi_tags(midi, [])
    # no unmatched note-offs were left behind
    offs = sum(1 for tr in midi.tracks for m in tr if m.type == "note_off")
    assert offs == len(info.drum_onsets)


def _breakdown_song(saxophone_s: float) -> dict:
    """60 s of jazz in C major: drums with a 10 s gap at 20 s, piano 0-10 s, saxophone from
    40 s for ``saxophone_s``; its manifest record (tags and timeline)."""
    midi = new_midi()
    onsets = [0.5 * i for i in range(120) if not 20.0 <= 0.5 * i < 30.0]
    add_track(midi, drum_track(onsets))
    add_track(midi, notes_track(0, 0, [(0.0, 10.0, 60)]))
    add_track(midi, notes_track(1, 65, [(40.0, 40.0 + saxophone_s, 70)]))
    synth_midi.add_marker(midi, 0, synth_midi.key_marker(0, "major"))
    pad_to(midi, 60.0)
    return {"tags": labels.midi_tags(midi, ["jazz"]), "timeline": labels.midi_timeline(midi)}


def test_window_labels_follow_the_timeline() -> None:
    record = _breakdown_song(1.0)
    assert "saxophone" not in record["tags"]  # 1 s only
    assert labels.window_labels(record, 0.0, 3.69) == {"jazz", "piano", "drums", "major"}
    inside = labels.window_labels(record, 22.0, 25.69)
    assert "drums" not in inside and "breakdown" in inside and "piano" not in inside
    # 1 s of saxophone is enough in a 1.5 s window (half the window), not in a 3.69 s one
    assert "saxophone" in labels.window_labels(record, 39.8, 41.3)
    assert "saxophone" not in labels.window_labels(record, 39.0, 42.69)
    with pytest.raises(labels.MidiRuleError):
        labels.window_labels(record, 5.0, 5.0)


# --- Plans (need MMA's groove library) ------------------------------------------------------
@needs_mma_lib
def test_test_split_grooves_never_reach_train_or_valid() -> None:
    test_keys = {g.key for g in grooves.groove_files("test")}
    assert test_keys and test_keys.isdisjoint(g.key for g in grooves.groove_files("train"))
    for split in ("train", "valid"):
        used = {plan.plan_song(split, i).groove_file for i in range(200)}
        assert used.isdisjoint(test_keys)
    assert {plan.plan_song("test", i).groove_file for i in range(50)} <= test_keys


@needs_mma_lib
def test_plans_are_deterministic() -> None:
    a = plan.plan_song("train", 7, seed=3)
    assert a == plan.plan_song("train", 7, seed=3)
    assert a != plan.plan_song("train", 7, seed=4)
    assert a != plan.plan_song("train", 7, seed=3, attempt=1)
    assert plan.mma_source(a) == plan.mma_source(plan.plan_song("train", 7, seed=3))
    assert a.id == "synth-train-s3-00007"
    gf = next(g for g in grooves.groove_files() if g.key == a.groove_file)
    lo, hi = grooves.tempo_range_bpm(gf, a.groove)
    assert lo <= a.tempo_bpm <= hi


@needs_mma_lib
def test_plan_mix_of_leads_and_events() -> None:
    plans = [plan.plan_song("train", i) for i in range(200)]
    families = {labels.program_tag(p.lead_program) for p in plans if p.lead_program is not None}
    assert len(families) >= 9  # lead instruments span many GM families
    for event in ("key_change", "tempo_change", "breakdown"):
        share = sum(getattr(p, event) for p in plans) / len(plans)
        assert 0.15 < share < 0.35
    assert {p.mode for p in plans} == {"major", "minor"}
    assert all(p.progression[0][0][1] in ("", "M7", "6", "7", "m", "m7") for p in plans)


def test_train_refuses_foreign_soundfonts(tmp_path: Path) -> None:
    with pytest.raises(grooves.SynthError, match="held-out"):
        build.run_build(tmp_path, "train", 1, soundfonts=[tmp_path / "Other.sf2"])


def test_missing_tools_name_the_apt_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grooves.shutil, "which", lambda name: None)
    with pytest.raises(grooves.SynthError) as err:
        grooves.check_tools()
    msg = str(err.value)
    assert "apt-get install" in msg
    assert "mma fluidsynth fluid-soundfont-gm timgm6mb-soundfont" in msg


def test_cli_registers_the_synth_command(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    synth_cli.register(app, typer.Typer())

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer from flattening "synth"
        """Nothing."""

    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--help"])
    assert res.exit_code == 0
    for opt in ("--split", "--songs", "--out", "--seed", "--jobs", "--min-seconds",
                "--max-seconds", "--soundfont"):
        assert opt in res.output
    res = runner.invoke(app, ["synth", "--split", "valid", "--songs", "1", "--out",
                              str(tmp_path), "--soundfont", str(tmp_path / "x.sf2")])
    assert res.exit_code == 1
    assert "held-out" in res.output


# --- Real builds ------------------------------------------------------------------------------
def sounding_by_family(midi: mido.MidiFile) -> tuple[dict[str, float], list[float]]:
    """An independent reading of the rules, through mido's own timing (``for msg in midi``)."""
    now = 0.0
    program = [0] * 16
    open_notes: dict[tuple[int, int], list[tuple[float, int]]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    drums = []
    for msg in midi:
        now += msg.time
        if msg.type == "program_change":
            program[msg.channel] = msg.program
        elif msg.type == "note_on" and msg.velocity > 0:
            if msg.channel == 9:
                drums.append(now)
            else:
                key = (msg.channel, msg.note)
                open_notes.setdefault(key, []).append((now, program[msg.channel]))
        elif msg.type in ("note_on", "note_off") and msg.channel != 9:
            stack = open_notes.get((msg.channel, msg.note))
            if stack:
                start, prog = stack.pop(0)
                fam = labels.program_tag(prog)
                if fam:
                    spans.setdefault(fam, []).append((start, now))
    totals = {}
    for fam, iv in spans.items():
        iv.sort()
        total, cur_s, cur_e = 0.0, None, None
        for s, e in iv:
            if cur_e is None or s > cur_e:
                total += (cur_e - cur_s) if cur_e is not None else 0.0
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        totals[fam] = total + (cur_e - cur_s)
    return totals, drums


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def structured_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_struct")
    return build.run_build(out, "train", 2, seed=1, jobs=2, min_s=40, max_s=46,
                           progress=False, force_structure=True).manifest


@needs_tools
def test_build_tags_match_the_rendered_midi(structured_build: Path) -> None:
    from rtagger.audio.decode import SAMPLE_RATE, load_audio

    records = read_manifest(structured_build)
    assert [r["index"] for r in records] == [0, 1]
    train_grooves = {g.key for g in grooves.groove_files("train")}
    seen_events: set[str] = set()
    for rec in records:
        assert rec["split"] == "train" and rec["groove"] in train_grooves
        assert rec["soundfont"] in grooves.GM_SOUNDFONTS
        root = structured_build.parent
        midi = mido.MidiFile(root / rec["midi"])
        assert labels.midi_tags(midi, rec["tags"]) == rec["tags"]  # tags recomputed from the file
        totals, drums = sounding_by_family(midi)
        for fam, total in totals.items():
            if abs(total - labels.INSTRUMENT_MIN_S) > 0.01:
                assert (fam in rec["tags"]) == (total >= labels.INSTRUMENT_MIN_S), fam
        assert ("drums" in rec["tags"]) == (len(drums) >= 8)
        events = rec["timeline"]["events"]
        assert set(events) == {"key_change", "tempo_change", "breakdown"} & set(rec["tags"])
        seen_events |= set(events)
        if "breakdown" in events:
            bd = events["breakdown"]
            assert bd["end"] - bd["start"] >= 8.0
            assert not [t for t in drums if bd["start"] + 1e-3 < t < bd["end"] - 1e-3]
            mid = (bd["start"] + bd["end"]) / 2
            window = labels.window_labels(rec, mid - 1.8, mid + 1.8)
            assert "drums" not in window and "breakdown" in window
        if "tempo_change" in events:
            assert len(rec["timeline"]["tempos"]) == 2
        # audio: decodes, 16 kHz mono, as long as the manifest says, not silent
        import av

        with av.open(str(root / rec["path"])) as container:
            stream = container.streams.audio[0]
            assert (stream.rate, stream.channels) == (SAMPLE_RATE, 1)
        audio = load_audio(root / rec["path"])
        assert len(audio) / SAMPLE_RATE == pytest.approx(rec["duration"], abs=0.01)
        assert rec["timeline"]["duration"] <= rec["duration"] <= rec["timeline"]["duration"] + 2.1
        assert np.sqrt(np.mean(audio**2)) > 0.03
        assert 38 <= rec["timeline"]["duration"] <= 60
    assert seen_events == {"key_change", "tempo_change", "breakdown"}


@needs_tools
def test_resume_renders_only_missing_songs(tmp_path: Path) -> None:
    kw = {"seed": 5, "min_s": 6, "max_s": 10, "progress": False}
    first = build.run_build(tmp_path, "valid", 2, jobs=2, **kw)
    assert (first.rendered, first.skipped, first.failed) == (2, 0, [])
    stamps = {p.name: os.stat(p).st_mtime_ns for p in (tmp_path / "audio").iterdir()}
    with open(first.manifest, "a") as f:
        f.write('{"id": "half a line')  # a build killed while writing
    second = build.run_build(tmp_path, "valid", 3, jobs=2, **kw)
    assert (second.rendered, second.skipped) == (1, 2)
    records = read_manifest(second.manifest)
    assert [r["index"] for r in records] == [0, 1, 2]
    for name, stamp in stamps.items():
        assert os.stat(tmp_path / "audio" / name).st_mtime_ns == stamp
    assert all(r["split"] == "valid" and 5 <= r["timeline"]["duration"] <= 13 for r in records)
    # other options in the same folder are refused, not mixed
    with pytest.raises(grooves.SynthError, match="other options"):
        build.run_build(tmp_path, "valid", 3, jobs=1, seed=6, min_s=6, max_s=10, progress=False)
    # the same song built elsewhere is identical (MIDI bytes and samples)
    again = build.run_build(tmp_path / "again", "valid", 1, jobs=1, **kw)
    rec0 = read_manifest(again.manifest)[0]
    assert rec0 == records[0]
    midi_bytes = (tmp_path / rec0["midi"]).read_bytes()
    assert (tmp_path / "again" / rec0["midi"]).read_bytes() == midi_bytes
    from rtagger.audio.decode import load_audio

    np.testing.assert_array_equal(load_audio(tmp_path / "again" / rec0["path"]),
                                  load_audio(tmp_path / rec0["path"]))


@needs_tools
def test_failing_songs_are_retried_then_reported(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = build.synthesize_song
    calls: list[tuple[int, int]] = []

    def flaky(song: plan.SongPlan, out_dir: str | Path, rate: int) -> dict:
        calls.append((song.index, song.attempt))
        if song.index == 1 or song.attempt == 0:
            raise grooves.SynthError("fluidsynth exited with 1 (simulated)")
        return real(song, out_dir, rate)

    monkeypatch.setattr(build, "synthesize_song", flaky)
    res = build.run_build(tmp_path, "train", 2, seed=2, jobs=1, min_s=6, max_s=8,
                          progress=False)
    assert res.rendered == 1 and [i for i, _ in res.failed] == [1]
    assert calls.count((1, 0)) == 1 and len([c for c in calls if c[0] == 1]) == build.MAX_ATTEMPTS
    (record,) = read_manifest(res.manifest)
    assert record["attempt"] == 1 and record["seed"] == plan.song_seed("train", 2, 0, 1)
    failures = read_manifest(tmp_path / "failures.jsonl")
    assert failures[0]["index"] == 1 and "simulated" in failures[0]["error"]


def test_prefix_labels_hold_only_what_has_been_heard() -> None:
    record = _breakdown_song(5.0)
    assert {"breakdown", "saxophone"} <= set(record["tags"])
    tags, undecided = labels.prefix_labels(record, 15.0)
    assert tags == {"jazz", "piano", "drums", "major"} and not undecided
    # 10 s of silent drums: a breakdown is possible but not yet heard to end
    tags, undecided = labels.prefix_labels(record, 29.0)
    assert "breakdown" not in tags and undecided == {"breakdown"}
    tags, undecided = labels.prefix_labels(record, 25.0)  # 5 s of silence: no breakdown yet
    assert "breakdown" not in tags and not undecided
    # drums back for PREFIX_HEARD_S: the breakdown is heard; the saxophone not yet
    tags, undecided = labels.prefix_labels(record, 30.0 + labels.PREFIX_HEARD_S)
    assert "breakdown" in tags and "saxophone" not in tags and not undecided
    assert labels.prefix_labels(record, 60.0) == (set(record["tags"]), set())
    with pytest.raises(labels.MidiRuleError):
        labels.prefix_labels(record, 0.0)
