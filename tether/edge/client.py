"""Python clients of the edge's local endpoint: ``EdgeClient(endpoint).infer(image)`` and
``LLMClient(endpoint).generate(prompt)``.

Light: numpy, pyzmq and msgpack only (no torch, transformers or ONNX Runtime), so an
application imports them in a fraction of a second.

Synchronous and thread-confined (one client per thread); a DEALER socket, so a timed-out
request does not wedge the client: late answers to it are discarded.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from tether.core import protocol as P
from tether.core.errors import BusyError, DeadlineExceededError, PeerUnavailableError, ProtocolError
from tether.core.sampling import SamplingParams

LOCAL_CODEC = "tensor"   # the local endpoint's one codec id: a raw tensor frame
TEXT_CODEC = "text"      # a generation request: PREFILL whose payload is the UTF-8 prompt
#: Where a streamed token came from, as the uint8 code in the local endpoint's RESULTs.
SOURCES = ("cloud", "exit", "local")


@dataclass(frozen=True)
class EdgeAnswer:
    """The edge's answer to one image."""

    logits: np.ndarray                  # [1, classes] float32
    prediction: int                     # argmax class index
    action: str                         # action key executed, e.g. "split:layer2:fp32"
    outcome: str                        # "cloud", "local", "exit" or "fallback"
    fallback_reason: str                # "", "timeout", "busy", "error", "disconnected"
    total_seconds: float                # edge-side time for the request
    label: str = ""                     # class name, when the bundle has labels
    record: dict[str, Any] = field(default_factory=dict)   # the full RequestRecord fields

    @property
    def timings(self) -> dict[str, float]:
        """Per-stage seconds (head, encode, network, cloud queue/decode, tail, local, total)."""
        return {k.removesuffix("_seconds"): float(v) for k, v in self.record.items()
                if k.endswith("_seconds")}


class PeerWatch:
    """Connection events of a client's DEALER (a ZeroMQ socket monitor), so a request fails
    fast when its peer goes away (SIGKILL, crash: the kernel closes the TCP connection)
    instead of waiting a whole timeout for an answer that cannot come."""

    _EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED

    def __init__(self, sock: zmq.Socket) -> None:
        self.socket = sock.get_monitor_socket(self._EVENTS)
        self.connected = self.ever_connected = False
        self.lost = ""          # why the peer is gone for the pending request; "" = not gone

    def begin(self) -> None:
        """Call right before sending a request: forget what happened before it."""
        self.update()
        self.lost = ""

    def update(self) -> None:
        while self.socket.poll(0):
            event = recv_monitor_message(self.socket)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = self.ever_connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected, self.lost = False, self.lost or "closed the connection"
            elif event == zmq.EVENT_CONNECT_RETRIED and self.ever_connected and not self.connected:
                self.lost = self.lost or "refuses connections"

    def close(self) -> None:
        self.socket.close(linger=0)


def receive_matching(sock: zmq.Socket, watch: PeerWatch, rid: int, timeout: float,
                     endpoint: str, what: str) -> tuple[list[bytes], Any]:
    """Frames and message of the reply to ``rid``; an ERROR the peer could not tie to any
    request (id 0: oversized or unreadable message) is ours too, as the only one pending.
    Raises PeerUnavailableError as soon as the peer is gone, DeadlineExceededError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(watch.socket, zmq.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(int(left * 1000) + 1))
        if watch.socket in ready:
            watch.update()
            if watch.lost:
                raise PeerUnavailableError(f"the {what} at {endpoint} {watch.lost} while "
                                           f"request {rid} was pending (stopped or crashed?)")
        if sock not in ready:
            continue
        frames = sock.recv_multipart()
        try:
            msg = P.decode(frames)
        except ProtocolError:
            continue
        if msg.request_id == rid or (msg.request_id == 0 and isinstance(msg, P.Error)):
            return frames, msg
    hint = "" if watch.ever_connected else " (no connection was ever made)"
    raise DeadlineExceededError(f"no answer from the {what} at {endpoint} within {timeout} s"
                                f"{hint}: is it running there?")


class EdgeClient:
    """Sends images to a running edge daemon (``tether edge --listen ENDPOINT``)."""

    def __init__(self, endpoint: str, timeout: float = 10.0,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._watch = PeerWatch(self._sock)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)

    def infer(self, image: np.ndarray, deadline_seconds: float | None = None) -> EdgeAnswer:
        """Classify one image: uint8 HWC at the bundle's input size, or float NCHW in [0, 1].

        Raises the error class the edge reported (e.g. InputShapeError), BusyError when the
        edge is full or draining, DeadlineExceededError when nothing came within ``timeout``.
        """
        rid = next(self._ids)
        desc, view = P.tensor_frame(np.asarray(image))
        msg = P.Infer(rid, "", "input", LOCAL_CODEC, desc.to_wire(), deadline_seconds, (view,))
        self._watch.begin()
        self._sock.send_multipart(P.encode(msg), copy=False)
        frames, reply = self._receive(rid)
        if isinstance(reply, P.Error):
            raise reply.to_exception()
        if isinstance(reply, P.Busy):
            raise BusyError(f"edge {self.endpoint} busy ({reply.reason}); retry later")
        if not isinstance(reply, P.Result) or not reply.tensors:
            raise ProtocolError(f"unexpected {type(reply).__name__} from the edge")
        record = msgpack.unpackb(frames[1], raw=False).get("edge") or {}
        if not isinstance(record, dict):
            raise ProtocolError("edge RESULT header field 'edge' must be a map")
        logits = np.array(P.frame_array(reply.tensors[0], reply.payload[0]), dtype=np.float32)
        return EdgeAnswer(logits, int(np.argmax(logits.reshape(-1))), str(record.get("action", "")),
                          str(record.get("outcome", "")), str(record.get("fallback_reason", "")),
                          float(record.get("total_seconds", 0.0)), str(record.get("label", "")),
                          record)

    def info(self) -> P.BundleInfo:
        """What the edge serves: model id, fingerprint, split points, input shape."""
        rid = next(self._ids)
        self._watch.begin()
        self._sock.send_multipart(P.encode(P.Hello(rid, "edge-client")))
        _, reply = self._receive(rid)
        if isinstance(reply, P.Error):
            raise reply.to_exception()
        if not isinstance(reply, P.Ready) or not reply.bundles:
            raise ProtocolError(f"unexpected {type(reply).__name__} from the edge to HELLO")
        return reply.bundles[0]

    def ping(self) -> float:
        """Round trip to the edge daemon in seconds."""
        rid = next(self._ids)
        t0 = time.perf_counter()
        self._watch.begin()
        self._sock.send_multipart(P.encode(P.Ping(rid, time.monotonic())))
        self._receive(rid)
        return time.perf_counter() - t0

    def _receive(self, rid: int) -> tuple[list[bytes], Any]:
        return receive_matching(self._sock, self._watch, rid, self.timeout, self.endpoint,
                                "edge (`tether edge`)")

    def close(self) -> None:
        self._watch.close()
        self._sock.close(linger=0)

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LLMClient:
    """Synchronous client of the edge's LLM streams (``tether edge --llm-checkpoint`` or
    ``tether llm-edge``): ``for tok in client.generate(p): ...``."""

    def __init__(self, endpoint: str, timeout: float = 10.0, context: Any = None) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._watch = PeerWatch(self._sock)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self.counts: dict[str, int] = {}

    def generate(self, prompt: str, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None) -> Any:
        """Yield ``(token, text, source)`` as the edge streams them, greedy or sampled under
        ``sampling``; :attr:`counts` then holds the edge's tokens per source. An ERROR ends
        the stream as its typed error."""
        rid = next(self._ids)
        self.counts = {}
        self._watch.begin()
        sp = sampling or SamplingParams()
        self._sock.send_multipart(P.encode(P.Prefill(
            rid, "", "", "", TEXT_CODEC, 0, max_new_tokens, payload=(prompt.encode("utf-8"),),
            temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=sp.seed)))
        while True:
            reply = self._receive(rid)
            if isinstance(reply, P.Error):
                raise reply.to_exception()
            if not isinstance(reply, P.Result):
                raise ProtocolError(f"unexpected {type(reply).__name__} from the edge")
            arrays = [P.frame_array(reply.tensors[i], reply.payload[i])
                      for i in range(len(reply.tensors))]
            if len(arrays) < 3:       # end of stream: tokens per source
                if arrays:
                    self.counts = dict(zip(SOURCES, (int(n) for n in arrays[0])))
                return
            token, text, source = arrays
            yield int(token[0]), bytes(text).decode("utf-8"), SOURCES[int(source[0])]

    def _receive(self, rid: int) -> Any:
        return receive_matching(self._sock, self._watch, rid, self.timeout, self.endpoint,
                                "LLM edge")[1]

    def close(self) -> None:
        self._watch.close()
        self._sock.close(linger=0)
