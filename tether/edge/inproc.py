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
from tether.core.errors import DeadlineExceededError
from tether.edge.link import (CloudReply, CloudRequest, LinkReadiness, SessionMessage,
                              SessionReply, message_error, reply_from_message, session_reply,
                              with_bytes, with_request_id)


class FramePeer(Protocol):
    def request_frames(self, frames: list[Any]) -> Awaitable[list[bytes]]: ...


class InProcessLink(LinkReadiness):
    """:class:`~tether.edge.link.CloudLink` over an in-process peer."""

    endpoint = "inproc"

    def __init__(self, peer: FramePeer, bundle: P.BundleInfo, edge_id: str = "edge") -> None:
        super().__init__(bundle)
        self.peer = peer
        self.edge_id = edge_id
        self._ids = itertools.count(1)

    async def start(self) -> None:
        """Handshake now; a refusal leaves the link not ready (see ``last_refusal``)."""
        reply = await self._exchange(P.Hello(next(self._ids), self.edge_id, self.bundles))
        if isinstance(reply, P.Ready) and not self.missing_bundles(reply):
            self._ready.set()
            self.last_refusal = ""
        else:
            error = message_error(reply)
            self.last_refusal = str(error) if error else "cloud does not serve this bundle"

    def disconnect(self) -> None:
        """Simulate a lost cloud: requests fail with PeerUnavailableError until start()."""
        self._ready.clear()

    async def infer(self, request: CloudRequest) -> CloudReply:
        wire_id = next(self._ids)
        frames = P.encode(P.Infer(wire_id, self.bundle.fingerprint, request.split,
                                  request.codec, request.header, request.budget_seconds,
                                  tuple(request.payload)))
        msg, sent, received, rtt = await self._request("infer", frames, request.budget_seconds)
        return reply_from_message(request.request_id, msg, rtt, sent, received)

    async def session(self, msg: SessionMessage, timeout: float) -> SessionReply:
        frames = P.encode(with_request_id(msg, next(self._ids)))
        reply, sent, received, rtt = await self._request(msg.TYPE.name.lower(), frames, timeout)
        return session_reply(reply, rtt, sent, received)

    async def _request(self, kind: str, frames: list[Any],
                       timeout: float) -> tuple[Any, int, int, float]:
        """Frames to the peer and its reply: (message, sent, received, rtt); typed errors."""
        t0 = time.perf_counter()
        if not self.ready:
            error = self._not_connected(self.endpoint)
            self._observe(kind, t0, 0, 0, error)
            raise error
        sent = P.wire_size(frames)
        try:
            out = await asyncio.wait_for(self.peer.request_frames(frames), timeout)
        except asyncio.TimeoutError as exc:
            error = with_bytes(DeadlineExceededError(f"no answer within {timeout:.3f} s"), sent)
            self._observe(kind, t0, sent, 0, error)
            raise error from exc
        rtt = time.perf_counter() - t0
        msg, received = P.decode(out), P.wire_size(out)
        error = message_error(msg)
        self._observe(kind, t0, sent, received, error)
        if error is not None:
            raise with_bytes(error, sent, received)
        return msg, sent, received, rtt

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
