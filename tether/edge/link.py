"""The edge's view of the cloud: the :class:`CloudLink` interface and its value types.

One link carries every kind of message to one cloud: tail requests of image bundles
(:meth:`CloudLink.infer`) and the steps of LLM sessions (:meth:`CloudLink.session`:
PREFILL/DECODE/CLOSE), after one handshake naming every bundle the edge needs served
(:meth:`CloudLink.add_bundle` for a second one, e.g. the LLM beside the image bundle).
Two implementations: :class:`tether.edge.zmq_link.ZmqCloudLink` (ZeroMQ DEALER, the real one)
and :class:`tether.edge.inproc.InProcessLink` (an in-process twin for fast tests). The agent
only sees this interface; errors are tether's: :class:`~tether.core.errors.BusyError`,
:class:`~tether.core.errors.DeadlineExceededError`, :class:`~tether.core.errors.PeerUnavailableError`,
or the error class the cloud reported.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Union, runtime_checkable

import numpy as np

from tether.core import protocol as P
from tether.core.errors import BusyError, PeerUnavailableError, ProtocolError, TetherError

RttCallback = Callable[[float], None]
#: ``(kind, outcome, seconds, bytes sent, bytes received)`` per exchange on the link; kind is
#: the message type ("infer", "prefill", "decode", "close", "ping"), outcome "ok" or an error code
MessageCallback = Callable[[str, str, float, int, int], None]
SessionMessage = Union[P.Prefill, P.Decode, P.Close]


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


@dataclass(frozen=True)
class SessionReply:
    """The cloud's RESULT to one session step, the round trip and the socket byte counts."""

    result: P.Result
    round_trip_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


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

    async def session(self, msg: SessionMessage, timeout: float) -> SessionReply:
        """Send one PREFILL/DECODE/CLOSE (the link sets its request id) and await its
        RESULT within ``timeout``; BUSY and ERROR raise their typed errors."""
        ...

    def add_bundle(self, bundle: P.BundleInfo) -> None:
        """Also require ``bundle`` (by fingerprint) in the handshake; call before :meth:`start`."""
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
        retry = f", retry in ~{msg.retry_after_s:.3g} s" if msg.retry_after_s > 0 else ""
        return BusyError(f"cloud busy ({msg.reason}, queue depth {msg.queue_depth}{retry})",
                         retry_after_s=retry_estimate(msg.retry_after_s))
    return None


#: The longest a BUSY reply's retry estimate is trusted for (a wrong peer cannot park us).
MAX_RETRY_ESTIMATE_S = 60.0


def retry_estimate(seconds: float) -> float:
    """A peer's retry estimate, clamped to [0, MAX_RETRY_ESTIMATE_S] (NaN: no estimate)."""
    return min(MAX_RETRY_ESTIMATE_S, seconds) if seconds > 0 else 0.0


def with_request_id(msg: SessionMessage, wire_id: int) -> SessionMessage:
    """``msg`` carrying the link's own request id (replies are matched by it)."""
    return msg if msg.request_id == wire_id else replace(msg, request_id=wire_id)


def session_reply(msg: Any, rtt: float, sent: int, received: int) -> SessionReply:
    """A :class:`SessionReply` from a RESULT (anything else is a ProtocolError)."""
    if not isinstance(msg, P.Result):
        raise with_bytes(ProtocolError(f"expected RESULT to a session step, got "
                                       f"{type(msg).__name__}"), sent, received)
    return SessionReply(msg, rtt, sent, received)


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
    """What every :class:`CloudLink` shares: the bundles it needs served, the handshake-ready
    flag, the RTT hook and the per-message observer."""

    def __init__(self, bundle: P.BundleInfo) -> None:
        self.bundle = bundle                  # INFER requests name this one
        self.bundles: tuple[P.BundleInfo, ...] = (bundle,)
        self.last_refusal = ""
        self._ready = asyncio.Event()
        self._rtt_callback: RttCallback | None = None
        self._message_callback: MessageCallback | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def add_bundle(self, bundle: P.BundleInfo) -> None:
        if all(b.fingerprint != bundle.fingerprint for b in self.bundles):
            self.bundles += (bundle,)

    def set_rtt_callback(self, callback: RttCallback | None) -> None:
        self._rtt_callback = callback

    def set_message_callback(self, callback: MessageCallback | None) -> None:
        """Called after every request on the link (metrics per message kind)."""
        self._message_callback = callback

    def _observe(self, kind: str, t0: float, sent: int, received: int,
                 error: BaseException | None = None) -> None:
        if self._message_callback is None:
            return
        outcome = "ok" if error is None else getattr(error, "code", "internal")
        self._message_callback(kind, outcome, time.perf_counter() - t0, sent, received)

    def _not_connected(self, endpoint: str) -> PeerUnavailableError:
        why = f" ({self.last_refusal})" if self.last_refusal else ""
        return PeerUnavailableError(f"cloud {endpoint} not connected{why}")

    def missing_bundles(self, ready: P.Ready) -> list[P.BundleInfo]:
        """The bundles this link needs that a READY does not list."""
        return [b for b in self.bundles if ready.bundle(b.fingerprint) is None]

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.ready
