"""Loaders for the standard music tagging datasets, all returning :class:`Track` lists.

- :func:`load_mtat` - MagnaTagATune ``annotations_final.csv`` + the literature's splits;
- :func:`load_jamendo` - MTG-Jamendo ``autotagging*-{train,validation,test}.tsv``;
- :func:`load_msd_cals` - Million Song Dataset with the CALS ``*_ids.npy`` splits;
- :func:`load_manifest` - our own JSONL/CSV manifests (see :mod:`rtagger.train.data.manifest`).

Split names are normalised to train/valid/test (and ``unlabelled`` for the MSD student set).
The exact files and array shapes each loader expects are listed in ``docs/datasets.md``.
Every error is a :class:`DatasetError` naming the file, the line or entry, and the reason.
Loaders whose format carries artist ids run :func:`check_artist_leakage` (``on_leak``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rtagger.train.data.manifest import (
    DatasetError,
    OnLeak,
    Track,
    check_artist_leakage,
    enforce_no_leakage,
    leakage_summary,
    normalise_split,
    read_manifest,
)

__all__ = ["DatasetError", "Track", "check_artist_leakage", "leakage_summary", "load_jamendo",
           "load_manifest", "load_msd_cals", "load_mtat", "mtat_top_tags"]

_SPLITS = ("train", "valid", "test")
# The 16 MTAT folders 0-f; the 12:1:3 folder split of the early tagging papers.
_MTAT_FOLDER_SPLIT = {**dict.fromkeys("0123456789ab", "train"), "c": "valid",
                      **dict.fromkeys("def", "test")}
_MSD_ID_RE = re.compile(r"^TR[A-Z0-9]{16}$")
MSD_LAYOUT = "{id[2]}/{id[3]}/{id[4]}/{id}.mp3"


def load_manifest(path: str | Path, *, on_leak: OnLeak = "warn") -> list[Track]:
    """Read one of our JSONL/CSV manifests and check it for artist leakage."""
    tracks = read_manifest(path)
    enforce_no_leakage(tracks, path, on_leak)
    return tracks


# --- MagnaTagATune ------------------------------------------------------------------------

def _read_mtat_annotations(path: Path) -> tuple[list[str], list[tuple[str, str, np.ndarray]]]:
    """``(tag names, [(clip_id, mp3_path, 0/1 vector)])`` from ``annotations_final.csv``."""
    if not path.is_file():
        raise DatasetError(path, "MagnaTagATune annotations file not found")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")  # fields are quoted; csv strips the quotes
        header = next(reader, None)
        if not header or header[0] != "clip_id" or header[-1] != "mp3_path":
            raise DatasetError(path, "header must start with clip_id and end with mp3_path", 1)
        tags = header[1:-1]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DatasetError(path, f"{len(row)} fields, header has {len(header)}",
                                   reader.line_num)
            values = row[1:-1]
            if any(v not in ("0", "1") for v in values):
                bad = next(v for v in values if v not in ("0", "1"))
                raise DatasetError(path, f"tag values must be 0 or 1, found {bad!r}",
                                   reader.line_num)
            rows.append((row[0], row[-1], np.array(values, dtype=np.int8) == 1))
    if not rows:
        raise DatasetError(path, "no clips")
    return tags, rows


def mtat_top_tags(annotations: str | Path, n: int = 50) -> list[str]:
    """The ``n`` most frequent MTAT tags (ties broken by column order, as in the file)."""
    tags, rows = _read_mtat_annotations(Path(annotations))
    return _top_tags(tags, rows, n)


def _top_tags(tags: list[str], rows: list, n: int) -> list[str]:
    counts = np.sum([r[2] for r in rows], axis=0)
    order = sorted(range(len(tags)), key=lambda i: (-counts[i], i))  # stable: column order
    return [tags[i] for i in order[:n]]


def _read_split_list(path: Path, allow_pickle: bool) -> list[str]:
    """mp3 paths of an MTAT split file: ``.npy`` of "index\\tmp3_path" strings or text."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=allow_pickle)
        except ValueError as e:
            raise DatasetError(path, f"cannot load ({e}); if the file holds Python objects "
                                     "and you trust it, pass allow_pickle=True") from e
        entries = [str(x) for x in np.asarray(arr).reshape(-1)]
    else:
        entries = path.read_text(encoding="utf-8").splitlines()
    return [e.strip().split("\t")[-1] for e in entries if e.strip()]


def load_mtat(
    annotations: str | Path,
    audio_dir: str | Path | None = None,
    *,
    split_dir: str | Path | None = None,
    top_n: int | None = 50,
    tags: Sequence[str] | None = None,
    drop_untagged: bool = False,
    allow_pickle: bool = False,
) -> list[Track]:
    """MagnaTagATune clips with their top-``top_n`` (or the explicit ``tags``) tags.

    Splits come from ``split_dir`` (``train``/``valid``/``test`` as ``.npy`` or ``.txt``,
    entries "index<TAB>mp3_path" or "mp3_path", joined on mp3_path) or, without it, from the
    folder split (0-b train, c valid, d-f test). MTAT has no artist ids: no leakage check.
    """
    annotations = Path(annotations)
    audio_root = Path(audio_dir) if audio_dir is not None else annotations.parent
    all_tags, rows = _read_mtat_annotations(annotations)
    if tags is not None:
        unknown = [t for t in tags if t not in all_tags]
        if unknown:
            raise DatasetError(annotations, f"unknown tag(s) {unknown}")
        chosen = list(tags)
    else:
        chosen = all_tags if top_n is None else _top_tags(all_tags, rows, top_n)
    cols = [all_tags.index(t) for t in chosen]
    split_of = _mtat_splits(Path(split_dir), rows, allow_pickle) if split_dir else None
    tracks = []
    for clip_id, mp3, vec in rows:
        if split_of is not None:
            split = split_of.get(mp3)
        else:
            split = _MTAT_FOLDER_SPLIT.get(mp3[:1].lower())
        clip_tags = tuple(all_tags[c] for c in cols if vec[c])
        if split is None or (drop_untagged and not clip_tags):
            continue
        tracks.append(Track(id=clip_id, path=str((audio_root / mp3).absolute()),
                            tags=clip_tags, split=split, duration=None))
    return tracks


def _mtat_splits(split_dir: Path, rows: list, allow_pickle: bool) -> dict[str, str]:
    known = {r[1] for r in rows}
    split_of: dict[str, str] = {}
    for split in _SPLITS:
        path = next((p for p in (split_dir / f"{split}{ext}" for ext in (".npy", ".txt", ".tsv"))
                     if p.is_file()), None)
        if path is None:
            raise DatasetError(split_dir, f"no {split}.npy / {split}.txt split file")
        for i, mp3 in enumerate(_read_split_list(path, allow_pickle), start=1):
            if mp3 not in known:
                raise DatasetError(path, f"{mp3!r} is not in annotations_final.csv", i)
            if mp3 in split_of:
                raise DatasetError(path, f"{mp3!r} is already in split {split_of[mp3]}", i)
            split_of[mp3] = split
    return split_of


# --- MTG-Jamendo --------------------------------------------------------------------------

_JAMENDO_HEADER = ["TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS"]


def load_jamendo(
    split_dir: str | Path,
    audio_dir: str | Path | None = None,
    *,
    subset: str = "top50tags",
    strip_category: bool = False,
    categories: Sequence[str] | None = None,
    low_quality: bool = False,
    on_leak: OnLeak = "warn",
) -> list[Track]:
    """MTG-Jamendo tracks of ``autotagging_{subset}-{train,validation,test}.tsv``.

    Tags keep their ``category---tag`` names unless ``strip_category``; ``categories``
    (e.g. ``["genre"]``) keeps only those. ``low_quality`` points at the ``.low.mp3`` files.
    ``subset=""`` reads the full ``autotagging-*.tsv`` files.
    """
    split_dir = Path(split_dir)
    audio_root = Path(audio_dir) if audio_dir is not None else split_dir
    stem = f"autotagging_{subset}" if subset else "autotagging"
    tracks: list[Track] = []
    seen: dict[str, str] = {}
    for name in ("train", "validation", "test"):
        path = split_dir / f"{stem}-{name}.tsv"
        for t in _read_jamendo_tsv(path, audio_root, normalise_split(name), strip_category,
                                   categories, low_quality):
            if t.id in seen:
                raise DatasetError(path, f"track {t.id} is also in {seen[t.id]}")
            seen[t.id] = path.name
            tracks.append(t)
    enforce_no_leakage(tracks, split_dir, on_leak)
    return tracks


def _read_jamendo_tsv(path: Path, audio_root: Path, split: str, strip_category: bool,
                      categories: Sequence[str] | None, low_quality: bool) -> list[Track]:
    if not path.is_file():
        raise DatasetError(path, "MTG-Jamendo split file not found")
    tracks = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header[:len(_JAMENDO_HEADER)] != _JAMENDO_HEADER:
            raise DatasetError(path, f"header must be {' '.join(_JAMENDO_HEADER)}", 1)
        # Tag fields are plain tab-separated tails, not quoted CSV: split lines ourselves.
        for lineno, line in enumerate(f, start=2):
            fields = line.rstrip("\r\n").split("\t")
            if fields == [""]:
                continue
            if len(fields) < 5:
                raise DatasetError(path, f"expected at least 5 fields, got {len(fields)}",
                                   lineno)
            track_id, artist, album, rel, dur = fields[:5]
            try:
                duration = float(dur)
            except ValueError:
                raise DatasetError(path, f"DURATION is not a number: {dur!r}", lineno) from None
            tags = []
            for tag in fields[5:]:
                category, sep, name = tag.partition("---")
                if not sep or not category or not name:
                    raise DatasetError(path, f"tag {tag!r} is not 'category---name'", lineno)
                if categories is None or category in categories:
                    tags.append(name if strip_category else tag)
            if low_quality and rel.endswith(".mp3") and not rel.endswith(".low.mp3"):
                rel = rel[: -len(".mp3")] + ".low.mp3"
            tracks.append(Track(id=track_id, path=str((audio_root / rel).absolute()),
                                tags=tuple(dict.fromkeys(tags)), split=split,
                                duration=duration, artist=artist, extra={"album": album}))
    return tracks


# --- Million Song Dataset, CALS split -----------------------------------------------------

def load_msd_cals(
    split_dir: str | Path,
    audio_dir: str | Path | None = None,
    *,
    tag_list: str | Path | None = None,
    binary: str | Path | None = None,
    binary_ids: str | Path | None = None,
    layout: str = MSD_LAYOUT,
    include_student: bool = True,
    track_artists: str | Path | None = None,
    on_leak: OnLeak = "warn",
) -> list[Track]:
    """MSD tracks of the CALS ``{train,valid,test,student}_ids.npy`` split.

    Labels: per-split ``{split}_binaries.npy`` (rows aligned with ``{split}_ids.npy``) when
    present, otherwise one ``binary`` array (default ``binary.npy``) whose rows align with
    ``binary_ids`` (default ``binary_ids.npy``, ``.npy`` array or text, one id per line).
    Tag names: ``tag_list`` (default ``50tagList.txt``), one per line. Audio path: ``layout``
    formatted with the track id under ``audio_dir``. The student split becomes ``unlabelled``.
    ``track_artists`` (MSD ``unique_tracks.txt``) enables the artist leakage check.
    """
    split_dir = Path(split_dir)
    audio_root = Path(audio_dir) if audio_dir is not None else split_dir / "audio"
    tag_path = Path(tag_list) if tag_list else split_dir / "50tagList.txt"
    if not tag_path.is_file():
        raise DatasetError(tag_path, "tag list not found")
    names = [t.strip() for t in tag_path.read_text(encoding="utf-8").splitlines() if t.strip()]
    artists = _read_msd_artists(Path(track_artists)) if track_artists else {}
    shared: dict[str, np.ndarray] | None = None
    tracks: list[Track] = []
    # All id files are checked before any labels are read: a typo shows up first.
    split_ids = {split: _read_msd_ids(split_dir / f"{split}_ids.npy") for split in
                 (*_SPLITS, "student") if split != "student" or (
                     include_student and (split_dir / "student_ids.npy").is_file())}
    seen: dict[str, str] = {}
    for split, ids in split_ids.items():
        for tid in ids:
            if tid in seen:
                raise DatasetError(split_dir / f"{split}_ids.npy",
                                   f"{tid} is also in {seen[tid]}_ids.npy")
            seen[tid] = split
    for split, ids in split_ids.items():
        ids_path = split_dir / f"{split}_ids.npy"
        if split == "student":
            labels = [()] * len(ids)
        else:
            per_split = split_dir / f"{split}_binaries.npy"
            if per_split.is_file():
                rows = _load_binary(per_split, len(names))
                if len(rows) != len(ids):
                    raise DatasetError(per_split, f"{len(rows)} rows but {ids_path.name} has "
                                                  f"{len(ids)} ids")
            else:
                if shared is None:
                    shared = _shared_binary(split_dir, binary, binary_ids, len(names))
                missing = next((i for i in ids if i not in shared), None)
                if missing is not None:
                    raise DatasetError(ids_path, f"{missing} has no row in the binary labels")
                rows = np.stack([shared[i] for i in ids]) if ids else np.zeros((0, len(names)))
            labels = [tuple(n for n, v in zip(names, row, strict=True) if v) for row in rows]
        for tid, tags in zip(ids, labels, strict=True):
            tracks.append(Track(id=tid, path=str((audio_root / layout.format(id=tid)).absolute()),
                                tags=tags, split=normalise_split(split),
                                artist=artists.get(tid)))
    if artists:
        enforce_no_leakage(tracks, split_dir, on_leak)
    return tracks


def _read_msd_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(path, "split id file not found")
    if path.suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DatasetError(path, f"cannot load as a string array ({e})") from e
        entries = [str(x) for x in np.asarray(raw).reshape(-1)]
    else:
        entries = [ln.split("\t")[-1] for ln in path.read_text(encoding="utf-8").splitlines()]
    ids = [e.strip() for e in entries]
    for i, tid in enumerate(ids):
        if not _MSD_ID_RE.match(tid):
            raise DatasetError(path, f"entry {i}: {tid!r} is not an MSD track id")
    return ids


def _load_binary(path: Path, n_tags: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetError(path, f"cannot load ({e})") from e
    if arr.ndim != 2 or arr.shape[1] != n_tags:
        raise DatasetError(path, f"shape {arr.shape}, expected (n_tracks, {n_tags})")
    bad = np.argwhere((arr != 0) & (arr != 1))
    if len(bad):
        r, c = bad[0]
        raise DatasetError(path, f"entry {r}: column {c} is {arr[r, c]!r}, expected 0 or 1")
    return arr.astype(bool)


def _shared_binary(split_dir: Path, binary: str | Path | None, binary_ids: str | Path | None,
                   n_tags: int) -> dict[str, np.ndarray]:
    bin_path = Path(binary) if binary else split_dir / "binary.npy"
    if not bin_path.is_file():
        raise DatasetError(bin_path, "no per-split *_binaries.npy and no binary label file")
    ids_path = Path(binary_ids) if binary_ids else next(
        (p for p in (split_dir / "binary_ids.npy", split_dir / "binary_ids.txt") if p.is_file()),
        split_dir / "binary_ids.npy")
    arr = _load_binary(bin_path, n_tags)
    ids = _read_msd_ids(ids_path)
    if len(ids) != len(arr):
        raise DatasetError(bin_path, f"{len(arr)} rows but {ids_path.name} has {len(ids)} ids")
    return dict(zip(ids, arr, strict=True))


def _read_msd_artists(path: Path) -> dict[str, str]:
    """Track id -> artist name from MSD ``unique_tracks.txt`` (``<SEP>``-separated)."""
    if not path.is_file():
        raise DatasetError(path, "track/artist file not found")
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\r\n").split("<SEP>")
            if len(parts) < 3:
                raise DatasetError(path, "expected TRACKID<SEP>SONGID<SEP>ARTIST<SEP>TITLE",
                                   lineno)
            out[parts[0]] = parts[2]
    return out
