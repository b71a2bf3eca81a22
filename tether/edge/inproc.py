"""An in-process twin of the cloud link for fast tests: same protocol bytes, no sockets.

It wraps any peer with ``async request_frames(frames) -> frames`` — in practice
:class:`tether.cloud.twin.InProcessCloud` (passed in by the caller; the edge never imports
the cloud). Every message is encoded and decoded with :mod:`tether.core.protocol`, so the
handshake, fingerprint check, BUSY/ERROR mapping and byte counts match
:class:`~tether.edge.zmq_link.ZmqCloudLink`. :meth:`InProcessLink.disconnect` simulates a
lost cloud.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Awaitable, Protocol

from tether.core import protocol as P
from tether.core.errors import DeadlineExceededError, PeerUnavailableError
from tether.edge.link import (CloudReply, CloudRequest, LinkReadiness, message_error,
                              reply_from_message, with_bytes)


class FramePeer(Protocol):
    def request_frames(self, frames: list[Any]) -> Awaitable[list[bytes]]: ...


class InProcessLink(LinkReadiness):
    """:class:`~tether.edge.link.CloudLink` over an in-process peer."""

    def __init__(self, peer: FramePeer, bundle: P.BundleInfo, edge_id: str = "edge") -> None:
        super().__init__()
        self.peer = peer
        self.bundle = bundle
        self.edge_id = edge_id
        self._ids = itertools.count(1)
        self.last_refusal = ""

    async def start(self) -> None:
        """Handshake now; a refusal leaves the link not ready (see ``last_refusal``)."""
        reply = await self._exchange(P.Hello(next(self._ids), self.edge_id, (self.bundle,)))
        if isinstance(reply, P.Ready) and reply.bundle(self.bundle.fingerprint) is not None:
            self._ready.set()
            self.last_refusal = ""
        else:
            error = message_error(reply)
            self.last_refusal = str(error) if error else "cloud does not serve this bundle"

    def disconnect(self) -> None:
        """Simulate a lost cloud: requests fail with PeerUnavailableError until start()."""
        self._ready.clear()

    async def infer(self, request: CloudRequest) -> CloudReply:
        if not self.ready:
            raise PeerUnavailableError("in-process cloud not connected")
        frames = P.encode(P.Infer(next(self._ids), self.bundle.fingerprint, request.split,
                                  request.codec, request.header, request.budget_seconds,
                                  tuple(request.payload)))
        sent = P.wire_size(frames)
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(self.peer.request_frames(frames), request.budget_seconds)
        except asyncio.TimeoutError as exc:
            raise with_bytes(DeadlineExceededError(
                f"no answer within {request.budget_seconds:.3f} s"), sent) from exc
        rtt = time.perf_counter() - t0
        msg = P.decode(out)
        error = message_error(msg)
        if error is not None:
            raise with_bytes(error, sent, P.wire_size(out))
        return reply_from_message(request.request_id, msg, rtt, sent, P.wire_size(out))

    async def ping(self, timeout: float) -> float:
        t0 = time.perf_counter()
        await asyncio.wait_for(self._exchange(P.Ping(next(self._ids), time.monotonic())), timeout)
        rtt = time.perf_counter() - t0
        if self._rtt_callback is not None:
            self._rtt_callback(rtt)
        return rtt

    async def close(self) -> None:
        self._ready.clear()

    async def _exchange(self, msg: Any) -> Any:
        return P.decode(await self.peer.request_frames(P.encode(msg)))
