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

from tether.core import protocol as P
from tether.core.errors import BusyError, DeadlineExceededError, ProtocolError

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


class EdgeClient:
    """Sends images to a running edge daemon (``tether edge --listen ENDPOINT``)."""

    def __init__(self, endpoint: str, timeout: float = 10.0,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
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
        self._sock.send_multipart(P.encode(P.Ping(rid, time.monotonic())))
        self._receive(rid)
        return time.perf_counter() - t0

    def _receive(self, rid: int) -> tuple[list[bytes], Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise DeadlineExceededError(f"no answer from the edge at {self.endpoint} within "
                                            f"{self.timeout} s: is `tether edge` running there?")
            frames = self._sock.recv_multipart()
            try:
                msg = P.decode(frames)
            except ProtocolError:
                continue
            if msg.request_id == rid:
                return frames, msg

    def close(self) -> None:
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
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)

    def generate(self, prompt: str, max_new_tokens: int = 64) -> Any:
        """Yield ``(token, text, source)`` as the edge streams them."""
        rid = next(self._ids)
        self._sock.send_multipart(P.encode(P.Prefill(rid, "", "", "", TEXT_CODEC, 0, max_new_tokens,
                                                     payload=(prompt.encode("utf-8"),))))
        while True:
            reply = self._receive(rid)
            if isinstance(reply, P.Error):
                raise reply.to_exception()
            if not isinstance(reply, P.Result):
                raise ProtocolError(f"unexpected {type(reply).__name__} from the edge")
            if not reply.tensors:
                return
            token, text, source = (P.frame_array(reply.tensors[i], reply.payload[i])
                                   for i in range(3))
            yield int(token[0]), bytes(text).decode("utf-8"), SOURCES[int(source[0])]

    def _receive(self, rid: int) -> Any:
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            if self._sock.poll(int(left * 1000)):
                msg = P.decode(self._sock.recv_multipart())
                if msg.request_id == rid:
                    return msg
        raise DeadlineExceededError(f"no token from the edge {self.endpoint} in {self.timeout} s")

    def close(self) -> None:
        self._sock.close(linger=0)
