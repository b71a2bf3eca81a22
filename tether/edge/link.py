"""The edge's view of the cloud: the :class:`CloudLink` interface and its value types.

Two implementations: :class:`tether.edge.zmq_link.ZmqCloudLink` (ZeroMQ DEALER, the real one)
and :class:`tether.edge.inproc.InProcessLink` (an in-process twin for fast tests). The agent
only sees this interface; errors are tether's: :class:`~tether.core.errors.BusyError`,
:class:`~tether.core.errors.DeadlineExceededError`, :class:`~tether.core.errors.PeerUnavailableError`,
or the error class the cloud reported.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from tether.core import protocol as P
from tether.core.errors import BusyError, ProtocolError, TetherError

RttCallback = Callable[[float], None]


@dataclass(frozen=True)
class CloudRequest:
    """One tail request: the encoded crossing tensor of a split (``split="input"``: offload)."""

    request_id: int
    split: str
    codec: str
    header: dict[str, Any]                 # the codec's header (msgpack-able)
    payload: list[Any]                     # the codec's payload frames (bytes / memoryview)
    budget_seconds: float                  # how long the edge will wait for the answer


@dataclass(frozen=True)
class CloudReply:
    """The cloud's answer with the cloud-side times it reported and the socket byte counts."""

    request_id: int
    logits: np.ndarray
    queue_seconds: float = 0.0
    decode_seconds: float = 0.0
    tail_seconds: float = 0.0
    round_trip_seconds: float = 0.0        # send to reply, measured on the edge
    bytes_sent: int = 0                    # all frames of the request on the socket
    bytes_received: int = 0                # all frames of the reply
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def network_seconds(self) -> float:
        """Round trip minus the cloud's own queue, decode and tail time."""
        cloud = self.queue_seconds + self.decode_seconds + self.tail_seconds
        return max(0.0, self.round_trip_seconds - cloud)


@runtime_checkable
class CloudLink(Protocol):
    """Connection to one cloud service for one bundle (fingerprint)."""

    @property
    def ready(self) -> bool:
        """Connected and the handshake accepted this bundle's fingerprint."""
        ...

    async def start(self) -> None:
        """Begin connecting (returns at once; the link becomes ready in the background)."""
        ...

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :attr:`ready`; return it."""
        ...

    async def infer(self, request: CloudRequest) -> CloudReply:
        """Send one request and await its RESULT within ``request.budget_seconds``."""
        ...

    async def ping(self, timeout: float) -> float:
        """One PING/PONG round trip in seconds."""
        ...

    def set_rtt_callback(self, callback: RttCallback | None) -> None:
        """Called with each heartbeat RTT sample (seconds)."""
        ...

    async def close(self) -> None:
        """Fail what is pending with PeerUnavailableError and release the socket."""
        ...


def with_bytes(exc: TetherError, sent: int, received: int = 0) -> TetherError:
    """A copy of ``exc`` carrying the socket byte counts, so failed requests are accounted."""
    return exc.with_traffic(sent, received)


def message_error(msg: Any) -> TetherError | None:
    """The error an ERROR or BUSY reply stands for; None for other messages."""
    if isinstance(msg, P.Error):
        return msg.to_exception()
    if isinstance(msg, P.Busy):
        return BusyError(f"cloud busy ({msg.reason}, queue depth {msg.queue_depth})")
    return None


def reply_from_message(request_id: int, msg: Any, rtt: float, sent: int,
                       received: int) -> CloudReply:
    """A :class:`CloudReply` from a RESULT (anything else is a ProtocolError)."""
    if not isinstance(msg, P.Result) or not msg.tensors:
        raise with_bytes(ProtocolError(f"expected RESULT with a tensor, got {type(msg).__name__}"),
                         sent, received)
    logits = P.frame_array(msg.tensors[0], msg.payload[0])
    return CloudReply(request_id, logits.astype("float32"), msg.queue_s, msg.decode_s,
                      msg.tail_s, rtt, sent, received, {"batch_size": msg.batch_size})


class LinkReadiness:
    """What every :class:`CloudLink` shares: the handshake-ready flag and the RTT hook."""

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self._rtt_callback: RttCallback | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def set_rtt_callback(self, callback: RttCallback | None) -> None:
        self._rtt_callback = callback

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.ready
