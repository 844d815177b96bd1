"""Driving one stream through the shared inference worker (asyncio).

:class:`SessionDriver` connects a Sans-I/O :class:`~rtagger.live.session.StreamSession`
to the :class:`~rtagger.pipeline.worker.InferenceWorker`: PCM frames go in,
``segment``/``update``/``final`` messages come out through an ``emit`` coroutine. The
websocket server runs one driver per client; ``rtagger listen`` and ``rtagger stream`` run
one locally. Same code, same results.

Overflow policy (per stream; the worker's own queue is bounded too)
    At most ``max_backlog`` complete windows wait for the model.
    - live streams: when a new window would exceed that, the oldest waiting windows are
      dropped: the stream skips ahead to its newest audio, and every update reports the
      running ``dropped`` count, so lag never grows without bound.
    - uploads (``live=False``): :meth:`feed` waits until there is room (backpressure to the
      sender through TCP), so no window is lost and the final tags equal offline tagging.

Encoded uploads are decoded in the event loop's default thread pool, one call at a time
per stream (:meth:`feed` awaits it), so one stream's decoding never stalls the loop that
serves the others; windowing and messages stay on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from rtagger.audio.ringbuffer import Window
from rtagger.engines import Engine
from rtagger.live.protocol import Audio, Connection, End, Start, float32_frame
from rtagger.live.session import StreamSession
from rtagger.model.checkpoint import TaggingModel
from rtagger.pipeline.worker import InferenceWorker, Overloaded

log = logging.getLogger(__name__)

Emit = Callable[[dict], Awaitable[None]]
DEFAULT_MAX_BACKLOG = 8
_OVERLOAD_BACKOFF_S = 0.02


class SessionDriver:
    def __init__(self, session: StreamSession, worker: InferenceWorker, emit: Emit, *,
                 max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        self.session = session
        self.worker = worker
        self.emit = emit
        self.max_backlog = max_backlog
        self._pending: deque[tuple[Window, float]] = deque()
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ended = False
        self._task: asyncio.Task | None = None
        self._decoding: asyncio.Future | None = None  # an encoded upload's decode call
        self.latencies_ms: deque[float] = deque(maxlen=10_000)

    @property
    def live(self) -> bool:
        return self.session.start.live

    def start(self) -> SessionDriver:
        self._task = asyncio.get_running_loop().create_task(
            self._process(), name=f"rtagger-stream-{self.session.stream_id}")
        return self

    async def feed(self, data: bytes) -> None:
        """One binary frame. Raises :class:`~rtagger.live.protocol.ProtocolError` on bad audio."""
        if self.session.decoder is None:
            self._enqueue(self.session.feed(data), time.perf_counter())
        else:
            blocks = await self._in_thread(self.session.decode, data)
            self._enqueue(self.session.push_blocks(blocks), time.perf_counter())
            for notice in self.session.notices():
                await self.emit(notice)
        if not self.live:
            await self._room.wait()
        self._raise_if_failed()

    async def _in_thread(self, fn, *args):
        """Run a decoder call in the default thread pool; one at a time per stream."""
        self._decoding = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            # Shielded: a cancelled caller must not leave the decoder mid-call unawaited.
            return await asyncio.shield(self._decoding)
        finally:
            if self._decoding.done():
                self._decoding = None

    async def end(self) -> dict:
        """Flush the stream, wait for every window's update, emit and return ``final``."""
        if self.session.decoder is not None:
            blocks = await self._in_thread(self.session.decode_end)
            for notice in self.session.notices():
                await self.emit(notice)
            self._enqueue(self.session.push_blocks(blocks), time.perf_counter())
        self._enqueue(self.session.finish(), time.perf_counter())
        self._ended = True
        self._work.set()
        assert self._task is not None
        await self._task
        final = self.session.final_msg(await self._track_probs())
        final["reason"] = "end"
        await self.emit(final)
        return final

    async def cancel(self) -> BaseException | None:
        """Stop processing. Returns the error the processing task had ended with, if any.

        The caller decides what that error means: after a client vanished, a failed send is
        expected; anything else deserves a log line. Either way it is retrieved here, so
        it is never reported as an unretrieved task exception later.
        """
        if self._decoding is not None:
            # A decode call still runs in its thread: let it return before the stream's
            # state goes; its error, if any, is this stream's and was reported to it.
            await asyncio.wait({self._decoding})
            self._decoding = None
        if self.session.decoder is not None:
            self.session.decoder.close()
        if self._task is None:
            return None
        if not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                return None
            except Exception as e:  # it failed while being cancelled
                return e
        return None if self._task.cancelled() else self._task.exception()

    def _raise_if_failed(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise exc

    def _enqueue(self, windows: list[Window], arrival: float) -> None:
        for w in windows:
            self._pending.append((w, arrival))
        if self.live:
            while len(self._pending) > self.max_backlog:
                self._pending.popleft()
                self.session.dropped += 1
        elif len(self._pending) >= self.max_backlog:
            self._room.clear()
        if self._pending:
            self._work.set()

    async def _process(self) -> None:
        while True:
            await self._work.wait()
            if not self._pending:
                if self._ended:
                    return
                self._work.clear()
                continue
            batch = list(self._pending)
            self._pending.clear()
            self._room.set()
            probs, embs = await self._tag([w.samples for w, _ in batch])
            if probs is None:  # live stream and the worker is overloaded: skip these
                self.session.dropped += len(batch)
                continue
            for (w, arrival), p, e in zip(batch, probs, embs, strict=True):
                for event in self.session.add_window(w, p, e):
                    await self.emit(event)
                track = await self._track_probs()
                latency_ms = (time.perf_counter() - arrival) * 1000
                self.latencies_ms.append(latency_ms)
                await self.emit(self.session.update_msg(w, p, track, latency_ms))

    async def _tag(self, windows: list[np.ndarray]):
        while True:
            try:
                return await asyncio.wrap_future(self.worker.tag(windows))
            except Overloaded:
                if self.live:
                    return None, None
                # Uploads never lose windows: wait for the shared queue to drain.
                await asyncio.sleep(_OVERLOAD_BACKOFF_S)

    async def _track_probs(self) -> np.ndarray:
        ctx = self.session.context
        emb = ctx.context()
        if emb is None or self.worker.aggregator is None:
            return ctx.mean_probs()
        while True:
            try:
                probs = (await asyncio.wrap_future(self.worker.aggregate([emb])))[0]
                break
            except Overloaded:
                await asyncio.sleep(_OVERLOAD_BACKOFF_S)
        ctx.set_track_probs(probs)
        return probs


async def tag_live(model: TaggingModel, engine: Engine, blocks: AsyncIterator[np.ndarray],
                   start: Start, emit: Emit, *, aggregation: str = "auto",
                   stream_id: str = "local") -> dict:
    """Tag a local source (sound card, file) with the same machinery as the server.

    ``blocks`` are float32 ``(n,)``/``(channels, n)`` arrays as announced in ``start``
    (whose ``sample_format`` must be float32). Returns the ``final`` message.
    """
    aggregator = model.aggregator if aggregation != "mean" else None
    worker = InferenceWorker(engine, aggregator)
    session = StreamSession(stream_id, start, model.tags, aggregator,
                            segment_dims=model.tagger.cfg.d_model)
    conn = Connection()  # the server's state machine: start -> audio* -> end
    conn.event(start)
    driver = SessionDriver(session, worker, emit).start()
    try:
        async for block in blocks:
            frame = conn.event(Audio(float32_frame(block)))
            await driver.feed(frame.data)
        conn.event(End())
        return await driver.end()
    finally:
        await driver.cancel()
        await asyncio.get_running_loop().run_in_executor(None, worker.close)
