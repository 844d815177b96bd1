"""Websocket server (``rtagger serve``): many streams, one inference worker, live viewers.

A thin asyncio adapter around the Sans-I/O parts: :mod:`rtagger.live.protocol` parses messages,
:class:`~rtagger.live.session.StreamSession` holds each stream's state, and
:class:`~rtagger.live.driver.SessionDriver` runs it against the shared
:class:`~rtagger.pipeline.worker.InferenceWorker`. State lives in per-connection objects; the server
object only holds the registry of open streams (for admission control and subscribers).

Safety: binds 127.0.0.1 unless told otherwise; optional shared token (``?token=`` or
``Authorization: Bearer``); a ``Host`` allow-list (loopback names only when bound to
loopback), so a DNS-rebinding page cannot reach a local server; same-origin check for
browsers (plus an allow list); a cap on open connections and a first-message timeout, so
idle sockets cannot pile up; maximum frame size and stream duration; nothing in the protocol
names a file, so no client can make the server read or write its own files. One failing
stream is logged with its traceback and closed with a reason; the others keep running.

Health: ``GET /healthz`` answers 200 while the inference worker serves and 503 (with the
reason) once it has stopped; new streams are then refused with ``unavailable``/1013, so a
supervisor or load balancer can route around (or restart) an unhealthy process.

Uploads: a websocket ``start`` with ``"format": "encoded"`` streams a file's bytes, and
``POST /api/tag`` (or ``PUT``) takes the file as its request body and answers NDJSON, both
decoded progressively (:mod:`rtagger.audio.progressive`) under ``--max-upload-bytes`` and
``--max-upload-duration``. Both run the same stream code below; :mod:`rtagger.live.http_upload`
routes each connection by its first bytes and reads the HTTP side.

Catalog: with ``--catalog`` the same port answers read-only ``GET /api/catalog...``
queries under the same access rules (:mod:`rtagger.live.catalog_api`, its own thread), and
``GET /catalog`` is a page that browses them (``rtagger/data/catalog.html``).

Subscribers (dashboards) get a bounded view of a stream: events (``segment``, ``final``)
queue up to a limit, while ``update`` messages replace any update the viewer has not been
sent yet, so a slow viewer sees the newest tags and never slows the stream.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from rtagger.audio.progressive import DEFAULT_MAX_BYTES, DEFAULT_MAX_DURATION_S
from rtagger.engines import Engine
from rtagger.live import catalog_api, http_upload
from rtagger.live.driver import DEFAULT_MAX_BACKLOG, SessionDriver
from rtagger.live.protocol import (
    Audio,
    Connection,
    End,
    ProtocolError,
    Start,
    Subscribe,
    encode,
    error_msg,
    start_from_query,
    started_msg,
)
from rtagger.live.session import StreamSession
from rtagger.model.checkpoint import TaggingModel
from rtagger.pipeline.worker import InferenceWorker, WorkerStopped

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008  # protocol violation by the client
CLOSE_TRY_LATER = 1013  # admission control, or this process cannot tag: try another
CLOSE_INTERNAL = 1011
# Error codes that are about the server's state, not the client's messages.
_TRY_LATER = {"stream_limit", "connection_limit", "unavailable"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_streams: int = 64
    max_subscribers: int = 256
    max_frame_bytes: int = 1 << 20  # 1 MiB: ~16 s of 16 kHz int16 mono per frame
    max_duration_s: float = 12 * 3600.0
    max_backlog: int = DEFAULT_MAX_BACKLOG
    max_batch: int = 32
    max_wait_s: float = 0.005
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the defaults
    max_connections: int = 512  # open websocket connections of every kind
    first_message_timeout_s: float = 10.0
    dashboard: bool = True
    aggregation: str = "auto"  # auto | mean
    max_upload_bytes: int = DEFAULT_MAX_BYTES  # encoded bytes of one upload
    max_upload_s: float = DEFAULT_MAX_DURATION_S  # decoded audio of one upload
    http_idle_timeout_s: float = 30.0  # an HTTP upload's longest wait for its next byte
    catalog: str | None = None  # a catalog file served read-only under /api/catalog


class Subscriber:
    """A viewer's bounded outbox: queued events plus the single newest update."""

    MAX_EVENTS = 64

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.events: deque[dict] = deque(maxlen=self.MAX_EVENTS)
        self.latest: dict | None = None
        self.replaced = 0
        self.wake = asyncio.Event()

    def offer(self, msg: dict) -> None:
        if msg["type"] == "update":
            if self.latest is not None:
                self.replaced += 1
            self.latest = msg
        else:
            self.events.append(msg)
        self.wake.set()

    async def pump(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.events:
                msg = self.events.popleft()
                await self.ws.send(encode(msg))
                if msg["type"] == "final":
                    return
            if self.latest is not None:
                msg, self.latest = self.latest, None
                await self.ws.send(encode(msg))


HISTORY_MESSAGES = 64  # recent updates/segments a late viewer gets on subscribing


@dataclass
class _Stream:
    session: StreamSession
    name: str
    subscribers: set[Subscriber] = field(default_factory=set)
    # Bounded recent past, so a viewer who joins late sees a taggram at once.
    history: deque[dict] = field(default_factory=lambda: deque(maxlen=HISTORY_MESSAGES))


class TagServer:
    def __init__(self, model: TaggingModel, engine: Engine,
                 config: ServerConfig | None = None) -> None:
        self.model = model
        self.config = config or ServerConfig()
        # Opened now, so a missing or broken catalog file fails before the worker starts.
        self.catalog = (catalog_api.CatalogAPI(self.config.catalog,
                                               served_weights_sha256=model.weights_sha256)
                        if self.config.catalog else None)
        aggregator = model.aggregator if self.config.aggregation != "mean" else None
        self.worker = InferenceWorker(engine, aggregator, max_batch=self.config.max_batch,
                                      max_wait_s=self.config.max_wait_s)
        self.streams: dict[str, _Stream] = {}
        self.n_subscribers = 0
        self.n_connections = 0
        self._server = None
        self._pages: dict[str, bytes] = {}  # file name in rtagger/data -> its bytes
        self._http_tasks: set[asyncio.Task] = set()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> TagServer:
        c = self.config
        self._server = await serve(
            self._handle, c.host, c.port, max_size=c.max_frame_bytes,
            process_request=self._process_request, ping_interval=20, ping_timeout=20,
            close_timeout=5,
            # PCM barely compresses, and deflating every frame costs both ends CPU.
            compression=None,
            # HTTP uploads (POST/PUT) branch off before websockets parses the request.
            create_connection=self._route,
        )
        return self

    def _route(self, *args, **kwargs) -> http_upload.Router:
        return http_upload.Router(lambda: ServerConnection(*args, **kwargs), self._http_upload,
                           self._http_tasks)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._http_tasks):
            task.cancel()
        if self._http_tasks:
            await asyncio.wait(self._http_tasks)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.close)
        if self.catalog is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.catalog.close)

    async def __aenter__(self) -> TagServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    # --- HTTP: auth, origin, dashboard ------------------------------------------------------

    def _process_request(self, conn: ServerConnection, request: Request
                         ) -> Response | Awaitable[Response] | None:
        url = urlsplit(request.path)
        if url.path == "/healthz":
            # Probed by supervisors and load balancers, which send neither token nor a
            # public Host; it reveals only whether this process can tag.
            return self._health_response()
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        refusal = self._refusal(request.headers, url.query, opens=upgrade)
        if refusal is not None:
            return conn.respond(*refusal)
        if upgrade:
            return None  # the websocket handshake continues
        if self.catalog is not None and catalog_api.is_catalog_path(url.path):
            return self._catalog_response(url.path, url.query)  # awaited by websockets
        if url.path == "/api/streams":
            return _json_response(self.list_streams())
        if url.path in ("/", "/dashboard") and self.config.dashboard:
            return _response(HTTPStatus.OK, self._page("dashboard.html"),
                             "text/html; charset=utf-8")
        if url.path == catalog_api.PAGE and self.catalog is not None and self.config.dashboard:
            return _response(HTTPStatus.OK, self._page("catalog.html"),
                             "text/html; charset=utf-8")
        return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")

    def _refusal(self, headers: Headers, query: str, *, opens: bool
                 ) -> tuple[HTTPStatus, str] | None:
        """The access rules every request but ``/healthz`` passes: host, token, origin;
        and, for a request that opens a connection (``opens``), the connection cap."""
        host = headers.get("Host", "")
        if not self._host_ok(host):
            return HTTPStatus.FORBIDDEN, f"host {host!r} not allowed (see --allowed-host)\n"
        if self.config.token is not None and not self._authorized(headers, query):
            return HTTPStatus.UNAUTHORIZED, "missing or wrong token\n"
        origin = headers.get("Origin")
        if origin is not None and not self._origin_ok(origin, headers):
            return HTTPStatus.FORBIDDEN, f"origin {origin} not allowed\n"
        if opens and self.n_connections >= self.config.max_connections:
            return (HTTPStatus.SERVICE_UNAVAILABLE, f"server is at its limit of "
                    f"{self.config.max_connections} connections\n")
        return None

    def health(self) -> dict:
        """``ok`` while the inference worker serves; streams, connections, worker counters."""
        worker = self.worker.health()
        return {"status": "ok" if worker["ok"] else "unhealthy", "worker": worker,
                "streams": len(self.streams), "connections": self.n_connections}

    def _health_response(self) -> Response:
        doc = self.health()
        status = HTTPStatus.OK if doc["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, json.dumps(doc).encode(), "application/json")

    def _host_ok(self, host: str) -> bool:
        """The ``Host`` header names this server (the DNS-rebinding defence).

        Always allowed: loopback names and addresses, and ``--allowed-host`` names. When
        bound to a non-loopback address and no ``--allowed-host`` is given, any host is.
        """
        name = _host_name(host)
        if not name:
            return False
        if name in LOOPBACK_NAMES or name in self.config.allowed_hosts or _is_loopback(name):
            return True
        return not self.config.allowed_hosts and not _is_loopback(self.config.host)

    def _authorized(self, headers: Headers, query: str) -> bool:
        token = self.config.token or ""
        given = parse_qs(query).get("token", [""])[0]
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        return hmac.compare_digest(given.encode(), token.encode())

    def _origin_ok(self, origin: str, headers: Headers) -> bool:
        if origin in self.config.allowed_origins:
            return True
        host = headers.get("Host", "")
        return urlsplit(origin).netloc == host  # same origin as the page we served

    async def _catalog_response(self, path: str, query: str) -> Response:
        # Queries run in the catalog's own thread; the event loop only waits for them.
        status, body = await self.catalog.respond(path, query)
        return _response(status, body, "application/json")

    def _page(self, name: str) -> bytes:
        """A page shipped in ``rtagger/data`` (the dashboard, the catalog view), read once."""
        if name not in self._pages:
            self._pages[name] = resources.files("rtagger.data").joinpath(name).read_bytes()
        return self._pages[name]

    def list_streams(self) -> dict:
        return {"streams": [
            {"stream_id": sid, "name": s.name, "received_s": round(s.session.received_s, 2),
             "segment": s.session.segment_id, "live": s.session.start.live,
             "subscribers": len(s.subscribers), "dropped": s.session.dropped}
            for sid, s in self.streams.items()
        ], "max_streams": self.config.max_streams, "tags": self.model.tags}

    # --- websocket connections ------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self.n_connections += 1
        try:
            await self._serve_connection(ws)
        finally:
            self.n_connections -= 1

    async def _serve_connection(self, ws: ServerConnection) -> None:
        try:
            if self.n_connections > self.config.max_connections:  # raced past the handshake
                raise ProtocolError("connection_limit", f"server is at its limit of "
                                    f"{self.config.max_connections} connections")
            try:
                first = await asyncio.wait_for(ws.recv(), self.config.first_message_timeout_s)
            except TimeoutError:
                raise ProtocolError("timeout", f"no message within "
                                    f"{self.config.first_message_timeout_s:g} s") from None
            conn = Connection()
            msg = conn.receive(first)
            if isinstance(msg, Start):
                await self._run_stream(ws, msg, conn)
            else:  # the state machine lets only start or subscribe open a connection
                await self._run_subscriber(ws, msg)
        except ProtocolError as e:
            log.info("client %s: %s", ws.remote_address, e)
            await _send_error(ws, e.code, e.message,
                              close=CLOSE_TRY_LATER if e.code in _TRY_LATER else CLOSE_POLICY)
        except ConnectionClosed:
            pass  # the client went away; its stream was cleaned up below
        except WorkerStopped as e:
            log.error("stream from %s: %s", ws.remote_address, e)
            await _send_error(ws, "unavailable", str(e), close=CLOSE_TRY_LATER)
        except Exception:
            # One broken stream must never take down the others: log, tell, close.
            log.exception("stream from %s failed", ws.remote_address)
            await _send_error(ws, "internal", "internal error on this stream",
                              close=CLOSE_INTERNAL)

    async def _run_stream(self, ws: ServerConnection, start: Start, conn: Connection) -> None:
        async def events() -> AsyncIterator[Audio | End]:
            async for message in ws:
                yield conn.receive(message)

        if await self._stream(start, lambda msg: ws.send(encode(msg)), events()):
            await ws.close(1000, "stream complete")

    def _admit(self, start: Start) -> str:
        """Admission control for a new stream -> its id; raises :class:`ProtocolError`."""
        if not self.worker.alive:
            raise ProtocolError("unavailable", "this server cannot tag: its inference worker "
                                f"stopped ({self.worker.health()['reason']}); see /healthz")
        if len(self.streams) >= self.config.max_streams:
            raise ProtocolError("stream_limit", f"server is at its limit of "
                                                f"{self.config.max_streams} streams")
        sid = start.stream_id or uuid.uuid4().hex[:12]
        if sid in self.streams:
            raise ProtocolError("bad_message", f"stream_id {sid!r} is already in use")
        return sid

    async def _stream(self, start: Start, send: Callable[[dict], Awaitable[None]],
                      events: AsyncIterator[Audio | End]) -> bool:
        """One stream, websocket or HTTP: admit it, run ``events``, ``send`` its messages.

        Returns True after ``end`` and the ``final`` message, False when the events stop
        without an ``end`` (the client went). Raises :class:`ProtocolError` for the client.
        """
        sid = self._admit(start)  # no await before the registration: admission is exact
        c = self.config
        session = StreamSession(sid, start, self.model.tags, self.worker.aggregator,
                                segment_dims=self.model.tagger.cfg.d_model,
                                max_duration_s=c.max_duration_s,
                                max_upload_bytes=c.max_upload_bytes,
                                max_upload_s=c.max_upload_s)
        entry = _Stream(session, start.name or sid)
        self.streams[sid] = entry

        async def emit(msg: dict) -> None:
            if msg["type"] in ("update", "segment"):
                entry.history.append(msg)
            for sub in entry.subscribers:
                sub.offer(msg)
            await send(msg)

        driver = SessionDriver(session, self.worker, emit, max_backlog=c.max_backlog)
        ended = False
        try:
            await send(started_msg(sid, start, self.model.tags, self._model_info()))
            driver.start()
            async for msg in events:
                if isinstance(msg, Audio):
                    await driver.feed(msg.data)
                elif isinstance(msg, End):
                    await driver.end()  # viewers got the final through emit
                    ended = True
                    # Unregister before the close handshake: a late subscriber must not
                    # attach to a stream whose final was already sent.
                    self.streams.pop(sid, None)
                    return True
            return False
        finally:
            self.streams.pop(sid, None)
            failure = await driver.cancel()
            # Log what nobody else will: a failure raised to the handler is logged there,
            # and a failed send to a client that has gone is expected.
            if (failure is not None and failure is not sys.exc_info()[1]
                    and not isinstance(failure, ConnectionClosed | ConnectionError)):
                log.error("stream %s: processing failed", sid, exc_info=failure)
            if not ended:
                # Error or vanished client: viewers still get a final, so none waits forever.
                final = session.final_msg(session.context.mean_probs()) | {
                    "reason": "disconnected"}
                for sub in entry.subscribers:
                    sub.offer(final)

    # --- HTTP uploads ---------------------------------------------------------------------

    async def _http_upload(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        self.n_connections += 1
        try:
            await self._serve_http(reader, writer)
        finally:
            self.n_connections -= 1
            await http_upload.close(writer)

    async def _serve_http(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """``POST``/``PUT /api/tag``: the body is the file; the answer streams NDJSON."""
        peer = writer.get_extra_info("peername")
        response = http_upload.NdjsonResponse(writer)
        try:
            req = await http_upload.read_head(reader, self.config.first_message_timeout_s)
            url = urlsplit(req.target)
            if url.path != "/api/tag":
                raise http_upload.HttpError(HTTPStatus.NOT_FOUND, "not found (uploads go to POST "
                                                           "/api/tag)")
            refusal = self._refusal(req.headers, url.query, opens=False)
            if refusal is None and self.n_connections > self.config.max_connections:
                refusal = (HTTPStatus.SERVICE_UNAVAILABLE, f"server is at its limit of "
                           f"{self.config.max_connections} connections")
            if refusal is not None:
                raise http_upload.HttpError(refusal[0], refusal[1].strip())
            length = http_upload.body_length(req.headers)
            if length is not None and length > self.config.max_upload_bytes:
                raise _http_error(ProtocolError("upload_too_large", f"Content-Length {length} "
                                  f"exceeds the limit of {self.config.max_upload_bytes} bytes"))
            params = parse_qs(url.query, keep_blank_values=True)
            params.pop("token", None)
            start = start_from_query(params)
            if req.headers.get("Expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

            async def send(msg: dict) -> None:
                if not response.started:
                    await response.start()
                await response.send(msg)

            async def events() -> AsyncIterator[Audio | End]:
                idle_s = self.config.http_idle_timeout_s
                async for piece in http_upload.body_pieces(reader, length, idle_s):
                    yield Audio(piece)
                yield End()

            await self._stream(start, send, events())
            await response.end()
        except ProtocolError as e:
            log.info("http upload from %s: %s", peer, e)
            if not response.started:
                await http_upload.refuse(writer, _http_error(e), reader)
                return
            await _http_fail(response, reader, e.code, e.message)
        except http_upload.HttpError as e:
            log.info("http upload from %s: %s", peer, e)
            await http_upload.refuse(writer, e, reader)
        except (ConnectionError, TimeoutError) as e:
            log.info("http upload from %s: %s", peer, e)  # cut short, or idle: it has gone
            if response.started:
                await _http_fail(response, reader, "timeout" if isinstance(e, TimeoutError)
                                 else "bad_message", str(e))
        except WorkerStopped as e:
            log.error("http upload from %s: %s", peer, e)
            await _http_fail(response, reader, "unavailable", str(e))
        except Exception:
            log.exception("http upload from %s failed", peer)
            await _http_fail(response, reader, "internal", "internal error on this stream")

    async def _run_subscriber(self, ws: ServerConnection, msg: Subscribe) -> None:
        entry = self.streams.get(msg.stream_id)
        if entry is None:
            raise ProtocolError("unknown_stream", f"no stream {msg.stream_id!r}")
        if self.n_subscribers >= self.config.max_subscribers:
            raise ProtocolError("stream_limit", "server is at its subscriber limit")
        sub = Subscriber(ws)
        # The snapshot and the registration happen in one step of the event loop: every
        # message is either in the history sent now or offered to the subscriber later.
        history = list(entry.history)
        entry.subscribers.add(sub)
        self.n_subscribers += 1
        try:
            s = entry.session
            await ws.send(encode(started_msg(s.stream_id, s.start, self.model.tags,
                                             self._model_info()) | {"subscribed": True,
                                                                    "history": len(history)}))
            for past in history:
                await ws.send(encode(past))
            pump = asyncio.ensure_future(sub.pump())
            closed = asyncio.ensure_future(ws.wait_closed())
            await asyncio.wait({pump, closed}, return_when=asyncio.FIRST_COMPLETED)
            for t in (pump, closed):
                t.cancel()
            if pump.done() and not pump.cancelled() and pump.exception() is None:
                await ws.close(1000, "stream ended")
        finally:
            entry.subscribers.discard(sub)
            self.n_subscribers -= 1

    def _model_info(self) -> dict:
        m = self.model
        return {"name": m.name, "trained": m.trained, "weights_sha256": m.weights_sha256,
                "engine": self.worker.engine.name,
                "engine_fallback": getattr(self.worker.engine, "fallback_reason", None),
                "aggregation":
                "aggregator" if self.worker.aggregator is not None else "mean"}


async def _send_error(ws: ServerConnection, err: str, message: str, *, close: int) -> None:
    """Tell the client what went wrong, then close with a reason (best effort)."""
    try:
        await ws.send(encode(error_msg(err, message)))
        await ws.close(close, err)
    except ConnectionClosed:
        pass  # it is already gone; nothing left to tell


# HTTP status of a refusal sent before the NDJSON answer started.
_HTTP_STATUS = {"stream_limit": HTTPStatus.SERVICE_UNAVAILABLE,
                "connection_limit": HTTPStatus.SERVICE_UNAVAILABLE,
                "unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
                "upload_too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE}


def _http_error(e: ProtocolError) -> http_upload.HttpError:
    return http_upload.HttpError(_HTTP_STATUS.get(e.code, HTTPStatus.BAD_REQUEST), e.message,
                          body=error_msg(e.code, e.message))


async def _http_fail(response: http_upload.NdjsonResponse, reader: asyncio.StreamReader,
                     code: str, message: str) -> None:
    """An error after the answer started: a last NDJSON line, then the end of the body.

    What the client still sends is then read (for a moment) and dropped: closing with
    unread bytes would reset the connection, and the client might miss the error line.
    """
    try:
        if not response.started:
            await response.start()
        await response.send(error_msg(code, message))
        await response.end()
    except (ConnectionError, OSError):
        return  # the client has gone
    await http_upload.discard(reader, response.writer)


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, body)


def _json_response(doc: dict) -> Response:
    return _response(HTTPStatus.OK, json.dumps(doc).encode(), "application/json")


def _host_name(host: str) -> str:
    """``Host`` header -> lower-case name without port (``[::1]:8765`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
