"""Simulated DJ mixes (crossfades, subsets, tempo matching) and the segmentation evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_audio
from typer.testing import CliRunner

from rtagger.audio.decode import SAMPLE_RATE, load_audio
from rtagger.audio.signals import music_like
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import save_model
from rtagger.train.data.manifest import Track, write_manifest
from rtagger.train.data.windows import labelled_subset
from rtagger.train.evaluation.mixes import (
    Transition,
    boundary_scores,
    build_mixes,
    estimate_tempo,
    evaluate_segmentation,
    match_speed,
    read_mixes,
    select_tracks,
    varispeed,
)


def clicks(bpm: float, seconds: float, seed: int = 0) -> np.ndarray:
    """A 1 kHz click on every beat over a faint noise floor: ``(n,)`` float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    x = 0.002 * rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    t = np.arange(int(0.03 * SAMPLE_RATE)) / SAMPLE_RATE
    click = (0.8 * np.exp(-t / 0.005) * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    for start_s in np.arange(rng.uniform(0, 0.3), seconds, 60 / bpm):
        i = int(start_s * SAMPLE_RATE)
        seg = click[: x.size - i]
        x[i : i + seg.size] += seg
    return x


def click_tracks(folder, bpms: list[float], seconds: float) -> list[Track]:
    tracks = []
    for i, bpm in enumerate(bpms):
        p = write_audio(folder / f"c{i}.flac", clicks(bpm, seconds, seed=i), SAMPLE_RATE,
                        "flac", "s16")
        tracks.append(Track(f"c{i}", str(p), (), "test", seconds))
    return tracks


def test_boundary_scores_match_one_to_one_within_tolerance():
    s = boundary_scores([30.0, 60.0, 90.0], [31.0, 32.0, 70.0, 89.5], 120.0, 3.0)
    assert (s["hits"], s["false"], s["true"], s["found"]) == (2, 2, 3, 4)
    # a 16 s crossfade around 60 s: 70 s lies inside it (60 + 8 + 3 s reach), 89.5 s still hits
    s = boundary_scores([30.0, 60.0, 90.0], [31.0, 32.0, 70.0, 89.5], 120.0, 3.0,
                        [0.0, 8.0, 0.0])
    assert (s["hits"], s["false"]) == (3, 1)


@pytest.fixture()
def songs(tmp_path):
    tracks = []
    for i in range(3):
        p = write_audio(tmp_path / f"s{i}.flac", music_like(6.0, seed=i), SAMPLE_RATE, "flac",
                        "s16")
        tracks.append(Track(f"s{i}", str(p), (), "test", 6.0))
    return tracks


def test_mixes_have_true_boundaries_and_resume(songs, tmp_path):
    mixes = build_mixes(songs, tmp_path / "mixes", 2, tracks_per_mix=3, max_crossfade_s=2.0,
                        seed=1, progress=False)
    for m in mixes:
        audio = load_audio(m.path)
        assert len(m.boundaries_s) == 2 and len(m.track_ids) == 3
        assert abs(len(audio) / SAMPLE_RATE - m.duration_s) < 0.01
        assert 4.0 < m.boundaries_s[0] < 6.0 < m.boundaries_s[1] < 12.0
    again = build_mixes(songs, tmp_path / "mixes", 2, tracks_per_mix=3, max_crossfade_s=2.0,
                        seed=1, progress=False)
    assert again == mixes and len(read_mixes(tmp_path / "mixes")) == 2


def test_segmentation_evaluation_runs_the_live_session(songs, tmp_path, debug_model):
    mixes = build_mixes(songs, tmp_path / "mixes", 1, tracks_per_mix=3, seed=0,
                        progress=False)
    ckpt = save_model(debug_model, tmp_path / "m.safetensors")
    r = evaluate_segmentation(ckpt, mixes, hop_s=1.0, progress=False)
    assert r["true"] == 2 and r["mixes"] == 1
    assert 0.0 <= r["f_measure"] <= 1.0 and np.isfinite(r["false_per_hour"])


def test_a_sweep_tags_once_and_scores_every_setting(songs, tmp_path, debug_model):
    from rtagger.pipeline.session import SegmenterConfig
    from rtagger.train.evaluation.mixes import sweep_segmentation

    mixes = build_mixes(songs, tmp_path / "mixes", 1, tracks_per_mix=3, seed=0,
                        progress=False)
    ckpt = save_model(debug_model, tmp_path / "m.safetensors")
    r = sweep_segmentation(ckpt, mixes, [-1.0, 2.1], [1, 2], hop_s=1.0,
                           base=SegmenterConfig(min_segment_s=1.0), progress=False)
    grid = {(g["threshold"], g["confirm"]): g for g in r["grid"]}
    assert set(grid) == {(-1.0, 1), (-1.0, 2), (2.1, 1), (2.1, 2)}
    assert grid[(2.1, 1)]["found"] == 0  # no window is ever that far: no boundary
    assert grid[(-1.0, 1)]["found"] > 0  # every window is novel: a boundary when allowed
    assert r["best"]["f_measure"] == max(g["f_measure"] for g in r["grid"])
    wide = sweep_segmentation(ckpt, mixes, [-1.0], [1], hop_s=1.0, within_crossfade=True,
                              base=SegmenterConfig(min_segment_s=1.0), progress=False)
    assert wide["grid"][0]["within_crossfade"] and not grid[(-1.0, 1)]["within_crossfade"]
    assert wide["grid"][0]["hits"] >= grid[(-1.0, 1)]["hits"]


@pytest.mark.parametrize("bpm", [100.0, 128.0, 72.0, 165.0])
def test_the_tempo_of_a_click_track_is_found(bpm):
    assert estimate_tempo(clicks(bpm, 12.0)) == pytest.approx(bpm, rel=0.02)


def test_no_pulse_no_tempo():
    assert estimate_tempo(np.zeros(10 * SAMPLE_RATE, np.float32)) is None
    assert estimate_tempo(clicks(120.0, 1.0)) is None  # shorter than two slowest beats


def test_the_speed_meets_the_tempo_or_its_octave_within_the_fader_range():
    assert match_speed(128.0, 125.0) == pytest.approx(128 / 125, abs=1 / SAMPLE_RATE)
    assert match_speed(128.0, 66.0) == pytest.approx(128 / 132, abs=1 / SAMPLE_RATE)  # double
    assert match_speed(70.0, 136.0) == pytest.approx(140 / 136, abs=1 / SAMPLE_RATE)  # half
    assert match_speed(128.0, 100.0) == 1.0  # 28 % away: left as it is
    assert match_speed(None, 120.0) == 1.0


def test_varispeed_changes_length_and_tempo_together():
    x = clicks(120.0, 10.0)
    y = varispeed(x, 1.05)
    assert abs(len(y) - len(x) / 1.05) <= 2
    assert estimate_tempo(y) == pytest.approx(126.0, rel=0.005)


def test_a_tempo_matched_mix_records_its_speeds_and_true_boundaries(tmp_path):
    tracks = click_tracks(tmp_path, [120.0, 125.0, 116.0], 10.0)
    (mix,) = build_mixes(tracks, tmp_path / "mixes", 1, tracks_per_mix=3, min_crossfade_s=2.0,
                         max_crossfade_s=3.0, tempo_match=True, seed=3, progress=False)
    t0, t1 = mix.transitions
    true = {t.id: bpm for t, bpm in zip(tracks, [120.0, 125.0, 116.0], strict=True)}
    first, second, third = (true[i] for i in mix.track_ids)
    assert t0.tempo_out_bpm == pytest.approx(first, rel=0.01)
    assert t0.tempo_in_bpm == pytest.approx(second, rel=0.01)
    assert t1.tempo_in_bpm == pytest.approx(third, rel=0.01)
    for t in (t0, t1):  # every track is brought to the first one's tempo
        assert t.speed != 1.0
        assert t.speed == pytest.approx(t.tempo_out_bpm / t.tempo_in_bpm, abs=2e-4)
        assert t.tempo_out_bpm == pytest.approx(t0.tempo_out_bpm, abs=0.02)
    # the output timeline: the second and third tracks last 10 s / their speed
    f0, f1 = t0.crossfade_s, t1.crossfade_s
    second_s = 10.0 / t0.speed
    assert mix.boundaries_s[0] == pytest.approx(10.0 - f0 / 2, abs=2e-3)
    assert mix.boundaries_s[1] == pytest.approx(10.0 + second_s - f0 - f1 / 2, abs=2e-3)
    audio = load_audio(mix.path)
    assert len(audio) / SAMPLE_RATE == pytest.approx(
        10.0 + second_s + 10.0 / t1.speed - f0 - f1, abs=2e-3)
    # and the second track really plays at the first one's tempo
    alone = audio[int((10.0 + 0.1) * SAMPLE_RATE) : int((10.0 + second_s - f0 - f1 - 0.1)
                                                         * SAMPLE_RATE)]
    assert estimate_tempo(alone) == pytest.approx(first, rel=0.01)


def test_tempos_further_apart_than_the_fader_are_left_alone(tmp_path):
    tracks = click_tracks(tmp_path, [100.0, 140.0], 6.0)
    (mix,) = build_mixes(tracks, tmp_path / "mixes", 1, tracks_per_mix=2, tempo_match=True,
                         progress=False)
    assert mix.transitions[0].speed == 1.0
    assert mix.duration_s == pytest.approx(12.0 - mix.transitions[0].crossfade_s, abs=2e-3)


def test_crossfades_respect_min_and_max_and_excerpts_the_middle(songs, tmp_path):
    mixes = build_mixes(songs, tmp_path / "mixes", 6, tracks_per_mix=3, min_crossfade_s=1.0,
                        max_crossfade_s=1.5, max_track_s=4.0, seed=5, progress=False)
    fades = [t.crossfade_s for m in mixes for t in m.transitions]
    assert len(fades) == 12 and all(1.0 <= f <= 1.5 for f in fades)  # no hard cuts
    for m in mixes:
        assert [t.speed for t in m.transitions] == [1.0, 1.0]
        assert m.duration_s == pytest.approx(12.0 - sum(t.crossfade_s for t in m.transitions),
                                             abs=2e-3)
        assert m.boundaries_s[0] == pytest.approx(4.0 - m.transitions[0].crossfade_s / 2,
                                                  abs=2e-3)
    excerpt = load_audio(mixes[0].path)[: 2 * SAMPLE_RATE]
    whole = load_audio(songs[[s.id for s in songs].index(mixes[0].track_ids[0])].path)
    assert np.allclose(excerpt, whole[SAMPLE_RATE : 3 * SAMPLE_RATE], atol=1e-3)


def test_the_subset_is_exactly_labelled_subset_less_short_tracks(tmp_path):
    tracks = [Track(f"t{i:02d}", str(tmp_path / "none.flac"), (), "unlabelled", 30.0 + i)
              for i in range(40)]
    kept = select_tracks(tracks, subset_fraction=0.3, subset_seed=7)
    assert kept == labelled_subset(tracks, 0.3, 7) and 0 < len(kept) < 40
    long_ = select_tracks(tracks, subset_fraction=0.3, subset_seed=7, min_track_s=50.0)
    assert long_ == [t for t in kept if t.duration >= 50.0]
    short = write_audio(tmp_path / "short.flac", music_like(2.0), SAMPLE_RATE, "flac", "s16")
    unknown = [Track("short", str(short), (), "unlabelled"), tracks[0]]  # duration unknown
    assert select_tracks(unknown, min_track_s=25.0) == [tracks[0]]  # measured: 2 s


def test_the_tune_and_test_parts_split_the_subset_by_track(tmp_path):
    tracks = [Track(f"t{i:03d}", str(tmp_path / "none.flac"), (), "unlabelled", 90.0)
              for i in range(200)]
    subset = select_tracks(tracks, subset_fraction=0.5, subset_seed=7)
    tune = select_tracks(tracks, subset_fraction=0.5, subset_seed=7, part="tune")
    test = select_tracks(tracks, subset_fraction=0.5, subset_seed=7, part="test")
    assert not {t.id for t in tune} & {t.id for t in test}
    assert sorted(tune + test, key=lambda t: t.id) == subset
    assert 0.3 < len(tune) / len(subset) < 0.7
    assert select_tracks(tracks, subset_fraction=0.5, subset_seed=7, part="tune") == tune
    with pytest.raises(ConfigError, match="tune, test"):
        select_tracks(tracks, part="valid")


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        select_tracks([], subset_fraction=fraction)


def test_bad_crossfades_and_too_few_tracks_are_refused(songs, tmp_path):
    with pytest.raises(ConfigError, match="min <= max"):
        build_mixes(songs, tmp_path, 1, min_crossfade_s=5.0, max_crossfade_s=4.0)
    with pytest.raises(ConfigError, match="at least 2 tracks"):
        build_mixes(songs[:1], tmp_path, 1)


def test_old_index_lines_still_read_and_resume(songs, tmp_path):
    out = tmp_path / "mixes"
    build_mixes(songs, out, 1, tracks_per_mix=2, seed=1, progress=False)
    index = out / "mixes.jsonl"
    line = json.loads(index.read_text())
    del line["transitions"]  # as written before transitions were recorded
    index.write_text(json.dumps(line) + "\n")
    (old,) = read_mixes(out)
    assert old.transitions == [] and old.boundaries_s == line["boundaries_s"]
    again = build_mixes(songs, out, 2, tracks_per_mix=2, seed=1, progress=False)
    assert again[0] == old and len(again[1].transitions) == 1
    assert read_mixes(out)[1].transitions == again[1].transitions
    assert isinstance(again[1].transitions[0], Transition)


def test_the_cli_mixes_the_subset_with_matched_tempi(tmp_path):
    from rtagger.cli.main import app

    tracks = click_tracks(tmp_path, [118.0, 120.0, 122.0, 124.0, 121.0, 119.0], 6.0)
    manifest = write_manifest(tmp_path / "manifest.jsonl", tracks)
    keep = {t.id for t in labelled_subset(tracks, 0.6, 7)}
    assert len(keep) >= 2  # a property of these ids
    res = CliRunner().invoke(app, [
        "data", "mixes", "--manifest", str(manifest), "--out", str(tmp_path / "mixes"),
        "--mixes", "2", "--tracks-per-mix", "2", "--subset-fraction", "0.6",
        "--subset-seed", "7", "--min-track-s", "5", "--max-track-s", "5",
        "--min-crossfade", "1", "--max-crossfade", "2", "--tempo-match"])
    assert res.exit_code == 0, res.output
    mixes = read_mixes(tmp_path / "mixes")
    assert len(mixes) == 2 and all(set(m.track_ids) <= keep for m in mixes)
    assert all(m.transitions[0].speed != 1.0 for m in mixes)


@pytest.mark.parametrize(("args", "message"), [
    (["--min-crossfade", "9", "--max-crossfade", "8"], "min <= max"),
    (["--subset-fraction", "0"], "fraction"),
])
def test_the_cli_refuses_bad_options_with_exit_code_2(tmp_path, songs, args, message):
    from rtagger.cli.main import app

    manifest = write_manifest(tmp_path / "manifest.jsonl", songs)
    res = CliRunner().invoke(app, ["data", "mixes", "--manifest", str(manifest),
                                   "--out", str(tmp_path / "mixes"), *args])
    assert res.exit_code == 2 and message in res.output


def test_separation_puts_two_tracks_apart_and_one_track_together(tmp_path):
    from types import SimpleNamespace

    from rtagger.train.evaluation.mixes import Mix, Transition
    from rtagger.train.evaluation.separation import mix_distances, track_separation

    rng = np.random.default_rng(0)
    a, b = np.eye(8)[0], np.eye(8)[1]
    windows = []
    for s in np.arange(0.0, 116.0, 1.0):  # a change at 60 s, faded over 56-64 s
        e = a if s + 3.69 <= 60 else b
        windows.append(SimpleNamespace(start_s=s, end_s=s + 3.69,
                                       embedding=e + 0.05 * rng.standard_normal(8)))
    mix = Mix(tmp_path / "m.flac", [60.0], 120.0, ["x", "y"],
              [Transition(8.0, 120.0, 120.0, 1.0)])
    between, within = mix_distances(mix, windows)
    assert len(between) == 1 and between[0] > 0.9
    assert len(within) == 4 and max(within) < 0.05  # at 20, 30 s and 84, 94 s: un-faded
    sep = track_separation([(mix, windows)])
    assert sep["roc_auc"] == 1.0 and sep["within_above"]["0.1"] == 0.0
