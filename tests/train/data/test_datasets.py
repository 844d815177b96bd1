"""Manifest I/O and the standard dataset loaders, each on tiny files in its published format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from rtagger.train.data.datasets import (
    DatasetError,
    Track,
    check_artist_leakage,
    leakage_summary,
    load_jamendo,
    load_manifest,
    load_msd_cals,
    load_mtat,
    mtat_top_tags,
)
from rtagger.train.data.manifest import ManifestWriter, parse_zip_ref, read_manifest, write_manifest

# --- manifests ----------------------------------------------------------------------------


def test_jsonl_round_trip_relative_paths_and_extra(tmp_path):
    root = tmp_path / "ds"
    tracks = [
        Track("a", str(root / "audio" / "a.wav"), ("rock", "piano"), "train", 12.5, "x",
              {"groove": "Swing", "seed": 3}),
        Track("b", "/elsewhere/b.ogg", (), "unlabelled"),
        Track("c", f"zip://{root / 'music.pk3'}!music/c.ogg", (), "unlabelled"),
    ]
    path = write_manifest(root / "manifest.jsonl", tracks)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert raw[0]["path"] == "audio/a.wav" and raw[0]["groove"] == "Swing"
    assert raw[1]["path"] == "/elsewhere/b.ogg"
    assert raw[2]["path"] == "zip://music.pk3!music/c.ogg"
    assert read_manifest(path) == tracks
    assert parse_zip_ref(read_manifest(path)[2].path) == (str(root / "music.pk3"),
                                                          "music/c.ogg")


def test_reads_the_synthetic_benchmark_lines(tmp_path):
    line = {"id": "synth-000001", "path": "audio/000001.flac", "duration": 30.0,
            "tags": ["genre:jazz", "instrument:piano"], "split": "validation",
            "groove": "Swing", "seed": 1, "soundfont": "FluidR3_GM.sf2",
            "timeline": [{"start": 0.0, "end": 30.0, "tags": ["genre:jazz"]}]}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    [t] = load_manifest(tmp_path / "manifest.jsonl")
    assert t.path == str(tmp_path / "audio" / "000001.flac")
    assert t.split == "valid" and t.tags == ("genre:jazz", "instrument:piano")
    assert t.extra["timeline"][0]["end"] == 30.0 and t.extra["soundfont"] == "FluidR3_GM.sf2"


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    with ManifestWriter(path) as w:
        w.write(Track("a", str(tmp_path / "a.wav"), (), "unlabelled"))
    with open(path, "a") as f:
        f.write('{"id": "b", "path": "b.w')  # a writer killed mid-line
    with caplog.at_level(logging.WARNING):
        assert [t.id for t in read_manifest(path)] == ["a"]
    assert "truncated" in caplog.text
    with ManifestWriter(path, append=True) as w:  # appending first drops the partial line
        w.write(Track("c", str(tmp_path / "c.wav"), (), "unlabelled"))
    assert [t.id for t in read_manifest(path)] == ["a", "c"]


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"path": "a.wav", "split": "train", "tags": []}\n{oops\n'
                    '{"path": "b.wav", "split": "train", "tags": []}\n')
    with pytest.raises(DatasetError, match=r"m\.jsonl:2: invalid JSON"):
        read_manifest(path)
    path.write_text('{"path": "a.wav", "split": "train", "duration": "long"}\n')
    with pytest.raises(DatasetError, match=r"m\.jsonl:1: 'duration' is not a number"):
        read_manifest(path)


def test_csv_manifest(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,tags,split,artist,mood\n"
                    "a.wav,rock;guitar,train,ann,dark\n"
                    "/abs/b.wav,,test,,\n")
    a, b = read_manifest(path)
    assert a.id == "a.wav" and a.path == str(tmp_path / "a.wav")
    assert a.tags == ("rock", "guitar") and a.artist == "ann" and a.extra == {"mood": "dark"}
    assert b.tags == () and b.artist is None and b.path == "/abs/b.wav"
    out = write_manifest(tmp_path / "copy.csv", [a, b])
    assert [(t.id, t.tags, t.split) for t in read_manifest(out)] == [
        (a.id, a.tags, a.split), (b.id, b.tags, b.split)]
    path.write_text("path,tags,split\na.wav,rock,train\nb.wav,pop\n")
    with pytest.raises(DatasetError, match=r"m\.csv:3: fewer fields"):
        read_manifest(path)


def test_artist_leakage_report():
    tracks = [Track(str(i), f"{i}.mp3", (), s, artist=a) for i, (s, a) in enumerate(
        [("train", "x"), ("train", "x"), ("test", "x"), ("train", "y"), ("valid", "z")])]
    [leak] = check_artist_leakage(tracks)
    assert leak.artist == "x" and leak.splits == {"test": 1, "train": 2}
    assert "1 artist(s)" in leakage_summary([leak]) and "x (test: 1, train: 2)" in \
        leakage_summary([leak])
    assert check_artist_leakage(tracks, splits=["train", "valid"]) == []


# --- MagnaTagATune ------------------------------------------------------------------------

MTAT_TAGS = ["guitar", "classical", "slow", "techno", "no voice"]
MTAT_ROWS = [  # clip_id, tags, mp3_path
    ("2", [1, 1, 0, 0, 0], "0/a-01-0-29.mp3"),
    ("6", [1, 0, 1, 0, 1], "3/b-02-0-29.mp3"),
    ("10", [0, 1, 1, 0, 0], "c/c-03-0-29.mp3"),
    ("11", [1, 0, 0, 0, 0], "d/d-04-0-29.mp3"),
    ("12", [0, 0, 0, 1, 0], "f/e-05-0-29.mp3"),
]


def write_mtat(root: Path, rows=MTAT_ROWS) -> Path:
    def q(fields):  # the published file quotes every field, tab-separated, CRLF
        return "\t".join(f'"{v}"' for v in fields) + "\r\n"

    text = q(["clip_id", *MTAT_TAGS, "mp3_path"])
    text += "".join(q([cid, *vals, mp3]) for cid, vals, mp3 in rows)
    path = root / "annotations_final.csv"
    path.write_text(text, newline="")
    return path


def test_mtat_top_tags_and_folder_split(tmp_path):
    ann = write_mtat(tmp_path)
    assert mtat_top_tags(ann, 3) == ["guitar", "classical", "slow"]
    tracks = load_mtat(ann, tmp_path / "audio", top_n=2)
    assert [(t.id, t.split, t.tags) for t in tracks] == [
        ("2", "train", ("guitar", "classical")), ("6", "train", ("guitar",)),
        ("10", "valid", ("classical",)), ("11", "test", ("guitar",)), ("12", "test", ())]
    assert tracks[0].path == str(tmp_path / "audio" / "0" / "a-01-0-29.mp3")
    assert all(t.artist is None for t in tracks)
    kept = load_mtat(ann, tags=["techno"], drop_untagged=True)
    assert [t.id for t in kept] == ["12"]


def test_mtat_split_files_npy_and_text(tmp_path):
    ann = write_mtat(tmp_path)
    split = tmp_path / "split"
    split.mkdir()
    np.save(split / "train.npy", np.array(["0\t0/a-01-0-29.mp3", "1\tc/c-03-0-29.mp3"]))
    np.save(split / "valid.npy", np.array(["2\td/d-04-0-29.mp3"]))
    (split / "test.txt").write_text("f/e-05-0-29.mp3\n")
    tracks = load_mtat(ann, split_dir=split)
    assert {t.id: t.split for t in tracks} == {"2": "train", "10": "train", "11": "valid",
                                                "12": "test"}
    (split / "test.txt").write_text("f/e-05-0-29.mp3\nf/missing.mp3\n")
    with pytest.raises(DatasetError, match=r"test\.txt:2: 'f/missing\.mp3' is not in"):
        load_mtat(ann, split_dir=split)


def test_mtat_bad_row(tmp_path):
    rows = [*MTAT_ROWS[:2], ("7", [1, 2, 0, 0, 0], "1/x.mp3")]
    ann = write_mtat(tmp_path, rows)
    with pytest.raises(DatasetError, match=r"annotations_final\.csv:4: tag values must be 0"):
        load_mtat(ann)
    ann = write_mtat(tmp_path)
    ann.write_text(ann.read_bytes().decode() + '"9"\t"0"\r\n', newline="")
    with pytest.raises(DatasetError, match=r"annotations_final\.csv:7: 2 fields, header has 7"):
        load_mtat(ann)


# --- MTG-Jamendo --------------------------------------------------------------------------

JAMENDO_HEADER = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\n"


def write_jamendo(root: Path, rows: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (root / f"autotagging_top50tags-{split}.tsv").write_text(
            JAMENDO_HEADER + "".join(line + "\n" for line in lines))
    return root


JAMENDO = {
    "train": ["track_0000001\tartist_000001\talbum_000001\t01/1.mp3\t200.5\tgenre---rock\t"
              "instrument---guitar",
              "track_0000002\tartist_000002\talbum_000002\t02/2.mp3\t61.0\tmood/theme---happy"],
    "validation": ["track_0000003\tartist_000003\talbum_000003\t03/3.mp3\t90.0\tgenre---pop"],
    "test": ["track_0000004\tartist_000004\talbum_000004\t04/4.mp3\t120.0\tgenre---rock\t"
             "instrument---piano\tmood/theme---happy"],
}


def test_jamendo_tags_splits_paths(tmp_path):
    splits = write_jamendo(tmp_path / "splits", JAMENDO)
    tracks = load_jamendo(splits, tmp_path / "audio")
    assert [(t.id, t.split) for t in tracks] == [
        ("track_0000001", "train"), ("track_0000002", "train"), ("track_0000003", "valid"),
        ("track_0000004", "test")]
    t = tracks[0]
    assert t.tags == ("genre---rock", "instrument---guitar") and t.duration == 200.5
    assert t.artist == "artist_000001" and t.extra["album"] == "album_000001"
    assert t.path == str(tmp_path / "audio" / "01" / "1.mp3")
    stripped = load_jamendo(splits, tmp_path / "audio", strip_category=True,
                            categories=["genre", "mood/theme"], low_quality=True)
    assert stripped[3].tags == ("rock", "happy")
    assert stripped[0].path.endswith("01/1.low.mp3")


def test_jamendo_artist_leakage(tmp_path, caplog):
    rows = dict(JAMENDO)
    rows["test"] = [*JAMENDO["test"],
                    "track_0000005\tartist_000001\talbum_000009\t05/5.mp3\t99.0\tgenre---rock"]
    splits = write_jamendo(tmp_path / "splits", rows)
    with caplog.at_level(logging.WARNING):
        tracks = load_jamendo(splits)
    assert "artist_000001 (test: 1, train: 1)" in caplog.text
    assert [leak.artist for leak in check_artist_leakage(tracks)] == ["artist_000001"]
    with pytest.raises(DatasetError, match="artist_000001"):
        load_jamendo(splits, on_leak="error")


def test_jamendo_bad_rows(tmp_path):
    rows = dict(JAMENDO)
    rows["validation"] = [JAMENDO["validation"][0],
                          "track_0000009\tartist_000009\talbum_000009\t09/9.mp3\tlong\tgenre---x"]
    splits = write_jamendo(tmp_path / "a", rows)
    with pytest.raises(DatasetError, match=r"top50tags-validation\.tsv:3: DURATION"):
        load_jamendo(splits)
    rows["validation"] = ["track_0000009\tartist_000009\talbum_000009\t09/9.mp3\t1.0\trock"]
    splits = write_jamendo(tmp_path / "b", rows)
    with pytest.raises(DatasetError, match=r"validation\.tsv:2: tag 'rock'"):
        load_jamendo(splits)
    splits = write_jamendo(tmp_path / "c", JAMENDO)
    (splits / "autotagging_top50tags-test.tsv").unlink()
    with pytest.raises(DatasetError, match="not found"):
        load_jamendo(splits)


# --- MSD / CALS ---------------------------------------------------------------------------

MSD_IDS = {"train": ["TRAAAAK128F9318786", "TRAAABD128F429CF47"],
           "valid": ["TRBBBBB128F0000001"], "test": ["TRCCCCC128F0000002"],
           "student": ["TRDDDDD128F0000003", "TREEEEE128F0000004"]}
MSD_TAGS = ["rock", "pop", "jazz"]


def write_cals(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, ids in MSD_IDS.items():
        np.save(root / f"{split}_ids.npy", np.array(ids))
    (root / "50tagList.txt").write_text("\n".join(MSD_TAGS) + "\n")
    return root


def test_msd_cals_per_split_binaries(tmp_path):
    root = write_cals(tmp_path / "cals")
    np.save(root / "train_binaries.npy", np.array([[1, 0, 0], [0, 1, 1]]))
    np.save(root / "valid_binaries.npy", np.array([[0, 0, 1]]))
    np.save(root / "test_binaries.npy", np.array([[1, 1, 0]]))
    tracks = load_msd_cals(root, tmp_path / "audio")
    got = {t.id: (t.split, t.tags) for t in tracks}
    assert got["TRAAABD128F429CF47"] == ("train", ("pop", "jazz"))
    assert got["TRBBBBB128F0000001"] == ("valid", ("jazz",))
    assert got["TRDDDDD128F0000003"] == ("unlabelled", ())
    assert tracks[0].path == str(tmp_path / "audio" / "A" / "A" / "A" / "TRAAAAK128F9318786.mp3")
    assert len(load_msd_cals(root, include_student=False)) == 4


def test_msd_cals_shared_binary_and_artists(tmp_path, caplog):
    root = write_cals(tmp_path / "cals")
    all_ids = [i for ids in MSD_IDS.values() for i in ids]
    np.save(root / "binary_ids.npy", np.array(all_ids[::-1]))
    np.save(root / "binary.npy", np.eye(len(all_ids), 3, dtype=np.int64)[::-1])
    tracks = load_msd_cals(root, layout="{id}.wav")
    assert {t.id: t.tags for t in tracks}["TRAAABD128F429CF47"] == ("pop",)
    assert tracks[0].path.endswith("audio/TRAAAAK128F9318786.wav")
    uniq = tmp_path / "unique_tracks.txt"
    uniq.write_text("".join(f"{tid}<SEP>SO{n}<SEP>{'Same' if n in (0, 3) else tid}<SEP>t\n"
                            for n, tid in enumerate(all_ids)))
    with caplog.at_level(logging.WARNING):
        load_msd_cals(root, track_artists=uniq)
    assert "Same (test: 1, train: 1)" in caplog.text


def test_msd_cals_bad_entries(tmp_path):
    root = write_cals(tmp_path / "cals")
    np.save(root / "valid_ids.npy", np.array(["TRBBBBB128F0000001", "not-an-id"]))
    with pytest.raises(DatasetError, match=r"valid_ids\.npy: entry 1: 'not-an-id'"):
        load_msd_cals(root)
    root = write_cals(tmp_path / "cals2")
    np.save(root / "train_binaries.npy", np.array([[1, 0, 0], [0, 5, 1]]))
    with pytest.raises(DatasetError, match=r"train_binaries\.npy: entry 1: column 1"):
        load_msd_cals(root)
    np.save(root / "train_binaries.npy", np.array([[1, 0], [0, 1]]))
    with pytest.raises(DatasetError, match=r"shape \(2, 2\), expected \(n_tracks, 3\)"):
        load_msd_cals(root)


def test_msd_cals_track_in_two_splits(tmp_path):
    root = write_cals(tmp_path / "cals")
    np.save(root / "test_ids.npy", np.array(["TRAAAAK128F9318786"]))
    with pytest.raises(DatasetError, match=r"test_ids\.npy: TRAAAAK128F9318786 is also in train"):
        load_msd_cals(root)
