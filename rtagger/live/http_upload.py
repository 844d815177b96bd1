"""HTTP uploads on the websocket port: ``POST /api/tag`` with a file as its body -> NDJSON.

A backend that holds an artist's file sends it as the (chunked) request body and reads the
same ``started``/``update``/``final`` messages as a websocket client, one JSON object per
line, flushed as they are produced::

    curl -sN -T song.mp3 -H 'Transfer-Encoding: chunked' 'http://127.0.0.1:8765/api/tag'

websockets' HTTP layer answers GET requests only and reads no request body, so each new
connection's first bytes are looked at before websockets sees them (:class:`Router`): a
``POST``/``PUT`` request goes to this module's reader and writer on asyncio streams, and
anything else to websockets, untouched. Everything here is bounded: the request head
(:data:`MAX_HEAD_BYTES`), each chunk header, each body piece (:data:`BODY_PIECE_BYTES`),
and the wait for the next byte (``idle_s``); the server applies its own token, origin,
host, connection and upload limits to the request (see ``server.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus

from websockets.datastructures import Headers

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line and headers together
MAX_HEADERS = 100
BODY_PIECE_BYTES = 64 * 1024  # the largest piece of a body handed on at once
_METHODS = (b"POST ", b"PUT ")  # `curl -T` sends PUT; forms and fetch() send POST

HttpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine]


class HttpError(Exception):
    """A request refused before its response started: status and a one-line reason."""

    def __init__(self, status: HTTPStatus, reason: str, body: dict | None = None) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        super().__init__(f"{status.value} {reason}")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str  # path and query, as sent
    headers: Headers


class Router(asyncio.Protocol):
    """A new connection's first protocol: hands it to websockets or to the HTTP handler.

    ``websocket()`` builds websockets' own connection object (the ``create_connection``
    hook of :func:`websockets.asyncio.server.serve`); it is only built, and so only
    registered with websockets, for connections that are not HTTP uploads.
    """

    def __init__(self, websocket: Callable[[], asyncio.Protocol], http: HttpHandler,
                 tasks: set[asyncio.Task]) -> None:
        self._websocket = websocket
        self._http = http
        self._tasks = tasks
        self._transport: asyncio.Transport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._head += data
        if any(self._head.startswith(m) for m in _METHODS):
            self._to_http()
        elif not any(m.startswith(self._head) for m in _METHODS):
            self._to_websocket()
        # else: a prefix of POST/PUT so far; wait for the next bytes

    def eof_received(self) -> bool | None:
        assert self._transport is not None
        self._transport.close()
        return None

    def _to_websocket(self) -> None:
        assert self._transport is not None
        conn = self._websocket()
        self._transport.set_protocol(conn)
        conn.connection_made(self._transport)
        conn.data_received(self._head)

    def _to_http(self) -> None:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        protocol.data_received(self._head)
        writer = asyncio.StreamWriter(self._transport, protocol, reader, loop)
        task = loop.create_task(self._http(reader, writer), name="rtagger-http-upload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def read_head(reader: asyncio.StreamReader, timeout_s: float) -> HttpRequest:
    """The request line and headers; raises :class:`HttpError` (400, 408, 431)."""
    try:
        return await asyncio.wait_for(_read_head(reader), timeout_s)
    except TimeoutError:
        raise HttpError(HTTPStatus.REQUEST_TIMEOUT, f"no request head within {timeout_s:g} s"
                        ) from None


async def _read_head(reader: asyncio.StreamReader) -> HttpRequest:
    line = await _line(reader)
    headers = Headers()
    size = len(line)
    while True:
        raw = await _line(reader)
        size += len(raw)
        if size > MAX_HEAD_BYTES or len(headers) >= MAX_HEADERS:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"request head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} "
                            f"headers")
        if not raw:
            break
        name, sep, value = raw.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers[name] = value.strip()
    parts = line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    return HttpRequest(parts[0], parts[1], headers)


async def _line(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long"
                        ) from None
    except asyncio.IncompleteReadError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "connection closed in the request head"
                        ) from None
    try:
        return raw.rstrip(b"\r\n").decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "non-ASCII request head") from None


def body_length(headers: Headers) -> int | None:
    """The body's declared length; None: chunked. Raises :class:`HttpError` (400, 411, 501)."""
    coding = headers.get("Transfer-Encoding")
    if coding is not None:
        if coding.strip().lower() != "chunked" or "Content-Length" in headers:
            raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "only Transfer-Encoding: chunked, "
                            "without Content-Length")
        return None
    lengths = headers.get_all("Content-Length")
    if not lengths:
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send Content-Length or chunked")
    if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
    return int(lengths[0])


async def body_pieces(reader: asyncio.StreamReader, length: int | None,
                      idle_s: float) -> AsyncIterator[bytes]:
    """The request body in pieces of at most :data:`BODY_PIECE_BYTES`, as they arrive.

    ``length`` None reads chunked transfer coding (trailers are skipped). Raises
    :class:`ConnectionError` for a body cut short or malformed and :class:`TimeoutError`
    when nothing arrives for ``idle_s``.
    """
    if length is not None:
        left = length
        while left:
            piece = await _timed(reader.read(min(left, BODY_PIECE_BYTES)), idle_s)
            if not piece:
                raise ConnectionError(f"body ended {left} bytes short of Content-Length")
            left -= len(piece)
            yield piece
        return
    while True:
        size_line = await _timed(_chunk_line(reader), idle_s)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ConnectionError("malformed chunk size") from None
        if size == 0:
            while await _timed(_chunk_line(reader), idle_s):
                pass  # trailer fields, until the empty line
            return
        while size:
            piece = await _timed(reader.read(min(size, BODY_PIECE_BYTES)), idle_s)
            if not piece:
                raise ConnectionError("body ended inside a chunk")
            size -= len(piece)
            yield piece
        if await _timed(_chunk_line(reader), idle_s):
            raise ConnectionError("chunk not followed by CRLF")


async def _chunk_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise ConnectionError("body ended or chunk line too long") from None
    if len(line) > 1024:
        raise ConnectionError("chunk line too long")
    return line.rstrip(b"\r\n")


async def _timed(aw, idle_s: float):
    try:
        return await asyncio.wait_for(aw, idle_s)
    except TimeoutError:
        raise TimeoutError(f"no body bytes for {idle_s:g} s") from None


class NdjsonResponse:
    """A streamed ``200`` answer: one JSON message per line, each flushed as one chunk."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.started = False

    async def start(self) -> None:
        self.started = True
        self.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                          b"Transfer-Encoding: chunked\r\nCache-Control: no-store\r\n"
                          b"X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n")
        await self.writer.drain()

    async def send(self, msg: dict) -> None:
        line = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        self.writer.write(b"%x\r\n%s\r\n" % (len(line), line))
        await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


async def refuse(writer: asyncio.StreamWriter, err: HttpError,
                 reader: asyncio.StreamReader | None = None) -> None:
    """Answer a refused request (JSON body when it has one, else its reason) and close.

    With ``reader``, what the client still sends is read and dropped for a moment first:
    closing with unread bytes resets the connection, and the client could miss the answer.
    """
    if err.body is not None:
        body, kind = json.dumps(err.body).encode(), b"application/json"
    else:
        body, kind = err.reason.encode() + b"\n", b"text/plain; charset=utf-8"
    writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                 b"Cache-Control: no-store\r\nConnection: close\r\n\r\n%s"
                 % (err.status.value, err.status.phrase.encode(), kind, len(body), body))
    if reader is not None:
        await discard(reader, writer)
    await close(writer)


DRAIN_S = 2.0  # how long a refused or failed upload's remaining body is read and dropped


async def discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Flush what was written, then read and drop the client's bytes for :data:`DRAIN_S`."""

    async def drop() -> None:
        await writer.drain()
        while await reader.read(1 << 16):
            pass

    try:
        await asyncio.wait_for(drop(), DRAIN_S)
    except (ConnectionError, OSError, TimeoutError):
        pass  # it has gone, or keeps sending: close anyway


async def close(writer: asyncio.StreamWriter) -> None:
    """Flush and close, ignoring a peer that has gone."""
    try:
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass  # it has gone; nothing left to tell
