"""The one manifest format every dataset loader, the unlabelled pool and the trainer share.

A manifest is a list of :class:`Track` records stored as JSONL (one JSON object per line) or
CSV. Paths inside a manifest are relative to the manifest file's folder unless absolute, or a
zip member reference ``zip://ARCHIVE!MEMBER`` (``audio:zip://`` is accepted as well) whose
ARCHIVE follows the same rule. :func:`read_manifest` resolves all of them, so a loaded
``Track.path`` is always absolute (or a zip reference with an absolute archive).

JSONL writing is append-safe: :class:`ManifestWriter` flushes every line, and a reader skips a
truncated last line (a writer killed mid-line) with a logged warning instead of failing.

:func:`check_artist_leakage` finds artists present in more than one split: with them, test
scores measure artist recognition as much as tagging.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rtagger.errors import RtaggerError
from rtagger.jsonl import JsonlAppender, JsonlError, read_records

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test", "unlabelled")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
    "test": "test", "testing": "test", "eval": "test",
    "unlabelled": "unlabelled", "unlabeled": "unlabelled", "student": "unlabelled",
}
_CORE_KEYS = ("id", "path", "tags", "split", "duration", "artist")
ZIP_PREFIX = "zip://"
_ZIP_PREFIXES = ("audio:zip://", "zip://")
# Archive names end in one of these; splitting there lets members contain "!".
_ZIP_REF_RE = re.compile(r"^(?P<archive>.+?\.(?:zip|pk3|pk4))!(?P<member>.+)$", re.IGNORECASE)

OnLeak = Literal["warn", "error", "ignore"]


class DatasetError(RtaggerError):
    """A manifest or dataset file is missing, malformed or inconsistent."""

    def __init__(self, source: str | Path, reason: str, line: int | None = None) -> None:
        self.source = str(source)
        self.reason = reason
        self.line = line
        where = self.source if line is None else f"{self.source}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Track:
    """One recording: where its audio is, its tags, and which split it belongs to."""

    id: str
    path: str
    tags: tuple[str, ...]
    split: str
    duration: float | None = None
    artist: str | None = None
    # hash=False keeps Track hashable although a dict is not.
    extra: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Accept lists for convenience; a tuple keeps the frozen record really immutable.
        if not isinstance(self.tags, tuple):
            object.__setattr__(self, "tags", tuple(self.tags))


def normalise_split(name: str) -> str:
    """Map the split spellings of published datasets onto train/valid/test/unlabelled."""
    key = name.strip().lower()
    return _SPLIT_ALIASES.get(key, key)


def zip_ref(archive: str | Path, member: str) -> str:
    """The manifest reference of ``member`` inside the zip-format ``archive``."""
    return f"{ZIP_PREFIX}{archive}!{member}"


def parse_zip_ref(ref: str) -> tuple[str, str] | None:
    """``(archive, member)`` for a zip reference, ``None`` for a plain path."""
    for prefix in _ZIP_PREFIXES:
        if ref.startswith(prefix):
            body = ref[len(prefix):]
            m = _ZIP_REF_RE.match(body)
            if m:
                return m["archive"], m["member"]
            archive, sep, member = body.partition("!")
            if not sep or not archive or not member:
                raise DatasetError(ref, "zip reference must look like zip://ARCHIVE!MEMBER")
            return archive, member
    return None


def resolve_path(raw: str, base_dir: str | Path) -> str:
    """Absolute form of a manifest path written relative to ``base_dir``."""
    zipped = parse_zip_ref(raw)
    if zipped:
        return zip_ref(resolve_path(zipped[0], base_dir), zipped[1])
    p = Path(raw).expanduser()
    return os.path.normpath(p if p.is_absolute() else Path(base_dir).absolute() / p)


def relative_path(path: str, base_dir: str | Path) -> str:
    """The form written to a manifest: relative (posix) when under ``base_dir``."""
    zipped = parse_zip_ref(path)
    if zipped:
        return zip_ref(relative_path(zipped[0], base_dir), zipped[1])
    p, base = Path(os.path.abspath(path)), Path(os.path.abspath(base_dir))
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


def track_to_dict(track: Track, base_dir: str | Path | None = None) -> dict:
    """The JSON object of a track; extra keys sit at the top level next to the core keys."""
    clash = set(track.extra) & set(_CORE_KEYS)
    if clash:
        raise DatasetError(track.id, f"extra keys {sorted(clash)} shadow core manifest keys")
    path = track.path if base_dir is None else relative_path(track.path, base_dir)
    obj = {"id": track.id, "path": path, "tags": list(track.tags), "split": track.split,
           "duration": track.duration, "artist": track.artist}
    obj.update(track.extra)
    return obj


def track_from_dict(obj: object, base_dir: str | Path, source: str, line: int) -> Track:
    """Validate one manifest record; errors name ``source`` and ``line``."""
    if not isinstance(obj, dict):
        raise DatasetError(source, f"expected a JSON object, got {type(obj).__name__}", line)
    raw_path = obj.get("path")
    if not isinstance(raw_path, str) or not raw_path:
        raise DatasetError(source, "missing or empty 'path'", line)
    split = obj.get("split")
    if not isinstance(split, str) or not split.strip():
        raise DatasetError(source, "missing or empty 'split'", line)
    tags = obj.get("tags") or ()
    if isinstance(tags, str):
        tags = [t for t in (s.strip() for s in tags.split(";")) if t]
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise DatasetError(source, f"'tags' must be a list of strings, got {tags!r}", line)
    duration = obj.get("duration")
    if duration is not None and duration != "":
        try:
            duration = float(duration)
        except (TypeError, ValueError):
            raise DatasetError(source, f"'duration' is not a number: {duration!r}", line) from None
        if not math.isfinite(duration) or duration < 0:
            raise DatasetError(source, f"'duration' must be finite and >= 0: {duration}", line)
    else:
        duration = None
    artist = obj.get("artist")
    artist = str(artist) if artist not in (None, "") else None
    extra = {k: v for k, v in obj.items() if k not in _CORE_KEYS}
    return Track(id=str(obj.get("id") or raw_path), path=resolve_path(raw_path, base_dir),
                 tags=tuple(tags), split=normalise_split(split), duration=duration,
                 artist=artist, extra=extra)


class ManifestWriter:
    """Append tracks to a JSONL manifest, one flushed line each (safe to kill and resume)."""

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self.base_dir = self.path.parent.absolute()
        self._log = JsonlAppender(self.path, append=append)

    def write(self, track: Track) -> None:
        self._log.write(track_to_dict(track, self.base_dir))

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: str | Path) -> list[Track]:
    """Read a ``.jsonl`` or ``.csv`` manifest, resolving paths against its folder."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "manifest not found")
    if path.suffix.lower() == ".csv":
        tracks = _read_csv(path)
    else:
        tracks = _read_jsonl(path)
    seen: dict[str, int] = {}
    for i, t in enumerate(tracks):
        if t.id in seen:
            raise DatasetError(path, f"duplicate id {t.id!r} (records {seen[t.id] + 1} and "
                                     f"{i + 1})")
        seen[t.id] = i
    return tracks


def _read_jsonl(path: Path) -> list[Track]:
    base = path.parent.absolute()
    try:
        records = read_records(path)
    except JsonlError as e:
        raise DatasetError(path, e.reason, e.line) from None
    return [track_from_dict(obj, base, str(path), lineno) for lineno, obj in records]


def _read_csv(path: Path) -> list[Track]:
    base = path.parent.absolute()
    tracks = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "tags", "split"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(path, f"missing CSV column(s) {sorted(missing)}", 1)
        for row in reader:
            if None in row:  # more fields than header columns
                raise DatasetError(path, "more fields than header columns", reader.line_num)
            if any(v is None for v in row.values()):
                raise DatasetError(path, "fewer fields than header columns", reader.line_num)
            tracks.append(track_from_dict(row, base, str(path), reader.line_num))
    return tracks


def write_manifest(path: str | Path, tracks: Iterable[Track]) -> Path:
    """Write a whole manifest (JSONL, or CSV for a ``.csv`` name); paths made relative."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        with ManifestWriter(path) as w:
            for t in tracks:
                w.write(t)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.absolute()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "tags", "split", "duration", "artist"])
        for t in tracks:
            if any(";" in tag for tag in t.tags):
                raise DatasetError(path, f"track {t.id}: a tag contains ';' (CSV separator)")
            w.writerow([t.id, relative_path(t.path, base), ";".join(t.tags), t.split,
                        "" if t.duration is None else t.duration, t.artist or ""])
    return path


@dataclass(frozen=True)
class ArtistLeak:
    """An artist whose tracks sit in several splits: ``splits`` maps split -> track count."""

    artist: str
    splits: dict[str, int]


def check_artist_leakage(
    tracks: Iterable[Track], splits: Iterable[str] | None = None
) -> list[ArtistLeak]:
    """Artists with tracks in more than one split (only ``splits`` counted, default all)."""
    wanted = None if splits is None else {normalise_split(s) for s in splits}
    per_artist: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in tracks:
        if t.artist is not None and (wanted is None or t.split in wanted):
            per_artist[t.artist][t.split] += 1
    return [ArtistLeak(a, dict(sorted(s.items()))) for a, s in sorted(per_artist.items())
            if len(s) > 1]


def leakage_summary(leaks: list[ArtistLeak], limit: int = 10) -> str:
    """One readable paragraph for the CLI or a log line."""
    if not leaks:
        return "no artist appears in more than one split"
    shown = "; ".join(
        f"{leak.artist} ({', '.join(f'{s}: {n}' for s, n in leak.splits.items())})"
        for leak in leaks[:limit])
    more = f"; ... and {len(leaks) - limit} more" if len(leaks) > limit else ""
    return f"{len(leaks)} artist(s) appear in more than one split: {shown}{more}"


def enforce_no_leakage(tracks: list[Track], source: str | Path, on_leak: OnLeak = "warn") -> None:
    """Apply a loader's ``on_leak`` policy: log a warning, raise, or stay silent."""
    if on_leak not in ("warn", "error", "ignore"):
        raise ValueError(f"on_leak must be 'warn', 'error' or 'ignore', not {on_leak!r}")
    if on_leak == "ignore":
        return
    leaks = check_artist_leakage(tracks)
    if not leaks:
        return
    if on_leak == "error":
        raise DatasetError(source, leakage_summary(leaks))
    log.warning("%s: %s", source, leakage_summary(leaks))
