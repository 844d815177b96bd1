"""Feature cache: decode, resample and log-mel every track once, so epochs read arrays.

``build_cache(tracks, DIR)`` stores, per distinct audio content, the 16 kHz mono PCM as int16
(training augments the waveform before the mel, so it needs audio) and the full-track log-mel
as float16 ``(n_mels, 1 + samples // hop)``. :class:`FeatureCache` memory-maps both.

Layout of ``DIR``: ``cache.json`` (format version and front-end parameters), the append-only
raw files ``pcm.i16`` and ``mel.f16``, and ``index.jsonl`` with two record types: ``entry``
(content key -> offsets and lengths, in elements) and ``path`` (path -> key, with the file's
size and mtime so a lookup rehashes only a changed file). An entry's index line is written
only after its data is flushed and fsynced, so a kill loses at most the entry in progress;
the next build cuts any unindexed tail off the data files and goes on. The key is the sha256
of the file's bytes (a zip member's bytes for ``zip://`` references) combined with a hash of
``LogMel.params()`` and :data:`FORMAT_VERSION`: the same content under two paths is stored
once, and a folder built with other front-end parameters is refused with both sets shown.

Thread safety: one build per folder at a time (an advisory lock enforces it). A
:class:`FeatureCache` is read-only, can be shared by threads and pickled into DataLoader
workers (each process maps the files again); it does not see entries added after it opened.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rtagger.atomic import atomic_write
from rtagger.audio.decode import FRAMES_PER_WINDOW, SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.errors import AudioError, RtaggerError
from rtagger.model.features import AMIN, LogMel
from rtagger.train.data.manifest import Track, parse_zip_ref
from rtagger.train.data.pool import load_track_audio

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE, INDEX_FILE, PCM_FILE, MEL_FILE = "cache.json", "index.jsonl", "pcm.i16", "mel.f16"
FAILURES_FILE, LOCK_FILE = "failures.jsonl", ".lock"
MEL_CHUNK_FRAMES = 8192  # ~131 s per STFT piece: caps peak memory at ~50 MB on long tracks
PCM_SCALE = 32768.0  # int16 full scale
MEL_FLOOR_DB = 10.0 * float(np.log10(AMIN))  # what digital silence gives: window_mel padding
_CTOR_KEYS = ("sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max")
# Errors of one unreadable file (zipfile reports damage in many ways); anything else is a bug.
_FILE_ERRORS = (RtaggerError, OSError, zipfile.BadZipFile, KeyError, EOFError, zlib.error,
                NotImplementedError)


class CacheError(RtaggerError):
    """A cache folder is unusable, busy, built with other parameters, or lacks a track."""


def frontend_id(params: dict) -> str:
    """Short hash of the front-end parameters and the cache format: part of every key."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(ref: str) -> str:
    """sha256 of a file's bytes, or of a ``zip://ARCHIVE!MEMBER``'s uncompressed bytes."""
    h = hashlib.sha256()
    zipped = parse_zip_ref(ref)
    if zipped is None:
        with open(ref, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        with zipfile.ZipFile(zipped[0]) as z, z.open(zipped[1]) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _signature(ref: str) -> list[int]:
    # A zip member changes only when its archive does, so the archive's stat stands for it.
    zipped = parse_zip_ref(ref)
    st = os.stat(ref if zipped is None else zipped[0])
    return [st.st_size, st.st_mtime_ns]


def logmel_chunked(samples: np.ndarray, frontend: LogMel,
                   chunk_frames: int = MEL_CHUNK_FRAMES) -> np.ndarray:
    """``(samples,)`` float32 -> ``(n_mels, 1 + samples // hop)`` float32 dB, in pieces.

    Equals ``frontend`` run on the whole signal: each piece carries a margin of at least
    ``n_fft / 2`` samples beyond the frames it keeps, so every kept frame sees the same
    samples, and a piece that touches a true track end gets the same reflect padding there.
    """
    hop, n = frontend.hop_length, len(samples)
    margin = -(-frontend.n_fft // hop) * hop  # >= n_fft: pieces stay longer than the padding
    n_frames = 1 + n // hop
    out = np.empty((frontend.n_mels, n_frames), np.float32)
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    with torch.inference_mode():
        for a in range(0, n_frames, chunk_frames):
            b = min(a + chunk_frames, n_frames)
            s0, s1 = max(0, a * hop - margin), min(n, (b - 1) * hop + margin)
            j0 = a - s0 // hop
            out[:, a:b] = frontend(x[None, s0:s1])[0, :, j0 : j0 + b - a].numpy()
    return out


_FRONTENDS: dict[tuple, LogMel] = {}


def _hash_job(ref: str) -> tuple[str | None, str | None]:
    # Worker results carry the reason as text: typed errors with custom __init__ don't unpickle.
    try:
        return file_sha256(ref), None
    except _FILE_ERRORS as e:
        return None, f"cannot read ({getattr(e, 'reason', None) or e})"


def _decode_job(ref: str, ctor: tuple, chunk_frames: int):
    """``(pcm int16, mel float16, None)`` or ``(None, None, reason)``; runs in a worker."""
    frontend = _FRONTENDS.get(ctor)
    if frontend is None:  # built once per process, not once per track
        frontend = _FRONTENDS[ctor] = LogMel(*ctor)
    try:
        x = load_track_audio(ref)
        if len(x) < frontend.n_fft:
            raise AudioError(ref, f"too short: {len(x)} samples, under one FFT frame")
        mel = logmel_chunked(x, frontend, chunk_frames)
    except _FILE_ERRORS as e:
        return None, None, getattr(e, "reason", None) or str(e)
    pcm = np.clip(np.rint(x * PCM_SCALE), -32768, 32767).astype(np.int16)
    return pcm, mel.astype(np.float16), None


def _init_worker() -> None:
    torch.set_num_threads(1)  # one core per worker: N workers must not each spawn N threads


def _run_tasks(pool, fn, tasks: list, window: int) -> Iterator[tuple]:
    """``(tag, fn(*args))`` for ``(tag, args)`` tasks; at most ``window`` results pending."""
    if pool is None:
        yield from ((tag, fn(*args)) for tag, args in tasks)
        return
    todo, pending = iter(tasks), {}
    while True:
        # Bounded, so decoded tracks never pile up in memory faster than they are written.
        while len(pending) < window and (task := next(todo, None)) is not None:
            pending[pool.submit(fn, *task[1])] = task[0]
        if not pending:
            return
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            try:
                result = fut.result()
            except BrokenProcessPool as e:  # a decoder crashed hard or the OOM killer struck
                raise CacheError("a worker process died; entries written so far are kept, "
                                 "run the build again to resume") from e
            yield pending.pop(fut), result


def _check_meta(root: Path, params: dict, *, create: bool) -> None:
    meta = root / META_FILE
    if not meta.exists():
        if not create:
            raise CacheError(f"{root}: not a feature cache (no {META_FILE})")
        if (root / INDEX_FILE).exists():
            raise CacheError(f"{root}: has {INDEX_FILE} but no {META_FILE}; refusing to guess")
        atomic_write(meta, json.dumps({"format_version": FORMAT_VERSION, "frontend": params,
                                       "frontend_id": frontend_id(params)}, indent=1))
        return
    try:
        have = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{meta}: unreadable ({e})") from e
    if have.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{root}: cache format {have.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}; build a new cache in another folder")
    if have.get("frontend_id") != frontend_id(params):
        old = have.get("frontend") or {}
        diff = ", ".join(f"{k}: cache {old.get(k)!r} vs requested {params.get(k)!r}"
                         for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k))
        raise CacheError(f"{root} was built with other front-end parameters ({diff}); "
                         "use another --out folder for these parameters")


def _read_index(root: Path) -> tuple[dict[str, dict], dict[str, dict], int]:
    """Entries by key and path records by path (last wins), and the bytes of whole lines."""
    path = root / INDEX_FILE
    data = path.read_bytes() if path.exists() else b""
    good = data.rfind(b"\n") + 1  # a killed writer's partial last line is not a record
    entries, paths = {}, {}
    for lineno, line in enumerate(data[:good].splitlines(), start=1):
        try:
            rec = json.loads(line)
            if rec["type"] == "entry":
                entries[rec["key"]] = rec
            else:
                paths[rec["path"]] = rec
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{path}:{lineno}: malformed index record ({e})") from e
    return entries, paths, good


@dataclass(frozen=True)
class CacheEntry:
    """Where one content's arrays sit: offsets and lengths in elements, not bytes."""

    key: str
    sha256: str
    pcm_offset: int
    n_samples: int
    mel_offset: int
    n_frames: int

    @property
    def duration(self) -> float:
        return self.n_samples / SAMPLE_RATE


def _entry(rec: dict) -> CacheEntry:
    return CacheEntry(rec["key"], rec["sha256"], rec["pcm_offset"], rec["n_samples"],
                      rec["mel_offset"], rec["n_frames"])


class _Writer:
    """The build's single writer: lock, meta check, crash recovery, fsynced appends."""

    def __init__(self, root: Path, params: dict, n_mels: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.n_mels, self.fid = root, n_mels, frontend_id(params)
        self._lock = open(root / LOCK_FILE, "w")  # held (locked) until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock.close()
            raise CacheError(f"{root}: another build is writing this cache") from e
        try:
            self._open(params)
        except BaseException:
            self._lock.close()  # a refused build must not keep the folder locked
            raise

    def _open(self, params: dict) -> None:
        root, n_mels = self.root, self.n_mels
        _check_meta(root, params, create=True)
        self.entries, self.paths, good = _read_index(root)
        self.pcm_end = self.mel_end = 0
        pcm_len, mel_len = _size(root / PCM_FILE) // 2, _size(root / MEL_FILE) // 2
        n_indexed = len(self.entries)
        for key, rec in list(self.entries.items()):
            p_end = rec["pcm_offset"] + rec["n_samples"]
            m_end = rec["mel_offset"] + rec["n_frames"] * n_mels
            # Only a data file cut behind our back gets here (data is fsynced before its line).
            if p_end > pcm_len or m_end > mel_len:
                log.warning("%s: index entry %s has no data behind it; dropping it", root, key)
                del self.entries[key]
            else:
                self.pcm_end, self.mel_end = max(self.pcm_end, p_end), max(self.mel_end, m_end)
        if len(self.entries) < n_indexed:  # rewrite without them, atomically
            self.paths = {p: r for p, r in self.paths.items() if r["key"] in self.entries}
            atomic_write(root / INDEX_FILE, b"".join(
                _line(r) for r in [*self.entries.values(), *self.paths.values()]))
            good = _size(root / INDEX_FILE)
        self._index = open(root / INDEX_FILE, "ab")
        self._index.truncate(good)
        self._pcm = _open_at(root / PCM_FILE, self.pcm_end * 2)
        self._mel = _open_at(root / MEL_FILE, self.mel_end * 2)

    def key_for(self, path: str, sig: list[int]) -> str | None:
        rec = self.paths.get(path)
        return rec["key"] if rec and rec["sig"] == sig and rec["key"] in self.entries else None

    def add_path(self, path: str, sig: list[int], key: str) -> None:
        self.paths[path] = rec = {"type": "path", "path": path, "sig": sig, "key": key}
        self._write([rec])  # not fsynced: losing one costs a rehash, never wrong data

    def append(self, key: str, sha: str, pcm: np.ndarray, mel: np.ndarray) -> None:
        for f, arr in ((self._pcm, pcm), (self._mel, mel)):
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        rec = {"type": "entry", "key": key, "sha256": sha, "pcm_offset": self.pcm_end,
               "n_samples": len(pcm), "mel_offset": self.mel_end, "n_frames": mel.shape[1]}
        self._write([rec], sync=True)  # only now does the entry exist
        self.entries[key] = rec
        self.pcm_end, self.mel_end = self.pcm_end + len(pcm), self.mel_end + mel.size

    def _write(self, recs: list[dict], sync: bool = False) -> None:
        self._index.write(b"".join(_line(r) for r in recs))
        self._index.flush()
        if sync:
            os.fsync(self._index.fileno())

    def close(self) -> None:
        for f in (self._pcm, self._mel, self._index):
            f.close()
        self._lock.close()  # releases the flock


def _line(rec: dict) -> bytes:
    return json.dumps(rec, ensure_ascii=False).encode() + b"\n"


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _open_at(path: Path, end: int):
    """Open for appending after cutting whatever a killed build wrote past ``end`` bytes."""
    f = open(path, "ab")
    if f.tell() > end:
        log.warning("%s: dropping %d bytes of an unfinished entry", path, f.tell() - end)
        f.truncate(end)
        f.seek(end)
    return f


class FeatureCache:
    """Read side: memory-mapped PCM and log-mel of the tracks a build stored in ``root``.

    Tracks are found by path (a :class:`Track` or its ``path`` string). A path whose file
    size or mtime changed since it was cached is hashed again and still found when its
    content is stored; a cached file that no longer exists is served from the cache.
    """

    def __init__(self, root: str | Path, frontend: LogMel | None = None) -> None:
        self.root = Path(root)
        self.frontend_params = (LogMel() if frontend is None else frontend).params()
        self.n_mels = self.frontend_params["n_mels"]
        _check_meta(self.root, self.frontend_params, create=False)
        raw, self._paths, _ = _read_index(self.root)
        sizes = _size(self.root / PCM_FILE) // 2, _size(self.root / MEL_FILE) // 2
        # An entry whose data is missing (a truncated copy of the folder) is not served.
        self._entries = {k: e for k, e in ((k, _entry(r)) for k, r in raw.items())
                         if e.pcm_offset + e.n_samples <= sizes[0]
                         and e.mel_offset + e.n_frames * self.n_mels <= sizes[1]}
        if len(self._entries) < len(raw):
            log.warning("%s: %d entries have no data behind them; run a build to repair",
                        self.root, len(raw) - len(self._entries))
        self._resolved: dict[str, CacheEntry] = {}
        self._maps: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        # Pickling a memmap copies its whole contents; workers map the files themselves.
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, track: Track | str) -> bool:
        try:
            self.entry(track)
        except CacheError:
            return False
        return True

    def entry(self, track: Track | str) -> CacheEntry:
        """The stored entry of a track; :class:`CacheError` when it is not cached."""
        path = track.path if isinstance(track, Track) else str(track)
        hit = self._resolved.get(path)
        if hit is not None:
            return hit
        rec = self._paths.get(path)
        try:
            sig = _signature(path)
        except OSError:
            sig = None  # the audio is gone (or elsewhere): the index still knows it
        if rec is not None and rec["key"] in self._entries and sig in (None, rec["sig"]):
            key = rec["key"]
        elif sig is None:
            raise CacheError(f"{path}: not cached and not readable")
        else:
            try:
                key = f"{frontend_id(self.frontend_params)}-{file_sha256(path)}"
            except _FILE_ERRORS as e:
                raise CacheError(f"{path}: not cached and cannot be hashed ({e})") from e
            if key not in self._entries:
                raise CacheError(f"{path}: not cached (or changed since it was cached)")
        self._resolved[path] = hit = self._entries[key]
        return hit

    def _mapped(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            if not self._entries:
                raise CacheError(f"{self.root}: the cache is empty")
            self._maps = (np.memmap(self.root / PCM_FILE, np.int16, mode="r"),
                          np.memmap(self.root / MEL_FILE, np.float16, mode="r"))
        return self._maps

    def pcm(self, track: Track | str) -> np.ndarray:
        """``(samples,)`` int16 read-only view at 16 kHz; divide by 32768 for [-1, 1)."""
        e = self.entry(track)
        return self._mapped()[0][e.pcm_offset : e.pcm_offset + e.n_samples]

    def mel(self, track: Track | str) -> np.ndarray:
        """``(n_mels, frames)`` float16 dB read-only view; frame ``t`` is centred on sample
        ``t * hop_length``."""
        e = self.entry(track)
        flat = self._mapped()[1][e.mel_offset : e.mel_offset + e.n_frames * self.n_mels]
        return flat.reshape(self.n_mels, e.n_frames)

    def duration(self, track: Track | str) -> float:
        """Seconds of decoded audio."""
        return self.entry(track).duration

    def window_pcm(self, track: Track | str, start_sample: int,
                   n: int = WINDOW_SAMPLES) -> np.ndarray:
        """``(n,)`` float32 samples from ``start_sample``, zero past the end of the track."""
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        out = np.zeros(n, np.float32)
        part = self.pcm(track)[start_sample : start_sample + n]
        out[: len(part)] = part / np.float32(PCM_SCALE)
        return out

    def window_mel(self, track: Track | str, start_frame: int,
                   n_frames: int = FRAMES_PER_WINDOW) -> np.ndarray:
        """``(n_mels, n_frames)`` float32 dB from ``start_frame``; past the end the floor
        (:data:`MEL_FLOOR_DB`, what silence gives). Its frames ``1 .. n_frames - 2`` equal
        ``LogMel`` of ``window_pcm(track, start_frame * hop, ...)``; the two edge frames
        differ there because the window's own STFT reflect-pads its ends."""
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        out = np.full((self.n_mels, n_frames), MEL_FLOOR_DB, np.float32)
        part = self.mel(track)[:, start_frame : start_frame + n_frames]
        out[:, : part.shape[1]] = part
        return out


@dataclass(frozen=True)
class CacheFailure:
    """A track that could not be cached, and why."""

    path: str
    reason: str
    id: str = ""


@dataclass
class CacheReport:
    """What one build did. ``n_skipped`` counts tracks already stored (by path or content)."""

    cache_dir: Path
    n_done: int = 0
    n_skipped: int = 0
    failures: list[CacheFailure] = field(default_factory=list)
    audio_s: float = 0.0  # cached audio of the given tracks (done + skipped), seconds
    decoded_s: float = 0.0  # audio decoded by this run, seconds
    bytes_on_disk: int = 0
    elapsed_s: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def speed_x(self) -> float:
        """Decoded audio seconds per wall-clock second (x real time)."""
        return self.decoded_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


def build_cache(tracks: Iterable[Track], cache_dir: str | Path, jobs: int = 1,
                progress: bool = True, *, frontend: LogMel | None = None,
                chunk_frames: int = MEL_CHUNK_FRAMES) -> CacheReport:
    """Cache every track not yet stored; resumable, and one bad file never ends the job.

    ``jobs > 1`` hashes and decodes in that many spawned processes; this process alone
    writes. Failures are returned and written to ``cache_dir/failures.jsonl``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    t0, root = time.perf_counter(), Path(cache_dir)
    frontend = LogMel() if frontend is None else frontend
    if frontend.sample_rate != SAMPLE_RATE:
        raise CacheError(f"front end at {frontend.sample_rate} Hz; audio decodes to "
                         f"{SAMPLE_RATE} Hz")
    params, ctor = frontend.params(), tuple(getattr(frontend, k) for k in _CTOR_KEYS)
    report = CacheReport(cache_dir=root)
    writer = _Writer(root, params, frontend.n_mels)
    pool = None if jobs <= 1 else ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    bar = Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[name]}"), disable=not progress, transient=True)

    def ok(key: str) -> None:
        report.audio_s += writer.entries[key]["n_samples"] / SAMPLE_RATE

    def fail(t: Track, reason: str) -> None:
        report.failures.append(CacheFailure(t.path, reason, t.id))
        log.warning("cache: skipping %s: %s", t.path, reason)

    try:
        with bar:
            todo = []
            for t in tracks:
                try:
                    sig = _signature(t.path)
                except _FILE_ERRORS as e:
                    fail(t, f"cannot open ({getattr(e, 'reason', None) or e})")
                    continue
                key = writer.key_for(t.path, sig)
                if key is None:
                    todo.append((t, sig))
                else:
                    report.n_skipped += 1
                    ok(key)
            # Content decides: a copied or renamed file is hashed, not decoded again.
            hashing = bar.add_task("hash", total=len(todo), name="")
            groups: dict[str, list[tuple[Track, list[int], str]]] = {}
            window = 2 * max(jobs, 1)
            for (t, sig), (sha, err) in _run_tasks(pool, _hash_job,
                                                   [((t, s), (t.path,)) for t, s in todo], window):
                bar.update(hashing, advance=1, name=t.id[-40:])
                if err is not None:
                    fail(t, err)
                    continue
                key = f"{writer.fid}-{sha}"
                if key in writer.entries:
                    writer.add_path(t.path, sig, key)
                    report.n_skipped += 1
                    ok(key)
                else:
                    groups.setdefault(key, []).append((t, sig, sha))
            decoding = bar.add_task("cache", total=len(groups), name="")
            tasks = [(k, (g[0][0].path, ctor, chunk_frames)) for k, g in groups.items()]
            for key, (pcm, mel, err) in _run_tasks(pool, _decode_job, tasks, window):
                group = groups[key]
                bar.update(decoding, advance=1, name=group[0][0].id[-40:])
                if err is not None:
                    for t, _, _ in group:  # same bytes, same failure
                        fail(t, err)
                    continue
                writer.append(key, group[0][2], pcm, mel)
                for t, sig, _ in group:
                    writer.add_path(t.path, sig, key)
                    ok(key)
                report.n_done += 1
                report.n_skipped += len(group) - 1
                report.decoded_s += len(pcm) / SAMPLE_RATE
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        writer.close()
    _write_failures(root / FAILURES_FILE, report.failures)
    report.bytes_on_disk = sum(_size(root / f) for f in (PCM_FILE, MEL_FILE, INDEX_FILE))
    report.elapsed_s = time.perf_counter() - t0
    return report


def _write_failures(path: Path, failures: list[CacheFailure]) -> None:
    if not failures:
        path.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
        return
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(_line({"id": x.id, "path": x.path, "reason": x.reason}).decode()
                     for x in failures)


def print_report(report: CacheReport, console) -> None:
    """The rich summary table the CLI prints."""
    from rich.table import Table

    table = Table(title=f"Feature cache -> {report.cache_dir}", show_header=False)
    for name, value in (
        ("tracks cached now", report.n_done),
        ("tracks already cached", report.n_skipped),
        ("failures", report.n_failed),
        ("hours cached (these manifests)", f"{report.audio_s / 3600:.2f}"),
        ("GB on disk (whole cache)", f"{report.bytes_on_disk / 1e9:.2f}"),
        ("speed", f"{report.speed_x:.0f}x real time ({report.elapsed_s:.1f} s)"),
    ):
        table.add_row(name, str(value))
    console.print(table)
    if report.failures:
        console.print(f"{report.n_failed} track(s) not cached (see "
                      f"{report.cache_dir / FAILURES_FILE}):", style="red")
        for f in report.failures:
            console.print(f"  {f.path}: {f.reason}", markup=False, highlight=False, soft_wrap=True)

