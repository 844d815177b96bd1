"""The inference worker: batching across callers, errors to every waiter, bounded queue."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rtagger.audio.decode import WINDOW_SAMPLES
from rtagger.engines import create_engine
from rtagger.errors import RtaggerError
from rtagger.pipeline.aggregate import run_aggregator
from rtagger.pipeline.worker import InferenceWorker, Overloaded


class GatedEngine:
    """A real engine behind a gate, so tests control when batches run."""

    name = "gated"
    device = "cpu"

    def __init__(self, inner=None, fail: bool = False) -> None:
        self.inner, self.fail = inner, fail
        self.gate = threading.Event()
        self.batches: list[int] = []

    def run(self, windows):
        self.gate.wait(10)
        self.batches.append(len(windows))
        if self.fail:
            raise RuntimeError("device lost")
        return self.inner.run(windows)


def _windows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, WINDOW_SAMPLES).astype(np.float32) for _ in range(n)]


def test_requests_from_many_callers_share_batches(debug_model):
    inner = create_engine(debug_model)
    engine = GatedEngine(inner)
    # A long max_wait: the batch closes when it is full (12 windows), not on a timer.
    worker = InferenceWorker(engine, max_batch=12, max_wait_s=30.0)
    wins = [_windows(2, i) for i in range(6)]
    try:
        futures = [worker.tag(w) for w in wins]
        engine.gate.set()
        results = [f.result(10) for f in futures]
    finally:
        worker.close()
    assert engine.batches == [12]  # six callers, one batch
    for w, (probs, emb) in zip(wins, results, strict=True):
        ref_p, ref_e = inner.run(np.stack(w))
        np.testing.assert_allclose(probs, ref_p, atol=1e-5)
        np.testing.assert_allclose(emb, ref_e, atol=1e-5)


def test_a_failing_batch_fails_every_waiting_request(debug_model):
    engine = GatedEngine(fail=True)
    worker = InferenceWorker(engine, max_batch=16, max_wait_s=0.05)
    try:
        futures = [worker.tag(_windows(1, i)) for i in range(3)]
        engine.gate.set()
        for f in futures:
            with pytest.raises(RuntimeError, match="device lost"):
                f.result(10)
        assert worker.stats.errors >= 1
    finally:
        worker.close()


def test_full_queue_refuses_at_once(debug_model):
    engine = GatedEngine(create_engine(debug_model))
    worker = InferenceWorker(engine, max_batch=1, max_wait_s=0.0, max_queue=2)
    try:
        worker.tag(_windows(1))  # taken by the thread, blocked at the gate
        accepted = 0
        with pytest.raises(Overloaded, match="queue full"):
            for _ in range(10):
                worker.tag(_windows(1))
                accepted += 1
        assert accepted <= 3
    finally:
        engine.gate.set()
        worker.close()


def test_aggregation_requests_batch_contexts_of_different_lengths(debug_model):
    worker = InferenceWorker(create_engine(debug_model), debug_model.aggregator)
    d = debug_model.aggregator.cfg.d_in
    rng = np.random.default_rng(0)
    contexts = [rng.standard_normal((n, d)).astype(np.float32) for n in (1, 5, 16)]
    try:
        got = worker.aggregate(contexts).result(10)
    finally:
        worker.close()
    for c, g in zip(contexts, got, strict=True):
        np.testing.assert_allclose(g, run_aggregator(debug_model.aggregator, [c])[0],
                                   atol=1e-5)


def test_stopped_worker_refuses_work(debug_model):
    worker = InferenceWorker(create_engine(debug_model))
    worker.close()
    with pytest.raises(RtaggerError, match="stopped"):
        worker.tag(_windows(1))


def test_aggregation_does_not_wait_for_a_batch_to_fill(debug_model):
    # Window batches may wait max_wait_s for company; an aggregation request goes at once.
    worker = InferenceWorker(create_engine(debug_model), debug_model.aggregator,
                             max_batch=32, max_wait_s=30.0)
    ctx = np.random.default_rng(0).standard_normal((5, debug_model.tagger.cfg.d_model))
    try:
        out = worker.aggregate([ctx.astype(np.float32)]).result(5)
    finally:
        worker.close()
    np.testing.assert_allclose(out, run_aggregator(debug_model.aggregator,
                                                   [ctx.astype(np.float32)]), atol=1e-6)


def test_a_request_cancelled_while_queued_is_skipped_and_the_worker_goes_on(debug_model):
    # The failure that once killed the worker: a client disconnects while its windows wait.
    engine = GatedEngine(create_engine(debug_model))
    worker = InferenceWorker(engine, max_batch=1, max_wait_s=0.0)
    try:
        running = worker.tag(_windows(1, 0))  # taken by the thread, held at the gate
        queued = [worker.tag(_windows(1, i)) for i in (1, 2, 3)]
        assert queued[1].cancel()  # the caller gave up before the worker got to it
        engine.gate.set()
        running.result(10)
        queued[0].result(10)
        queued[2].result(10)
        assert queued[1].cancelled()
        assert worker.stats.cancelled == 1 and engine.batches == [1, 1, 1]  # never computed
        assert worker.alive and worker.health()["ok"]
        probs, _ = worker.tag(_windows(1, 9)).result(10)  # and it still serves
        assert probs.shape == (1, len(debug_model.tags))
    finally:
        engine.gate.set()
        worker.close()


def test_asyncio_callers_cancelled_mid_request_never_stop_the_worker(debug_model):
    """Cancel awaiting tasks (what a vanished client's session does) while queued or running."""
    import asyncio

    engine = GatedEngine(create_engine(debug_model))
    worker = InferenceWorker(engine, max_batch=2, max_wait_s=0.0)

    async def go():
        tasks = [asyncio.ensure_future(asyncio.wrap_future(worker.tag(_windows(1, i))))
                 for i in range(8)]
        await asyncio.sleep(0.05)  # the first batch is in the engine, the rest queued
        for t in tasks[::2]:
            t.cancel()
        engine.gate.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(d, asyncio.CancelledError) for d in done[::2])
        assert all(isinstance(d, tuple) for d in done[1::2])
        return await asyncio.wrap_future(worker.tag(_windows(2, 99)))

    try:
        probs, _ = asyncio.run(asyncio.wait_for(go(), 30))
        assert probs.shape[0] == 2 and worker.alive
        assert worker.stats.errors == 0 and worker.stats.cancelled >= 1
    finally:
        engine.gate.set()
        worker.close()


class _Fatal(BaseException):
    """Stands for an error no batch handler should swallow (not an ``Exception``)."""


def test_a_worker_that_stops_says_so_and_fails_every_waiter(debug_model):
    from rtagger.pipeline.worker import WorkerStopped

    class DyingEngine(GatedEngine):
        def run(self, windows):
            self.gate.wait(10)
            raise _Fatal("device vanished")

    engine = DyingEngine()
    worker = InferenceWorker(engine, max_batch=1, max_wait_s=0.0)
    first = worker.tag(_windows(1))
    waiting = [worker.tag(_windows(1, i)) for i in range(3)]
    engine.gate.set()
    for f in [first, *waiting]:
        with pytest.raises(WorkerStopped, match="_Fatal"):
            f.result(10)
    worker._thread.join(10)
    health = worker.health()
    assert not worker.alive and not health["ok"] and "device vanished" in health["reason"]
    with pytest.raises(WorkerStopped, match="device vanished"):
        worker.tag(_windows(1))
    worker.close()  # closing a stopped worker is harmless
