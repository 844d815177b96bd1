"""The inference worker: the one owner of the model, batching windows across all streams.

Requests are windows to tag (``tag``) or track contexts to aggregate (``aggregate``). The
worker thread takes the first waiting request, gathers more of the same kind until
``max_batch`` windows or ``max_wait_s`` have passed, runs one batch, and resolves every
request's future with its slice of the result or with the batch's exception.

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
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from rtagger.aggregate import run_aggregator
from rtagger.engines import Engine
from rtagger.errors import RtaggerError
from rtagger.model import ContextAggregator

log = logging.getLogger(__name__)


class Overloaded(RtaggerError):
    """The worker's queue is full."""


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
        if not self._thread.is_alive():
            raise RtaggerError("inference worker is stopped")
        try:
            self._queue.put_nowait((_PRIORITY[req.kind], next(self._seq), req))
        except queue.Full:
            raise Overloaded(f"inference queue full ({self._queue.maxsize} requests)") from None
        return req.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued requests, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put((_PRIORITY["stop"], next(self._seq), _STOP))
            self._thread.join(timeout)

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
        stopping = False
        while not stopping:
            first = self._next(None)
            if first is _STOP:
                break
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
        # Requests left after a stop get an error rather than hanging their callers.
        while True:
            try:
                req = self._held or self._get(block=False)
                self._held = None
            except queue.Empty:
                break
            if req is not _STOP:
                req.future.set_exception(RtaggerError("inference worker stopped"))

    def _execute(self, batch: list[_Request]) -> None:
        items = [x for req in batch for x in req.items]
        t0 = time.perf_counter()
        try:
            if batch[0].kind == "tag":
                outputs = self._run_windows(items)
            else:
                outputs = run_aggregator(self.aggregator, items)
        except Exception as e:
            log.exception("inference batch of %d items failed", len(items))
            self.stats.errors += 1
            for req in batch:
                req.future.set_exception(e)
            return
        self._account(batch[0].kind, len(items), time.perf_counter() - t0)
        pos = 0
        for req in batch:
            k = len(req.items)
            if batch[0].kind == "tag":
                req.future.set_result((outputs[0][pos : pos + k], outputs[1][pos : pos + k]))
            else:
                req.future.set_result(outputs[pos : pos + k])
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
