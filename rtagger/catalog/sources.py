"""What ``rtagger catalog add`` reads: folders, audio files, URL lists and manifests.

Every input expands to :class:`Source` records, in a stable order (sorted within a folder,
file order within a list):

- a folder: every audio file below it (recursively), by extension (:data:`AUDIO_SUFFIXES`);
- an audio file or a URL (``http://``, ``https://``, ...): itself;
- a URL list (``.txt``, ``.m3u``, ``.m3u8``): one path or URL a line, ``#`` comments;
  relative paths are relative to the list's folder;
- a manifest (``.jsonl``, or ``.csv`` with a ``path`` column): the training manifest format
  (docs/datasets.md). Its paths resolve against the manifest's folder, and each record's
  small fields (``id``, ``tags``, ``artist``, ``split``, scalar extras such as ``groove``)
  travel into the catalog as the track's ``meta``, so platform metadata sits beside the
  tags. The runtime may not import the training code's reader (docs/architecture.md, rule
  2), so this is a reader of the same format's path and metadata fields only.

Paths are stored absolute, so a catalog's ``source`` column names a file wherever the
command was run.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rtagger.audio.decode import is_url
from rtagger.errors import ConfigError
from rtagger.jsonl import JsonlError, read_records

AUDIO_SUFFIXES = frozenset({".mp3", ".flac", ".wav", ".ogg", ".oga", ".opus", ".m4a", ".aac",
                            ".wma", ".aif", ".aiff", ".mp4", ".webm", ".mka", ".wv", ".ape"})
LIST_SUFFIXES = frozenset({".txt", ".m3u", ".m3u8"})
MANIFEST_SUFFIXES = frozenset({".jsonl", ".csv"})
# Manifest fields never copied into meta: the path is the source; timelines and plans can
# be large and belong to the dataset, not the catalog.
_META_SKIP = {"path", "timeline", "plan", "events"}


@dataclass(frozen=True)
class Source:
    """One track to catalog: an absolute path or a URL, and metadata from a manifest."""

    location: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_url(self) -> bool:
        return is_url(self.location)


def expand(inputs: Iterable[str | Path]) -> list[Source]:
    """Every track named by ``inputs``, each location once (the first mention wins).

    Raises :class:`~rtagger.errors.ConfigError` for an input that does not exist or a
    malformed list or manifest, naming it (and the line).
    """
    seen: set[str] = set()
    out: list[Source] = []
    for item in inputs:
        for src in _expand_one(str(item)):
            if src.location not in seen:
                seen.add(src.location)
                out.append(src)
    return out


def _expand_one(item: str) -> Iterator[Source]:
    if is_url(item):
        yield Source(item)
        return
    path = Path(item).expanduser()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if Path(name).suffix.lower() in AUDIO_SUFFIXES and not name.startswith("."):
                    yield Source(os.path.abspath(os.path.join(root, name)))
        return
    if not path.exists():
        raise ConfigError(f"{item}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in LIST_SUFFIXES:
        yield from _read_list(path)
    elif suffix in MANIFEST_SUFFIXES:
        yield from _read_manifest(path)
    else:
        # Any other file is taken as audio: FFmpeg decides, and a failure is recorded.
        yield Source(os.path.abspath(path))


def _resolve(raw: str, base: Path) -> str:
    if is_url(raw):
        return raw
    p = Path(raw).expanduser()
    return os.path.normpath(p if p.is_absolute() else base.absolute() / p)


def _read_list(path: Path) -> Iterator[Source]:
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield Source(_resolve(line, path.parent))


def _read_manifest(path: Path) -> Iterator[Source]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or ()):
                raise ConfigError(f"{path}: a manifest CSV needs a 'path' column")
            for lineno, row in enumerate(reader, start=2):
                yield _manifest_source(dict(row), path, lineno)
        return
    try:
        records = read_records(path)
    except JsonlError as e:
        raise ConfigError(str(e)) from None
    for lineno, obj in records:
        yield _manifest_source(obj, path, lineno)


def _manifest_source(obj: dict, path: Path, lineno: int) -> Source:
    raw = obj.get("path")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{path}:{lineno}: missing or empty 'path'")
    if raw.startswith(("zip://", "audio:zip://")):
        raise ConfigError(f"{path}:{lineno}: zip members cannot be catalogued; extract them")
    meta = {}
    for k, v in obj.items():
        if k in _META_SKIP:
            continue
        if k == "tags" and isinstance(v, str):  # CSV manifests: "a;b;c"
            v = [t for t in (s.strip() for s in v.split(";")) if t]
        if v is None or isinstance(v, str | int | float | bool) or (
                isinstance(v, list) and all(isinstance(t, str) for t in v)):
            meta[k] = v
    return Source(_resolve(raw, path.parent), meta)
