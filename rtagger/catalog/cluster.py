"""``catalog add`` on Ray: decoding on CPU tasks, inference on actors, Parquet shards merged.

Data path (Ray Data, one streaming pipeline)::

    driver:        expand sources -> resume plan (store.py's rules) -> ray.data.from_items
    CPU tasks:     decode_row per track: decode_source (hash, skip if unchanged, FFmpeg,
                   16 kHz, windows)
    actors:        InferenceActor per batch of ``tracks_per_shard`` tracks: the engine on
                   every window of the batch, then each track's session (mean tags or the
                   context aggregator), embedding, taggram (on a GPU with ``use_gpu``);
                   write_shard: the batch as one Parquet file, atomically, named by content
    driver:        merge_shard: the shard's rows into the SQLite catalog, then delete it

It reuses :mod:`rtagger.catalog.add`'s pieces, so a track stored here is the track a local
``catalog add`` stores (same windows, same session, same embedding; only float rounding of
differently composed batches differs): :func:`~rtagger.catalog.add.decode_source` decodes,
:class:`~rtagger.pipeline.session.TrackSession` aggregates,
:func:`~rtagger.catalog.add.track_embedding` pools, :meth:`Catalog.put` stores.

Shards (``shard_dir``, default ``CATALOG.shards/``; one subfolder per tagging setup) hold
one row per track: status (``ok``, ``failed``, ``unchanged``), the content hash, duration,
the arrays as the store's raw bytes (probs and embedding float32, taggram and window
embeddings float16), meta as JSON, the failure's error and reason, timings. Actors on other
machines write there, so on a cluster it must be a folder every node sees at the same path,
as the inputs must be; the driver ships the model to the actors itself.

Resume: a shard is merged and only then deleted, and every track is its own transaction,
so a killed run leaves finished shards behind; the next run merges them first (no decoding,
no inference) and then skips what the catalog holds unchanged, exactly as ``catalog add``
does. A shard is named by the sha256 of its sources and content hashes, so a batch that Ray
retries replaces its own file instead of adding a second one.

Thread safety: :func:`add_on_ray` runs in the driver's one thread (the catalog
connection's); each actor owns its engine, and Ray gives an actor one batch at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtagger.atomic import atomic_path
from rtagger.audio.decode import SAMPLE_RATE, WINDOW_SAMPLES
from rtagger.audio.ringbuffer import Window
from rtagger.catalog.add import (
    AddReport,
    Decoded,
    Failed,
    decode_source,
    plan_sources,
    setup_of,
    track_embedding,
)
from rtagger.catalog.sources import Source
from rtagger.catalog.store import Catalog, CatalogError, Setup, TrackRecord
from rtagger.engines import ENGINES
from rtagger.errors import ConfigError
from rtagger.model.checkpoint import TaggingModel
from rtagger.pipeline.aggregate import run_aggregator
from rtagger.pipeline.tagger import Tagger

log = logging.getLogger(__name__)

DEFAULT_TRACKS_PER_SHARD = 16
# Heap reserved per decoding task. Decoding holds a track's windows twice (the list and the
# stacked array: ~2 x 19 MB for a 10-minute track). The reservation also makes the decode
# stage's resources differ from a CPU actor's: Ray Data fuses consecutive stages with equal
# resources, which would run decoding inside the few inference actors, one track at a time.
DECODE_MEMORY_BYTES = 512 << 20
_SETUP_KEY = b"rtagger_setup"


@dataclass
class RayAddReport(AddReport):
    """:class:`~rtagger.catalog.add.AddReport` plus the cluster's side (``workers``: the
    cluster's CPUs)."""

    actors: int = 0
    gpus: int = 0
    shards: int = 0  # shards merged in this run, left-over ones included
    recovered: int = 0  # tracks merged from shards a killed run left behind
    address: str | None = None


def shard_folder(shard_dir: str | Path, setup: Setup) -> Path:
    """The subfolder of ``shard_dir`` for one tagging setup (weights, hop, aggregation)."""
    key = f"{setup.weights_sha256}\0{setup.hop_s!r}\0{setup.aggregation}"
    return Path(shard_dir) / f"setup-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# --- CPU tasks: decoding --------------------------------------------------------------------

def decode_row(row: dict, hop: int) -> dict:
    """One input row (``source``, ``skip``: comma-joined hashes, ``meta``: JSON) -> the
    decoded track: ``samples`` ``(windows, WINDOW_SAMPLES)`` float32, ``starts`` and
    ``valid`` ``(windows,)`` int64, or no windows for a failed or unchanged file."""
    skip = tuple(h for h in row["skip"].split(",") if h)
    out = decode_source(row["source"], hop, skip)
    res = {"source": row["source"], "meta": row["meta"], "status": "unchanged",
           "content_sha256": "", "samples": np.zeros((0, WINDOW_SAMPLES), np.float32),
           "starts": np.zeros(0, np.int64), "valid": np.zeros(0, np.int64),
           "duration_s": 0.0, "hash_s": out.hash_s, "decode_s": 0.0, "error": "",
           "reason": ""}
    if isinstance(out, Decoded):
        res.update(status="ok", content_sha256=out.content_sha256, samples=out.samples,
                   starts=out.starts, valid=out.valid, duration_s=out.duration_s,
                   decode_s=out.decode_s)
    elif isinstance(out, Failed):
        res.update(status="failed", content_sha256=out.content_sha256 or "",
                   decode_s=out.decode_s, error=out.error, reason=out.reason)
    return res


# --- actors: inference ----------------------------------------------------------------------

class InferenceActor:
    """Owns one engine (and the model's aggregator); tags one batch of decoded tracks at a
    time and writes it as one shard (:func:`write_shard`), returning the shard's path.

    The actor writes the shard itself: a separate writer stage measured no faster and, on
    a small box whose CPUs the decoders and actors hold, waited for decoding to finish
    before it could run. Writing a 16-track shard takes a few milliseconds."""

    def __init__(self, model: TaggingModel, engine: str, device: str, hop: int,
                 batch_size: int, aggregation: str, shard_folder: str, setup_key: str) -> None:
        self.shard_folder, self.setup_key = shard_folder, setup_key
        # Built here, while the first tracks decode: an engine that cannot be built (no
        # CUDA, a failed ONNX export) fails the actor, and with it the run, not each track.
        self.tagger = Tagger(model, engine=engine, device=device, hop_s=hop / SAMPLE_RATE,
                             batch_size=batch_size, aggregation=aggregation)
        method = self.tagger.new_session().context.method
        self.aggregator = model.aggregator if method == "aggregator" else None

    def __call__(self, batch: dict):
        t0 = time.perf_counter()
        n = len(batch["source"])
        rows = [{k: batch[k][i] for k in ("source", "meta", "status", "content_sha256",
                                          "duration_s", "hash_s", "decode_s", "error",
                                          "reason")} for i in range(n)]
        ok = [i for i in range(n) if rows[i]["status"] == "ok"]
        for i in ok:
            if len(batch["samples"][i]) == 0:
                rows[i].update(status="failed", error="AudioError",
                               reason=f"{rows[i]['source']}: no audio decoded")
        ok = [i for i in ok if rows[i]["status"] == "ok"]
        tagged: dict[int, dict] = {}
        if ok:
            try:
                tagged = self._tag(self.tagger, [batch["samples"][i] for i in ok],
                                   [batch["starts"][i] for i in ok],
                                   [batch["valid"][i] for i in ok],
                                   [rows[i]["source"] for i in ok])
            except Exception as e:  # a failed batch fails its tracks, not the run
                log.exception("inference failed for a batch of %d tracks", len(ok))
                for i in ok:  # no content hash: retried by the next run, as catalog add
                    rows[i].update(status="failed", error=type(e).__name__, content_sha256="",
                                   reason=f"{rows[i]['source']}: inference failed ({e})")
                ok = []
        busy = time.perf_counter() - t0
        for j, i in enumerate(ok):
            rows[i].update(tagged[j], inference_s=busy / len(ok))
        return write_shard(_table(rows), self.shard_folder, self.setup_key)

    def _tag(self, tagger: Tagger, samples: list[np.ndarray], starts: list[np.ndarray],
             valid: list[np.ndarray], sources: list[str]) -> dict[int, dict]:
        windows = np.concatenate([np.asarray(s, np.float32) for s in samples])
        step = tagger.batch_size
        parts = [tagger.engine.run(windows[i : i + step])
                 for i in range(0, len(windows), step)]
        probs = np.concatenate([p for p, _ in parts])
        embs = np.concatenate([e for _, e in parts])
        bounds = np.cumsum([0] + [len(s) for s in samples])
        sessions = []
        for k, source in enumerate(sources):
            session = tagger.new_session(source=source)
            lo = bounds[k]
            for w, (s, v) in enumerate(zip(starts[k], valid[k], strict=True)):
                window = Window(w, int(s), windows[lo + w], int(v), v < WINDOW_SAMPLES)
                session.add(window, probs[lo + w], embs[lo + w])
            sessions.append(session)
        if self.aggregator is not None:
            track_probs = run_aggregator(self.aggregator,
                                         [s.context.context() for s in sessions])
        else:
            track_probs = [s.context.track_probs() for s in sessions]
        out = {}
        for k in range(len(sources)):
            p, e = probs[bounds[k] : bounds[k + 1]], embs[bounds[k] : bounds[k + 1]]
            out[k] = {"windows": len(p),
                      "probs": np.asarray(track_probs[k], np.float32).tobytes(),
                      "embedding": track_embedding(e, valid[k]).tobytes(),
                      "taggram": p.astype(np.float16).tobytes(),
                      "window_embeddings": e.astype(np.float16).tobytes()}
        return out


def _shard_schema():
    import pyarrow as pa

    return pa.schema([
        ("source", pa.string()), ("status", pa.string()), ("content_sha256", pa.string()),
        ("duration_s", pa.float64()), ("windows", pa.int32()),
        ("probs", pa.large_binary()), ("embedding", pa.large_binary()),
        ("taggram", pa.large_binary()), ("window_embeddings", pa.large_binary()),
        ("meta", pa.string()), ("error", pa.string()), ("reason", pa.string()),
        ("hash_s", pa.float64()), ("decode_s", pa.float64()), ("inference_s", pa.float64()),
    ])


def _table(rows: list[dict]):
    import pyarrow as pa

    schema = _shard_schema()
    empty = {"windows": 0, "probs": b"", "embedding": b"", "taggram": b"",
             "window_embeddings": b"", "inference_s": 0.0}
    cols = {f.name: [_plain(r.get(f.name, empty.get(f.name))) for r in rows] for f in schema}
    return pa.table(cols, schema=schema)


def _plain(v):
    """numpy scalars (what a numpy batch holds) -> Python values for pyarrow."""
    return v.item() if isinstance(v, np.generic) else v


# --- shards ---------------------------------------------------------------------------------

def write_shard(table, folder: str, setup_key: str) -> dict:
    """Write one batch's rows as ``folder/shard-<sha256 of sources and hashes>.parquet``
    atomically; returns ``{"shard": [path], "rows": [n]}``."""
    import pyarrow.parquet as pq

    ident = hashlib.sha256()
    for source, digest in zip(table.column("source").to_pylist(),
                              table.column("content_sha256").to_pylist(), strict=True):
        ident.update(f"{source}\0{digest}\n".encode())
    path = Path(folder) / f"shard-{ident.hexdigest()[:24]}.parquet"
    table = table.replace_schema_metadata({_SETUP_KEY: setup_key.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return {"shard": [str(path)], "rows": [table.num_rows]}


def _setup_key(setup: Setup) -> str:
    return json.dumps([setup.weights_sha256, setup.hop_s, setup.aggregation])


# --- the driver: merging --------------------------------------------------------------------

def merge_shard(catalog: Catalog, path: str | Path, setup: Setup, report: RayAddReport,
                quiet: frozenset[str] = frozenset()) -> list[str]:
    """Store one shard's tracks and failures in ``catalog`` (one transaction per track, as
    ``catalog add``), count them in ``report``, then delete the shard. ``unchanged`` rows
    of ``quiet`` sources are not counted (tracks this run already counted). Returns the
    shard's sources."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError as e:
        raise CatalogError(f"{path}: shard not found on the driver; on a cluster the shard "
                           f"folder must be shared by every node (--shard-dir)") from e
    except OSError as e:  # a torn file cannot exist (atomic writes); anything else is I/O
        raise CatalogError(f"{path}: cannot read shard ({e})") from e
    stored_key = (table.schema.metadata or {}).get(_SETUP_KEY, b"").decode()
    if stored_key != _setup_key(setup):
        raise CatalogError(f"{path}: shard of another tagging setup ({stored_key or '?'}); "
                           f"remove it or use its own shard folder")
    t0 = time.perf_counter()
    n_tags, dim = len(setup.tags), setup.embedding_dim
    sources = []
    for r in table.to_pylist():
        sources.append(r["source"])
        report.hash_s += r["hash_s"]
        report.decode_s += r["decode_s"]
        if r["status"] == "unchanged":
            if r["source"] not in quiet:
                report.skipped += 1
        elif r["status"] == "failed":
            catalog.put_failure(r["source"], r["content_sha256"] or None, setup.id,
                                r["error"], r["reason"])
            report.failed += 1
            report.failures.append({"source": r["source"], "error": r["error"],
                                    "reason": r["reason"]})
        else:
            n = r["windows"]
            catalog.put(TrackRecord(
                r["source"], r["content_sha256"], setup.id, r["duration_s"],
                np.frombuffer(r["probs"], np.float32), np.frombuffer(r["embedding"], np.float32),
                np.frombuffer(r["taggram"], np.float16).reshape(n, n_tags),
                np.frombuffer(r["window_embeddings"], np.float16).reshape(n, dim),
                json.loads(r["meta"]) if r["meta"] else None))
            report.added += 1
            report.audio_s += r["duration_s"]
            report.windows += n
            report.inference_s += r["inference_s"]
    path.unlink()
    report.shards += 1
    report.batches += 1
    report.store_s += time.perf_counter() - t0
    return sources


def _leftover_shards(folder: Path) -> list[Path]:
    # atomic_path's temporary files start with "." and end in ".tmp": never matched
    return sorted(folder.glob("shard-*.parquet"))


# --- the driver -----------------------------------------------------------------------------

def add_on_ray(
    catalog: Catalog,
    sources: list[Source],
    tagger: Tagger,
    *,
    engine: str = "auto",
    address: str | None = None,
    num_cpus: int | None = None,
    inference_actors: int = 1,
    use_gpu: bool = False,
    tracks_per_shard: int = DEFAULT_TRACKS_PER_SHARD,
    shard_dir: str | Path | None = None,
    retag: bool = False,
    retry_failed: bool = False,
    object_store_memory: int | None = None,
    on_progress: Callable[[RayAddReport], None] | None = None,
) -> RayAddReport:
    """Tag ``sources`` into ``catalog`` on a Ray cluster; the rows equal ``catalog add``'s.

    ``tagger`` gives the model, hop, aggregation and engine batch size (its own engine is
    not used: build it with ``engine="torch"``, which costs nothing); each inference actor
    builds ``engine`` on its device (``cuda`` with ``use_gpu``, one GPU per actor).
    ``address`` joins a running cluster (``ray start --head``); without it, and unless
    this process has called ``ray.init`` already, a local instance with ``num_cpus``
    CPUs (default: every core) is started and stopped again. ``shard_dir`` defaults to
    ``CATALOG.shards`` beside the catalog. ``retag``, ``retry_failed`` and ``on_progress``
    (called after each merged shard) as in :func:`~rtagger.catalog.add.add_to_catalog`.
    """
    try:
        import ray
        import ray.data
        from ray.exceptions import RayError
    except ImportError as e:
        raise ConfigError("Ray is not installed: pip install 'rtagger[cluster]'") from e
    if engine not in (*ENGINES, "auto"):  # availability is the actors' to find out
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)} "
                          f"or auto")
    if inference_actors < 1 or tracks_per_shard < 1:
        raise ConfigError("inference_actors and tracks_per_shard must be >= 1")
    if address is not None and num_cpus is not None:
        raise ConfigError("num_cpus sizes a local Ray instance; a cluster (address) has its "
                          "own CPUs")
    t_start = time.perf_counter()
    setup = catalog.register_setup(setup_of(tagger))
    folder = shard_folder(shard_dir if shard_dir is not None
                          else catalog.path.with_name(catalog.path.name + ".shards"), setup)
    folder.mkdir(parents=True, exist_ok=True)
    report = RayAddReport(total=len(sources), actors=inference_actors, address=address)

    def progress() -> None:
        report.wall_s = time.perf_counter() - t_start
        if on_progress is not None:
            on_progress(report)

    # A killed run's finished shards: merged, not redone.
    recovered: set[str] = set()
    for path in _leftover_shards(folder):
        recovered.update(merge_shard(catalog, path, setup, report))
    report.recovered = len(recovered)
    todo, report.skipped = plan_sources(catalog, sources, setup, retag=retag,
                                        retry_failed=retry_failed)
    quiet = frozenset(recovered)
    progress()
    if not todo:
        _tidy(folder)
        return report

    started = not ray.is_initialized()
    if started:
        # "local": a new instance of our own. ray.init() without an address would join
        # whatever cluster `ray start` last left in /tmp/ray (and wait on it if it is gone).
        ray.init(address=address or "local", num_cpus=num_cpus,
                 object_store_memory=object_store_memory, include_dashboard=False)
    rows: Generator[dict, None, None] | None = None
    try:
        resources = ray.cluster_resources()
        report.workers = int(resources.get("CPU", 0))
        report.gpus = int(resources.get("GPU", 0))
        if use_gpu and report.gpus < inference_actors:
            raise ConfigError(f"{inference_actors} GPU actors asked for, the Ray cluster has "
                              f"{report.gpus} GPUs")
        if report.workers < inference_actors + 1:
            raise ConfigError(f"the Ray cluster has {report.workers} CPUs: too few for "
                              f"{inference_actors} inference actors (1 CPU each) and a "
                              f"decoder")
        # Our on_progress replaces Ray Data's bars (one line per operator on stderr).
        ray.data.DataContext.get_current().enable_progress_bars = False
        items = [{"source": s.location, "skip": ",".join(skip),
                  "meta": json.dumps(s.meta) if s.meta else ""} for s, skip in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(decode_row, fn_kwargs={"hop": tagger.hop}, num_cpus=1,
                    memory=DECODE_MEMORY_BYTES)
        ds = ds.map_batches(
            InferenceActor, batch_size=tracks_per_shard, batch_format="numpy",
            fn_constructor_kwargs={"model": tagger.model, "engine": engine,
                                   "device": "cuda" if use_gpu else "cpu",
                                   "hop": tagger.hop, "batch_size": tagger.batch_size,
                                   "aggregation": tagger.aggregation,
                                   "shard_folder": str(folder),
                                   "setup_key": _setup_key(setup)},
            compute=ray.data.ActorPoolStrategy(size=inference_actors), num_cpus=1,
            num_gpus=1 if use_gpu else 0)
        rows = iter(ds.iter_rows())  # a generator: close() ends the execution early
        try:
            for row in rows:
                merge_shard(catalog, row["shard"], setup, report, quiet)
                progress()
        except RayError as e:
            raise CatalogError(f"the Ray pipeline failed ({e}); every merged shard is "
                               f"stored, rerun to continue") from e
    finally:
        if rows is not None:
            rows.close()  # stops the streaming executor (its tasks, actors) if we left early
        if started:
            ray.shutdown()
    _tidy(folder)
    report.wall_s = time.perf_counter() - t_start
    return report


def _tidy(folder: Path) -> None:
    """Remove the shard folders once a run has merged everything (only if empty)."""
    for f in (folder, folder.parent):
        with contextlib.suppress(OSError):  # not empty: another setup's shards, or files
            f.rmdir()
