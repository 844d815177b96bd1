"""``catalog add``: decode in worker processes, tag in one batched owner, store as tracks finish.

Data path per track::

    worker process:  hash the file -> unchanged? skip -> iter_audio -> Windower(hop)
                     -> (windows, n) float32 sent back with the hash and the decode time
    main thread:     InferenceWorker.tag(windows)            (one owner of the engine,
                     [InferenceWorker.aggregate(context)]      batching across tracks)
                     TrackSession.add per window -> track tags, embedding -> Catalog.put

Decoding (FFmpeg through PyAV, plus resampling to 16 kHz) is most of the CPU time for
44.1 kHz MP3s and is independent per file, so it runs in ``workers`` processes; the model
runs in the main process's :class:`~rtagger.pipeline.worker.InferenceWorker` thread, the
server's rule (one thread owns the model and batches every caller's windows). Tags equal
:meth:`~rtagger.pipeline.tagger.Tagger.tag_file`'s: the same windows, the same session.

Resume: every track is committed on its own as soon as it is tagged, so a killed run loses
only the tracks in flight; the next run skips what :mod:`rtagger.catalog.store` says is
unchanged (same content hash, same setup). At most ``2 * workers + 2`` tracks are in flight
(decoded PCM is ~0.24 MB per 3.69 s window), so memory does not grow with the library.

Failure model: a file that cannot be decoded (:class:`~rtagger.errors.AudioError`) gets a
``failures`` row with its reason and the run goes on; so does one whose decoder raised
anything else (logged with its traceback: a bug, but one file must not stop a library).
A failed inference batch fails the tracks in it the same way. A worker process that dies
(a crashing decoder) stops the run with :class:`~rtagger.catalog.store.CatalogError`;
everything committed stays, and a rerun continues.

Thread safety: :func:`add_to_catalog` runs in one thread (the catalog connection's); only
the inference worker's thread touches the engine.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES, iter_audio
from rtagger.audio.ringbuffer import Window, Windower
from rtagger.catalog.sources import Source
from rtagger.catalog.store import Catalog, CatalogError, Setup, TrackRecord
from rtagger.errors import RtaggerError
from rtagger.model.checkpoint import tags_sha256
from rtagger.model.vocab import vocabulary_version
from rtagger.pipeline.tagger import Tagger
from rtagger.pipeline.worker import InferenceWorker

log = logging.getLogger(__name__)

_HASH_BLOCK = 1 << 20


def default_workers() -> int:
    """Decoding processes: one per core. Decoding is most of the work, and the inference
    thread shares the cores (on 2 cores, 2 workers ran 491x real time, 1 worker 319x:
    docs/catalog.md)."""
    return max(1, os.cpu_count() or 1)


def setup_of(tagger: Tagger) -> Setup:
    """The catalog's description of what ``tagger`` produces."""
    m = tagger.model
    tags = tuple(m.tags)
    digest = tags_sha256(list(tags))
    vocabulary = vocabulary_version(list(tags)) or f"custom-{digest[:12]}"
    return Setup(weights_sha256=m.weights_sha256 or "", hop_s=tagger.hop / SAMPLE_RATE,
                 aggregation=tagger.new_session().context.method, model_name=m.name,
                 model_source=m.source or m.name, trained=m.trained, tags=tags,
                 tags_sha256=digest, vocabulary=vocabulary,
                 embedding_dim=m.tagger.cfg.embedding_dim)


# --- the worker process's side ------------------------------------------------------------

@dataclass
class Decoded:
    source: str
    content_sha256: str
    samples: np.ndarray  # (windows, WINDOW_SAMPLES) float32
    starts: np.ndarray  # (windows,) first sample of each window
    valid: np.ndarray  # (windows,) real samples in each window
    duration_s: float
    hash_s: float
    decode_s: float


@dataclass
class Unchanged:
    source: str
    reason: str
    hash_s: float


@dataclass
class Failed:
    source: str
    content_sha256: str | None
    error: str
    reason: str
    hash_s: float = 0.0
    decode_s: float = 0.0


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def decode_source(source: str, hop: int, skip_if: tuple[str, ...] = ()) -> (
        Decoded | Unchanged | Failed):
    """Hash and decode one source into windows (runs in a worker process).

    A file whose sha256 is in ``skip_if`` is not decoded. A URL's content hash is the
    sha256 of its decoded 16 kHz PCM (its bytes are not fetched twice).
    """
    t0 = time.perf_counter()
    digest: str | None = None
    try:
        if not Source(source).is_url:
            try:
                digest = file_sha256(source)
            except OSError as e:
                return Failed(source, None, "AudioError", f"{source}: cannot read "
                              f"({e.strerror or e})", time.perf_counter() - t0)
            if digest in skip_if:
                return Unchanged(source, "unchanged", time.perf_counter() - t0)
        t1 = time.perf_counter()
        pcm_hash = hashlib.sha256()
        windower = Windower(hop)
        windows: list[Window] = []
        produced = 0
        for block in iter_audio(source):
            if digest is None:
                pcm_hash.update(block.tobytes())
            produced += block.size
            windows.extend(windower.push(block))
        windows.extend(windower.flush())
        digest = digest or pcm_hash.hexdigest()
        return Decoded(source, digest,
                       np.stack([w.samples for w in windows]) if windows
                       else np.zeros((0, WINDOW_SAMPLES), np.float32),
                       np.array([w.start for w in windows], np.int64),
                       np.array([w.valid for w in windows], np.int64),
                       produced / SAMPLE_RATE, t1 - t0, time.perf_counter() - t1)
    except RtaggerError as e:
        return Failed(source, digest, type(e).__name__, str(e),
                      decode_s=time.perf_counter() - t0)
    except Exception as e:  # one file's decoder bug must not stop a library's run
        log.exception("decoding %s failed unexpectedly", source)
        return Failed(source, digest, type(e).__name__, f"{source}: {e}",
                      decode_s=time.perf_counter() - t0)


# --- the main process's side --------------------------------------------------------------

@dataclass
class AddReport:
    """What one ``add`` run did, and where its time went (seconds)."""

    total: int = 0
    added: int = 0
    skipped: int = 0
    failed: int = 0
    audio_s: float = 0.0  # seconds of audio tagged in this run
    wall_s: float = 0.0
    hash_s: float = 0.0  # summed over workers
    decode_s: float = 0.0  # summed over workers (FFmpeg decode + resample + windowing)
    inference_s: float = 0.0  # the inference thread's busy time (model + aggregator)
    store_s: float = 0.0  # SQLite writes in the main thread
    windows: int = 0
    batches: int = 0
    workers: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def tracks_per_s(self) -> float:
        return (self.added + self.failed) / self.wall_s if self.wall_s else 0.0

    @property
    def realtime_factor(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["tracks_per_s"] = self.tracks_per_s
        d["realtime_factor"] = self.realtime_factor
        d["mean_batch"] = self.windows / self.batches if self.batches else 0.0
        return d


@dataclass
class _Job:
    source: Source
    decoded: Decoded | None = None
    windows: list[Window] | None = None
    probs: np.ndarray | None = None  # (windows, n_tags)
    embs: np.ndarray | None = None  # (windows, d)
    track_probs: np.ndarray | None = None  # (n_tags,) from the worker's aggregator


def plan_sources(catalog: Catalog, sources: list[Source], setup: Setup, *, retag: bool = False,
         retry_failed: bool = False) -> tuple[list[tuple[Source, tuple[str, ...]]], int]:
    """The sources to send to the decoders, each with the content hashes that mean "already
    done" (the worker hashes the file and skips it on a match), and how many were skipped
    without sending (stored URLs).
    The one set of skip rules, for local and Ray runs.
    """
    stored, failed = catalog.stored(), catalog.failed()
    todo: list[tuple[Source, tuple[str, ...]]] = []
    skipped = 0
    for src in sources:
        skip: list[str] = []
        have = stored.get(src.location)
        if have is not None and have[1] == setup.id and not retag:
            if src.is_url:  # a URL's bytes are only known by fetching it again
                skipped += 1
                continue
            skip.append(have[0])
        bad = failed.get(src.location)
        if bad is not None and bad[1] == setup.id and bad[0] and not retry_failed:
            skip.append(bad[0])
        todo.append((src, tuple(skip)))
    return todo, skipped



def add_to_catalog(
    catalog: Catalog,
    sources: list[Source],
    tagger: Tagger,
    *,
    workers: int | None = None,
    retag: bool = False,
    retry_failed: bool = False,
    max_batch: int = 32,
    on_progress: Callable[[AddReport], None] | None = None,
) -> AddReport:
    """Tag ``sources`` into ``catalog`` with ``tagger``'s model, hop and aggregation.

    ``retag`` re-tags tracks that are already stored unchanged; ``retry_failed`` retries
    files that failed before with the same bytes. ``on_progress`` is called after each
    finished source with the running report.
    """
    setup = catalog.register_setup(setup_of(tagger))
    report = AddReport(total=len(sources), workers=workers or default_workers())
    t_start = time.perf_counter()
    todo, report.skipped = plan_sources(catalog, sources, setup, retag=retag,
                                        retry_failed=retry_failed)
    if on_progress is not None:
        on_progress(report)

    aggregator = tagger.model.aggregator if setup.aggregation == "aggregator" else None
    # spawn, not fork: by the time jobs are submitted the inference thread runs, and a fork
    # of a process with live threads may inherit a held lock.
    pool = cf.ProcessPoolExecutor(report.workers,
                                  mp_context=multiprocessing.get_context("spawn"))
    owner = InferenceWorker(tagger.engine, aggregator, max_batch=max_batch,
                            max_wait_s=0.002)
    pending: dict[cf.Future, tuple[str, _Job]] = {}
    limit = 2 * report.workers + 2
    queue = iter(todo)

    def fill() -> None:
        while len(pending) < limit:
            nxt = next(queue, None)
            if nxt is None:
                return
            src, skip = nxt
            fut = pool.submit(decode_source, src.location, tagger.hop, skip)
            pending[fut] = ("decode", _Job(src))

    def finish(job: _Job | None, outcome: Failed | None = None) -> None:
        if outcome is not None:
            catalog.put_failure(outcome.source, outcome.content_sha256, setup.id,
                                outcome.error, outcome.reason)
            report.failed += 1
            report.failures.append({"source": outcome.source, "error": outcome.error,
                                    "reason": outcome.reason})
        elif job is not None:
            t0 = time.perf_counter()
            catalog.put(_record(job, tagger, setup))
            report.store_s += time.perf_counter() - t0
            report.added += 1
            report.audio_s += job.decoded.duration_s
        report.wall_s = time.perf_counter() - t_start
        if on_progress is not None:
            on_progress(report)

    try:
        fill()
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                stage, job = pending.pop(fut)
                try:
                    result = fut.result()
                except cf.process.BrokenProcessPool as e:
                    raise CatalogError(f"a decoding worker died ({e}); every finished "
                                       f"track is stored, rerun to continue") from e
                except Exception as e:  # a failed batch fails its tracks, not the run
                    finish(None, Failed(job.source.location, None, type(e).__name__,
                                        f"{job.source.location}: inference failed ({e})"))
                    continue
                if stage == "decode":
                    _decoded(result, job, owner, pending, report, finish)
                elif stage == "tag":
                    job.probs, job.embs = result
                    if aggregator is not None:
                        ctx = _session(job, tagger).context.context()
                        pending[owner.aggregate([ctx])] = ("aggregate", job)
                    else:
                        finish(job)
                else:
                    job.track_probs = result[0]
                    finish(job)
            fill()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        owner.close()
        report.inference_s = owner.stats.busy_s
        report.windows, report.batches = owner.stats.windows, owner.stats.batches
        report.wall_s = time.perf_counter() - t_start
    return report


def _decoded(result, job: _Job, owner: InferenceWorker, pending: dict, report: AddReport,
             finish: Callable) -> None:
    report.hash_s += result.hash_s
    if isinstance(result, Unchanged):
        report.skipped += 1
        finish(None)
        return
    if isinstance(result, Failed):
        report.decode_s += result.decode_s
        finish(None, result)
        return
    report.decode_s += result.decode_s
    job.decoded = result
    job.windows = [Window(i, int(s), result.samples[i], int(v), v < WINDOW_SAMPLES)
                   for i, (s, v) in enumerate(zip(result.starts, result.valid, strict=True))]
    pending[owner.tag(list(result.samples))] = ("tag", job)


def _session(job: _Job, tagger: Tagger):
    session = tagger.new_session(source=job.source.location)
    for w, p, e in zip(job.windows, job.probs, job.embs, strict=True):
        session.add(w, p, e)
    return session


def track_embedding(embs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The track embedding: window embeddings ``(windows, d)`` averaged with weights
    ``valid / WINDOW_SAMPLES`` (as the mean tags are), L2-normalised, ``(d,)`` float32."""
    w = np.asarray(valid, np.float64) / WINDOW_SAMPLES
    mean = (np.asarray(embs, np.float64) * w[:, None]).sum(0) / max(w.sum(), 1e-12)
    return (mean / (np.linalg.norm(mean) + 1e-12)).astype(np.float32)


def _record(job: _Job, tagger: Tagger, setup: Setup) -> TrackRecord:
    d = job.decoded
    probs = job.track_probs
    if probs is None:
        probs = _session(job, tagger).context.track_probs()
    return TrackRecord(job.source.location, d.content_sha256, setup.id, d.duration_s,
                       probs, track_embedding(job.embs, d.valid),
                       job.probs.astype(np.float16), job.embs.astype(np.float16),
                       job.source.meta or None)
