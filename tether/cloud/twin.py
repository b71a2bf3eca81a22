"""The in-process twin of the cloud service: the same decode -> batch -> tail path, no sockets.

For fast tests of anything that talks to a cloud (the edge agent above all)::

    cloud = InProcessCloud([ServedBundle.load(bundle_dir)], CloudConfig(max_batch_size=8))
    await cloud.start()
    ready = await cloud.request(P.Hello(1, "edge-a"))
    reply = await cloud.request(P.Infer(2, fp, "layer2", "fp32", enc.header, 1.0,
                                        tuple(enc.payload)))
    frames = await cloud.request_frames(P.encode(msg))   # bytes in, bytes out, like a socket
    await cloud.close()

Every message goes through :func:`tether.core.protocol.encode`/``decode`` (``wire=True``,
the default), so what passes here passes the socket server too.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from tether.cloud.bundles import ServedBundle
from tether.cloud.config import CloudConfig
from tether.cloud.core import CloudCore
from tether.cloud.sessions import SessionHandler
from tether.core import protocol as P
from tether.core.errors import ProtocolError
from tether.core.metrics import CloudMetrics


class InProcessCloud:
    """A cloud service object answering protocol messages directly."""

    def __init__(self, bundles: Iterable[ServedBundle], config: CloudConfig = CloudConfig(),
                 metrics: CloudMetrics | None = None, sessions: SessionHandler | None = None,
                 wire: bool = True) -> None:
        self.core = CloudCore(bundles, config, metrics, sessions)
        self.limits = config.limits
        self.wire = wire

    async def start(self) -> None:
        await self.core.start()

    async def close(self, drain_timeout: float | None = 5.0) -> None:
        await self.core.drain(drain_timeout)
        await self.core.close()

    async def __aenter__(self) -> "InProcessCloud":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def request(self, msg: Any) -> Any:
        """Send one message, await the cloud's reply message."""
        if not self.wire:
            return await self.core.handle(msg)
        frames = await self.request_frames(P.encode(msg))
        return P.decode(frames, self.limits)

    async def request_frames(self, frames: list[Any]) -> list[bytes]:
        """Raw frames in, raw reply frames out (malformed input gets an ERROR, like the socket)."""
        received = time.perf_counter()
        frames = [bytes(f) for f in frames]
        try:
            msg = P.decode(frames, self.limits)
        except ProtocolError as exc:
            reply: Any = P.Error.from_exception(P.peek_request_id(frames), exc)
        else:
            reply = await self.core.handle(msg, received, P.wire_size(frames))
        return [bytes(f) for f in P.encode(reply)]
