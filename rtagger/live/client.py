"""Websocket client for protocol v1: send a stream of PCM blocks, receive tag updates.

Used by ``rtagger stream --server`` and ``rtagger listen --server``, and by the tests.
Sending and receiving run concurrently, so updates arrive while audio is still going out;
the server's backpressure (uploads) slows the sender through ordinary TCP flow control.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import numpy as np
from websockets.asyncio.client import connect

from rtagger.errors import RtaggerError
from rtagger.live.protocol import float32_frame

OnMessage = Callable[[dict], None]


class ServerError(RtaggerError):
    """The server answered with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"server error {code}: {message}")


async def stream_to_server(
    url: str,
    blocks: AsyncIterator[np.ndarray],
    *,
    sample_rate: int,
    channels: int = 1,
    hop_s: float = 1.0,
    live: bool = True,
    segment: bool = True,
    stream_id: str | None = None,
    name: str = "",
    token: str | None = None,
    on_message: OnMessage | None = None,
) -> dict:
    """Stream float32 blocks (``(n,)`` mono or ``(channels, n)``) and return ``final``.

    Every server message is passed to ``on_message`` as it arrives. Raises
    :class:`ServerError` when the server reports a fatal error.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    start = {"type": "start", "version": 1, "format": "float32", "sample_rate": sample_rate,
             "channels": channels, "hop_s": hop_s, "live": live, "segment": segment,
             "name": name}
    if stream_id:
        start["stream_id"] = stream_id
    async with connect(url, additional_headers=headers, max_size=1 << 22,
                       compression=None) as ws:  # PCM barely compresses
        await ws.send(json.dumps(start))
        final: dict = {}

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if on_message is not None:
                    on_message(msg)
                if msg["type"] == "error" and msg.get("fatal", True):
                    raise ServerError(msg["code"], msg["message"])
                if msg["type"] == "final":
                    final.update(msg)
                    return

        receiver = asyncio.ensure_future(receive())
        try:
            async for block in blocks:
                if receiver.done():
                    break  # the server ended the stream (error): stop sending
                await ws.send(float32_frame(block))
            if not receiver.done():
                await ws.send(json.dumps({"type": "end"}))
            await receiver
        finally:
            receiver.cancel()
        if not final:
            raise ServerError("closed", "connection closed before the final message")
        return final
