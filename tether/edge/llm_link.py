"""The edge's session link to an LLM cloud: PREFILL/DECODE/CLOSE over ZeroMQ, replies by id.

:class:`SessionLink` is the DEALER client (``delay_s`` emulates a round-trip time, half
before sending, half after the reply, for benchmarks); :class:`LocalSessionLink` its
in-process twin for tests. Both raise the typed errors (DeadlineExceededError on timeout,
BusyError, the cloud's ERROR) and offer ``wait_ready`` (HELLO until READY).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from tether.core import protocol as P
from tether.core.errors import (BusyError, DeadlineExceededError, PeerUnavailableError,
                                ProtocolError)


class SessionLink:
    """ZeroMQ DEALER carrying PREFILL/DECODE/CLOSE to an LLM cloud; replies matched by id."""

    def __init__(self, endpoint: str, delay_s: float = 0.0, context: Any = None) -> None:
        import zmq
        import zmq.asyncio
        self.endpoint, self.delay_s = endpoint, delay_s
        self._sock = (context or zmq.asyncio.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    def next_id(self) -> int:
        return next(self._ids)

    async def wait_ready(self, timeout: float) -> None:
        """HELLO (again every second) until the cloud answers READY; else the typed error."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply, _, _ = await self.call(P.Hello(self.next_id(), "tether-llm-edge"),
                                              min(1.0, left))
            except DeadlineExceededError:
                continue
            if isinstance(reply, P.Ready):
                return
            raise ProtocolError(f"{self.endpoint} answered HELLO with {type(reply).__name__}")
        raise PeerUnavailableError(f"cloud {self.endpoint} not ready (no READY to HELLO) "
                                   f"within {timeout} s: is it running?")

    async def call(self, msg: Any, timeout: float) -> tuple[Any, int, int]:
        """Send ``msg``, await its reply: ``(Result, bytes sent, bytes received)``."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="tether-llm-link")
        future = asyncio.get_running_loop().create_future()
        self._pending[msg.request_id] = future
        frames = P.encode(msg)
        try:
            reply, received = await asyncio.wait_for(self._exchange(frames, future), timeout)
        except asyncio.TimeoutError as exc:
            raise DeadlineExceededError(f"no answer from {self.endpoint} in {timeout} s") from exc
        finally:
            self._pending.pop(msg.request_id, None)
        if isinstance(reply, P.Error):
            raise reply.to_exception()
        if isinstance(reply, P.Busy):
            raise BusyError(f"cloud {self.endpoint} busy ({reply.reason})")
        return reply, P.wire_size(frames), received

    async def _exchange(self, frames: list[Any], future: asyncio.Future) -> tuple[Any, int]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s / 2)
        await self._sock.send_multipart(frames, copy=False)
        reply = await future
        if self.delay_s:
            await asyncio.sleep(self.delay_s / 2)
        return reply

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                msg = P.decode(frames)
            except ProtocolError:
                continue
            future = self._pending.get(msg.request_id)
            if future is not None and not future.done():
                future.set_result((msg, P.wire_size(frames)))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(linger=0)


class LocalSessionLink:
    """In-process twin of :class:`SessionLink`: frames go through the real protocol codec
    to ``handler`` (e.g. ``LLMEngine.handle``) without sockets; same errors, same delay."""

    def __init__(self, handler: Any, delay_s: float = 0.0) -> None:
        self.handler, self.delay_s = handler, delay_s
        self.endpoint = "inproc"
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    async def wait_ready(self, timeout: float) -> None:
        return None     # the in-process cloud is there as soon as it exists

    async def call(self, msg: Any, timeout: float) -> tuple[Any, int, int]:
        frames = P.encode(msg)
        try:
            reply_frames = await asyncio.wait_for(self._exchange(frames), timeout)
        except asyncio.TimeoutError as exc:
            raise DeadlineExceededError(f"no answer from the in-process cloud in {timeout} s") from exc
        reply = P.decode(reply_frames)
        if isinstance(reply, P.Error):
            raise reply.to_exception()
        if isinstance(reply, P.Busy):
            raise BusyError(f"cloud busy ({reply.reason})")
        return reply, P.wire_size(frames), P.wire_size(reply_frames)

    async def _exchange(self, frames: list[Any]) -> list[Any]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s / 2)
        reply = P.encode(await self.handler(P.decode([bytes(memoryview(f)) for f in frames])))
        if self.delay_s:
            await asyncio.sleep(self.delay_s / 2)
        return [bytes(memoryview(f)) for f in reply]

    async def close(self) -> None:
        return None
