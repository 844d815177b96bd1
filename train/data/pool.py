"""The unlabelled pool: real recordings without tags, for semi-supervised training.

``rtagger data pool`` scans audio sources and writes a manifest (split ``unlabelled``, no tags)
with each recording's duration. By default the sources are the free game soundtracks Debian
ships (``apt-get install warzone2100-music ufoai-music``); any folder of
audio (searched recursively), single audio file, or zip-format archive (``.zip``/``.pk3``)
works too. ufoai keeps its Ogg files inside ``0music.pk3``: members are read straight from
the archive and stored as ``zip://ARCHIVE!MEMBER`` references, so nothing is unpacked.

Durations come from the container header when it states one (Ogg, FLAC, WAV...), otherwise
from decoding. A file that cannot be opened or decoded is recorded in the report (and in a
``<manifest>.failures.jsonl`` file) and skipped; one bad file never ends the build.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtagger.audio.decode import Resampler, load_audio
from rtagger.errors import AudioError
from rtagger.train.data.debian import (
    POOL_PACKAGES,
    Copyright,
    check_not_held_out,
    copyright_of,
    fetched,
    package,
    root_of,
)
from rtagger.train.data.manifest import ManifestWriter, Track, parse_zip_ref, read_manifest, zip_ref

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac",
                              ".aiff", ".aif"})
ARCHIVE_EXTENSIONS = frozenset({".zip", ".pk3"})
DEFAULT_DEBIAN_DIR = Path("data/debian")  # where `rtagger data debian` unpacks packages


def installed_sources(debian_dir: str | Path = DEFAULT_DEBIAN_DIR) -> list[str]:
    """The pool packages whose files are here: unpacked in ``debian_dir`` or installed."""
    return [p.name for p in POOL_PACKAGES if root_of(p.name, debian_dir) is not None]


@dataclass(frozen=True)
class PoolFailure:
    """A recording that was skipped, and why."""

    path: str
    reason: str


@dataclass
class PoolReport:
    """What a pool build found: per-source counts and seconds, failures, missing sources."""

    manifest: Path
    count_by_source: dict[str, int] = field(default_factory=dict)
    seconds_by_source: dict[str, float] = field(default_factory=dict)
    failures: list[PoolFailure] = field(default_factory=list)
    missing_sources: list[str] = field(default_factory=list)
    kind_by_source: dict[str, str] = field(default_factory=dict)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (skipped, kept)
    elapsed_s: float = 0.0

    @property
    def seconds_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, s in self.seconds_by_source.items():
            kind = self.kind_by_source.get(label, "other")
            out[kind] = out.get(kind, 0.0) + s
        return out

    @property
    def n_tracks(self) -> int:
        return sum(self.count_by_source.values())

    @property
    def hours(self) -> float:
        return sum(self.seconds_by_source.values()) / 3600


@dataclass(frozen=True)
class _Entry:
    label: str  # source name shown in the report
    ref: str  # absolute path or zip reference
    rel: str  # path inside the source, for the track id
    meta: dict = field(default_factory=dict, hash=False)


def _expand_sources(sources: list[str | Path] | None, debian_dir: str | Path
                    ) -> tuple[list[tuple[str, Path, dict]], list[str]]:
    """``(label, path, package meta)`` for the sources that exist, and those that do not.

    A pool package's meta is its package name, version, licence and kind: every track
    from it carries them.
    """
    found, missing = [], []
    records = fetched(debian_dir)
    for src in [p.name for p in POOL_PACKAGES] if sources is None else sources:
        name = str(src)
        check_not_held_out(name)
        pkg = package(name)
        if pkg is not None:
            root = root_of(name, debian_dir)
            hits = sorted(h for g in pkg.globs for h in root.glob(g)) if root else []
            if not hits:
                missing.append(f"{name} (not fetched: rtagger data debian; nor installed)")
                continue
            meta = {"package": name, "kind": pkg.kind, "members": pkg.members,
                    **_package_facts(name, root, records)}
            found.extend((name, h, meta) for h in hits)
            continue
        path = Path(src).expanduser()
        if path.exists():
            found.append((path.name or str(path), path.absolute(), {}))
        else:
            missing.append(f"{name} (no such file or folder)")
    return found, missing


def _package_facts(name: str, root: Path, records: dict[str, dict]) -> dict:
    """Version and where it lives: from the fetch record, or dpkg for an installed one."""
    if name in records and root != Path("/"):
        return {"version": records[name]["version"], "root": str(root)}
    import subprocess

    try:
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    return {"version": version or "unknown", "root": str(root)}


def _track_licence(entry: _Entry, copyrights: dict[str, Copyright]) -> str:
    """The licence the package's copyright file gives this recording (DEP-5 ``Files``)."""
    package_name, root = entry.meta["package"], Path(entry.meta["root"])
    if package_name not in copyrights:
        copyrights[package_name] = copyright_of(root, package_name)
    zipped = parse_zip_ref(entry.ref)
    path = zipped[1] if zipped else Path(entry.ref).relative_to(root).as_posix()
    return copyrights[package_name].for_file(path)


def _content_sha256(ref: str) -> str:
    """SHA-256 of a file's bytes, or of a zip member's (uncompressed) bytes."""
    h = hashlib.sha256()
    zipped = parse_zip_ref(ref)
    with (zipfile.ZipFile(zipped[0]).open(zipped[1]) if zipped else open(ref, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entries(label: str, root: Path, failures: list[PoolFailure],
             members: tuple[str, ...] = ()) -> Iterator[_Entry]:
    """The recordings under ``root``: audio files, and audio members of zip archives.

    ``members`` (a package's patterns): a zip named on its own under any extension
    (``.parkobj``) is read as an archive, keeping only the members that match (an archive
    that mixes music with sound effects).
    """
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        ext = f.suffix.lower()
        rel = f.name if f == root else f.relative_to(root).as_posix()
        archive = ext in ARCHIVE_EXTENSIONS or (bool(members) and f == root
                                                and zipfile.is_zipfile(f))
        if not archive and (ext in AUDIO_EXTENSIONS or (f == root and not ext)):
            # a file named on its own without an extension is probed (Ogg without one)
            yield _Entry(label, str(f), rel, _album_meta(f))
        elif archive:
            try:
                with zipfile.ZipFile(f) as z:
                    members_found = [
                        m.filename for m in z.infolist() if not m.is_dir()
                        and Path(m.filename).suffix.lower() in AUDIO_EXTENSIONS
                        and (not members or any(fnmatch.fnmatchcase(m.filename, pat)
                                                for pat in members))]
            except (zipfile.BadZipFile, OSError) as e:
                failures.append(PoolFailure(str(f), f"unreadable archive ({e})"))
                continue
            prefix = "" if f == root and not members else rel + "!"
            for m in sorted(members_found):
                yield _Entry(label, zip_ref(f, m), prefix + m)


def _album_meta(path: Path) -> dict:
    """Title/author from a warzone2100-style ``album.json`` next to the file, if any."""
    album = path.parent / "album.json"
    if not album.is_file():
        return {}
    try:
        info = json.loads(album.read_text(encoding="utf-8"))
        for t in info.get("tracks", []):
            if t.get("filename") == path.name:
                return {k: v for k, v in (("artist", t.get("author") or info.get("author")),
                                          ("title", t.get("title")),
                                          ("album", info.get("title"))) if v}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        log.warning("%s: ignoring unreadable album metadata (%s)", album, e)
    return {}


def _open_container(ref: str):
    """An open PyAV container for a path or a zip member (bytes decoded from memory)."""
    import av

    zipped = parse_zip_ref(ref)
    try:
        if zipped is None:
            if Path(ref).stat().st_size == 0:
                raise AudioError(ref, "empty file")
            return av.open(ref, metadata_errors="replace")
        with zipfile.ZipFile(zipped[0]) as z:
            data = z.read(zipped[1])
        if not data:
            raise AudioError(ref, "empty archive member")
        return av.open(io.BytesIO(data), metadata_errors="replace")
    # zipfile signals CRC errors, truncation, encryption and unknown compression differently
    except (zipfile.BadZipFile, KeyError, EOFError, zlib.error, NotImplementedError,
            RuntimeError) as e:
        raise AudioError(ref, f"cannot read archive member ({e})") from e
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise AudioError(ref, f"cannot open as audio ({_reason(e)})") from e


def _reason(e: BaseException) -> str:
    # FFmpeg errors repeat the file name and an errno; the message alone reads better.
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip()


def probe(ref: str, *, verify: bool = False) -> dict:
    """Duration (s), sample rate, channels and codec of a path or zip member.

    The header duration is used when present; one frame is still decoded so that a file
    with a valid header but undecodable audio is caught. ``verify`` decodes everything.
    """
    import av

    with _open_container(ref) as c:
        if not c.streams.audio:
            raise AudioError(ref, "contains no audio stream")
        s = c.streams.audio[0]
        rate = s.codec_context.sample_rate or 0
        if rate <= 0:
            raise AudioError(ref, "audio stream reports no sample rate")
        duration = None
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif c.duration is not None:
            duration = c.duration / 1_000_000
        samples = 0
        try:
            for packet in c.demux(s):
                for frame in packet.decode():
                    samples += frame.samples
                if samples and duration is not None and not verify:
                    break
        except av.error.FFmpegError as e:
            raise AudioError(ref, f"decoding failed ({_reason(e)})") from e
        if samples == 0:
            raise AudioError(ref, "decoded to zero samples")
        if verify or duration is None or duration <= 0:
            duration = samples / rate
        return {"duration": round(duration, 3), "sample_rate": rate,
                "channels": s.codec_context.layout.nb_channels, "codec": s.codec_context.name}


def load_track_audio(track: Track | str) -> np.ndarray:
    """Mono float32 16 kHz audio of a pool entry: a plain path or a zip member reference."""
    ref = track.path if isinstance(track, Track) else str(track)
    if parse_zip_ref(ref) is None:
        return load_audio(ref)
    import av

    blocks: list[np.ndarray] = []
    resampler: Resampler | None = None
    with _open_container(ref) as c:
        if not c.streams.audio:
            raise AudioError(ref, "contains no audio stream")
        try:
            for frame in c.decode(c.streams.audio[0]):
                if resampler is None:
                    resampler = Resampler(frame.sample_rate, frame.layout.nb_channels, ref)
                elif frame.sample_rate != resampler.sample_rate:
                    raise AudioError(ref, "sample rate changes mid-stream")
                blocks.append(resampler(_frame_block(frame, ref)))
        except av.error.FFmpegError as e:
            raise AudioError(ref, f"decoding failed ({_reason(e)})") from e
    if resampler is None:
        raise AudioError(ref, "decoded to zero samples")
    blocks.append(resampler.flush())
    return np.concatenate(blocks)


def _frame_block(frame, ref: str) -> np.ndarray:
    """A frame as what :class:`Resampler` takes: (channels, n) planar or interleaved 1-D."""
    a = frame.to_ndarray()
    if a.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        a = (a.astype(np.float32) - 128.0) / 128.0
    elif a.dtype not in (np.int16, np.int32) and a.dtype.kind != "f":
        raise AudioError(ref, f"unsupported sample format {frame.format.name}")
    return a if frame.format.is_planar else a.reshape(-1)


def build_pool_report(
    out_manifest: str | Path,
    sources: list[str | Path] | None = None,
    *,
    progress: bool = True,
    resume: bool = False,
    verify: bool = False,
    debian_dir: str | Path = DEFAULT_DEBIAN_DIR,
) -> PoolReport:
    """Scan ``sources`` into ``out_manifest`` (JSONL) and return what was found.

    ``sources``: folders, files, zip archives or pool package names (default: every pool
    package, from ``debian_dir`` where ``rtagger data debian`` unpacked them, or from ``/``
    when installed). Files whose bytes were already seen are skipped as duplicates.
    ``resume`` keeps the records already in ``out_manifest`` and probes only new files.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    t0 = time.perf_counter()
    out = Path(out_manifest)
    report = PoolReport(manifest=out)
    roots, report.missing_sources = _expand_sources(sources, debian_dir)
    for m in report.missing_sources:
        log.warning("pool source skipped: %s", m)
    done: dict[str, Track] = {}
    if resume and out.exists():
        done = {t.path: t for t in read_manifest(out)}
    entries = [_Entry(e.label, e.ref, e.rel, {**meta, **e.meta})
               for label, root, meta in roots
               for e in _entries(label, root, report.failures, meta.get("members", ()))]
    for label, _, meta in roots:
        if "kind" in meta:
            report.kind_by_source[label] = meta["kind"]
    # The same file reached through two sources (a package name and its path) counts once.
    unique: dict[str, _Entry] = {}
    for e in entries:
        unique.setdefault(e.ref, e)
    entries = list(unique.values())
    ids: set[str] = {t.id for t in done.values()}
    # Content hashes: the same recording shipped twice (two packages, two folders) counts once.
    seen: dict[str, str] = {t.extra["sha256"]: t.path for t in done.values()
                            if "sha256" in (t.extra or {})}
    copyrights: dict[str, Copyright] = {}
    with ManifestWriter(out, append=resume) as writer, Progress(
        TextColumn("[bold]pool[/]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.description}"), disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("", total=len(entries))
        for e in entries:
            bar.update(task, advance=1, description=e.rel[-40:])
            track = done.get(e.ref)
            if track is None:
                try:
                    digest = _content_sha256(e.ref)
                except (OSError, zipfile.BadZipFile, KeyError) as err:
                    report.failures.append(PoolFailure(e.ref, f"unreadable ({_reason(err)})"))
                    continue
                if digest in seen:
                    report.duplicates.append((e.ref, seen[digest]))
                    continue
                try:
                    info = probe(e.ref, verify=verify)
                except AudioError as err:
                    report.failures.append(PoolFailure(e.ref, err.reason))
                    log.warning("pool: skipping %s", err)
                    continue
                seen[digest] = e.ref
                info["sha256"] = digest
                if "package" in e.meta:
                    info["licence"] = _track_licence(e, copyrights)
                tid = _unique_id(f"{e.label}/{e.rel}", ids)
                artist = e.meta.get("artist")
                extra = {"source": e.label,
                         **{k: v for k, v in e.meta.items()
                            if k not in ("artist", "root", "members")},
                         **{k: v for k, v in info.items() if k != "duration"}}
                track = Track(tid, e.ref, (), "unlabelled", info["duration"], artist, extra)
                writer.write(track)
            report.count_by_source[e.label] = report.count_by_source.get(e.label, 0) + 1
            report.seconds_by_source[e.label] = (report.seconds_by_source.get(e.label, 0.0)
                                                 + (track.duration or 0.0))
    _write_failures(out, report.failures)
    report.elapsed_s = time.perf_counter() - t0
    return report


def _unique_id(base: str, taken: set[str]) -> str:
    tid, n = base, 1
    while tid in taken:  # two user folders with the same name
        n += 1
        tid = f"{base}#{n}"
    taken.add(tid)
    return tid


def _write_failures(out: Path, failures: list[PoolFailure]) -> None:
    path = out.with_name(out.stem + ".failures.jsonl")
    if not failures:
        path.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
        return
    with open(path, "w", encoding="utf-8") as f:
        for fail in failures:
            f.write(json.dumps({"path": fail.path, "reason": fail.reason}) + "\n")


def build_pool(
    out_manifest: str | Path,
    sources: list[str | Path] | None = None,
    progress: bool = True,
) -> Path:
    """Build the unlabelled pool manifest; ``None`` sources = every pool package found."""
    report = build_pool_report(out_manifest, sources, progress=progress)
    log.info("pool: %d recordings, %.2f h, %d failures -> %s", report.n_tracks, report.hours,
             len(report.failures), report.manifest)
    return report.manifest


def print_report(report: PoolReport, console) -> None:
    """The rich summary table the CLI prints."""
    from rich.table import Table

    table = Table(title=f"Unlabelled pool -> {report.manifest}")
    table.add_column("source")
    table.add_column("kind")
    table.add_column("recordings", justify="right")
    table.add_column("hours", justify="right")
    for label, n in sorted(report.count_by_source.items()):
        table.add_row(label, report.kind_by_source.get(label, "-"), str(n),
                      f"{report.seconds_by_source[label] / 3600:.2f}")
    table.add_row("[bold]total[/]", "", f"[bold]{report.n_tracks}[/]",
                  f"[bold]{report.hours:.2f}[/]")
    console.print(table)
    if report.kind_by_source:
        kinds = sorted(report.seconds_by_kind.items(), key=lambda kv: -kv[1])
        console.print("by kind: " + ", ".join(f"{k} {s / 3600:.2f} h" for k, s in kinds))
    if report.duplicates:
        console.print(f"{len(report.duplicates)} duplicate file(s) skipped (same bytes as one "
                      f"already in the pool)")
    for m in report.missing_sources:
        console.print(f"[yellow]not found:[/] {m}")
    if report.failures:
        console.print(f"[red]{len(report.failures)} unreadable file(s) skipped:[/]")
        for f in report.failures:
            console.print(f"  {f.path}: {f.reason}", markup=False, highlight=False)
    console.print(f"built in {report.elapsed_s:.1f} s")
