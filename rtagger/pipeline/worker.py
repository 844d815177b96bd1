"""The inference worker: the one owner of the model, batching windows across all streams.

Requests are windows to tag (``tag``) or track contexts to aggregate (``aggregate``). The
worker thread takes the first waiting request, gathers more of the same kind until
``max_batch`` windows or ``max_wait_s`` have passed, runs one batch, and resolves every
request's future exactly once, with its slice of the result or with the batch's exception.

Failure model
    A request whose caller gave up (its future was cancelled, e.g. a client disconnected
    while its windows were queued) is skipped: ``set_running_or_notify_cancel`` marks the
    others running, so they can no longer be cancelled and resolving them cannot fail. A
    batch that raises fails its own requests and the worker goes on. Should the thread stop
    anyway (an error that is not an ``Exception``), it records why, fails every waiting
    request with :class:`WorkerStopped`, refuses new ones, and :meth:`InferenceWorker.health`
    reports it, so a server can say it is unhealthy instead of failing stream by stream.

Thread safety
    :meth:`InferenceWorker.tag` and :meth:`InferenceWorker.aggregate` may be called from
    any thread (the asyncio server calls them from its event loop and awaits the returned
    ``concurrent.futures.Future`` with ``asyncio.wrap_future``). Only the worker thread
    touches the engine and the aggregator.

Overflow policy
    The request queue is bounded (``max_queue`` requests). When it is full, ``tag`` and
    ``aggregate`` raise :class:`Overloaded` at once instead of blocking the caller; the
    server turns that into dropped windows for live streams (reported to the client) and
    into waiting for uploads.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from rtagger.engines import Engine
from rtagger.errors import RtaggerError
from rtagger.model.aggregator import ContextAggregator
from rtagger.pipeline.aggregate import run_aggregator

log = logging.getLogger(__name__)


class Overloaded(RtaggerError):
    """The worker's queue is full."""


class WorkerStopped(RtaggerError):
    """The worker is not running (closed, or stopped by an error): nothing can be served."""


@dataclass
class _Request:
    kind: str  # "tag" | "aggregate"
    items: list[np.ndarray]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class WorkerStats:
    batches: int = 0
    windows: int = 0
    contexts: int = 0
    errors: int = 0
    cancelled: int = 0  # requests skipped because their caller had given up
    busy_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # most recent 1,000 batches


_STOP = object()
_PRIORITY = {"aggregate": 0, "tag": 1, "stop": 2}


class InferenceWorker:
    def __init__(self, engine: Engine, aggregator: ContextAggregator | None = None, *,
                 max_batch: int = 32, max_wait_s: float = 0.005, max_queue: int = 1024) -> None:
        self.engine = engine
        self.aggregator = aggregator
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # Aggregation requests go first: they are cheap, and each one is the last step
        # before an update leaves the server, so making them wait behind window batches
        # would add a whole batch to every update's latency.
        self._queue: queue.PriorityQueue = queue.PriorityQueue(maxsize=max_queue)
        self._seq = itertools.count()
        self._held: _Request | None = None  # a request of the other kind, kept for next batch
        self.stats = WorkerStats()
        # Set once, under the lock, when the thread stops taking requests; `_submit` checks
        # it under the same lock, so no request can slip in after the final drain.
        self._lock = threading.Lock()
        self._stopped_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="rtagger-inference",
                                        daemon=True)
        self._thread.start()

    # --- client side ----------------------------------------------------------------------

    def tag(self, windows: list[np.ndarray]) -> Future:
        """Tag ``(WINDOW_SAMPLES,)`` windows -> future of ``(probs, embeddings)`` arrays."""
        return self._submit(_Request("tag", windows))

    def aggregate(self, contexts: list[np.ndarray]) -> Future:
        """Aggregate ``(windows_i, d)`` contexts -> future of ``(n, n_tags)`` track probs."""
        if self.aggregator is None:
            raise RtaggerError("this model has no context aggregator")
        return self._submit(_Request("aggregate", contexts))

    def _submit(self, req: _Request) -> Future:
        with self._lock:
            if self._stopped_reason is not None:
                raise WorkerStopped(f"inference worker is stopped ({self._stopped_reason})")
            try:
                self._queue.put_nowait((_PRIORITY[req.kind], next(self._seq), req))
            except queue.Full:
                raise Overloaded(f"inference queue full ({self._queue.maxsize} "
                                 f"requests)") from None
        return req.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued requests, then stop the thread."""
        if self._thread.is_alive():
            # Blocking put: the stop marker waits for room rather than being lost.
            self._queue.put((_PRIORITY["stop"], next(self._seq), _STOP))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the worker accepts and serves requests."""
        return self._stopped_reason is None and self._thread.is_alive()

    def health(self) -> dict:
        """JSON-ready state for health checks: ``ok``, why not, queue depth, counters."""
        s = self.stats
        return {"ok": self.alive, "reason": self._stopped_reason, "queue": self.queue_depth,
                "batches": s.batches, "windows": s.windows, "contexts": s.contexts,
                "errors": s.errors, "cancelled": s.cancelled}

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # --- worker thread ----------------------------------------------------------------------

    def _next(self, timeout: float | None):
        if self._held is not None:
            req, self._held = self._held, None
            return req
        return self._get(timeout)

    def _get(self, timeout: float | None = None, block: bool = True):
        item = self._queue.get(block=block, timeout=timeout)
        return item[2]

    def _run(self) -> None:
        reason = "closed"
        try:
            self._loop()
        except BaseException as e:  # the worker must never die silently
            reason = f"stopped by {type(e).__name__}: {e}"
            log.critical("inference worker %s; the server is unhealthy", reason, exc_info=True)
        finally:
            with self._lock:
                self._stopped_reason = reason
            self._fail_waiting(reason)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._next(None)
            if first is _STOP:
                return
            batch, n = [first], len(first.items)
            # Window batches wait up to max_wait_s for company (throughput); aggregation
            # takes what is queued and goes: it is cheap, and an update waits on it.
            deadline = first.queued_at + (self.max_wait_s if first.kind == "tag" else 0.0)
            while n < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    req = self._next(max(remaining, 0.0)) if remaining > 0 else \
                        self._get(block=False)
                except queue.Empty:
                    break
                if req is _STOP:
                    stopping = True
                    break
                if req.kind != first.kind:
                    self._held = req  # batches are homogeneous; it leads the next one
                    break
                batch.append(req)
                n += len(req.items)
            self._execute(batch)

    def _fail_waiting(self, reason: str) -> None:
        """After the thread stops: every request still queued gets an error, none hangs."""
        while True:
            try:
                req = self._held or self._get(block=False)
                self._held = None
            except queue.Empty:
                return
            if req is not _STOP and req.future.set_running_or_notify_cancel():
                _resolve(req, exc=WorkerStopped(f"inference worker stopped ({reason})"))

    def _execute(self, batch: list[_Request]) -> None:
        # Claim each request; one whose caller cancelled it is skipped (never computed,
        # never resolved), and a claimed one can no longer be cancelled under us.
        claimed = [req for req in batch if req.future.set_running_or_notify_cancel()]
        self.stats.cancelled += len(batch) - len(claimed)
        if not claimed:
            return
        kind = claimed[0].kind
        items = [x for req in claimed for x in req.items]
        t0 = time.perf_counter()
        try:
            if kind == "tag":
                probs, embs = self._run_windows(items)
            else:
                track = run_aggregator(self.aggregator, items)
        except BaseException as e:
            if isinstance(e, Exception):
                log.exception("inference batch of %d items failed", len(items))
                self.stats.errors += 1
            for req in claimed:
                _resolve(req, exc=e if isinstance(e, Exception) else
                         WorkerStopped(f"inference worker stopped by {type(e).__name__}"))
            if not isinstance(e, Exception):
                raise
            return
        self._account(kind, len(items), time.perf_counter() - t0)
        pos = 0
        for req in claimed:
            k = len(req.items)
            if kind == "tag":
                _resolve(req, result=(probs[pos : pos + k], embs[pos : pos + k]))
            else:
                _resolve(req, result=track[pos : pos + k])
            pos += k

    def _run_windows(self, windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        probs, embs = [], []
        for i in range(0, len(windows), self.max_batch):
            p, e = self.engine.run(np.stack(windows[i : i + self.max_batch]))
            probs.append(p)
            embs.append(e)
        return np.concatenate(probs), np.concatenate(embs)

    def _account(self, kind: str, n: int, seconds: float) -> None:
        s = self.stats
        s.batches += 1
        s.busy_s += seconds
        if kind == "tag":
            s.windows += n
            s.batch_sizes.append(n)
            del s.batch_sizes[:-1000]
        else:
            s.contexts += n


def _resolve(req: _Request, *, result=None, exc: BaseException | None = None) -> None:
    """Resolve one claimed request; a failure here is logged, never raised into the loop."""
    try:
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(result)
    except InvalidStateError:
        log.error("inference request resolved twice (%s); ignored", req.kind, exc_info=True)
