"""The Python client of the edge's application endpoint: ``EdgeClient(endpoint)``, with
``infer(image)`` for images and ``generate(prompt)`` streaming tokens.

Light: numpy, pyzmq and msgpack only (no torch, transformers or ONNX Runtime), so an
application imports it in a fraction of a second. It speaks the declared app-endpoint
messages of :mod:`tether.core.protocol` (ImageRequest/ImageReply, Generate/TokenChunk/
StreamEnd) that :class:`tether.edge.server.EdgeServer` answers.

Synchronous and thread-confined (one client per thread); a DEALER socket, so a timed-out
request does not wedge the client: late answers to it are discarded.
"""

from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from tether.core import protocol as P
from tether.core.sockets import close_monitor, monitor_socket, open_socket
from tether.core.errors import BusyError, DeadlineExceededError, PeerUnavailableError, ProtocolError

#: Where a streamed token came from (TokenChunk.source).
SOURCES = P.TOKEN_SOURCES


@dataclass(frozen=True)
class EdgeAnswer:
    """The edge's answer to one image."""

    logits: np.ndarray                  # [1, classes] float32
    prediction: int                     # argmax class index
    action: str                         # action key executed, e.g. "split:layer2:fp32"
    outcome: str                        # "cloud", "local", "exit" or "fallback"
    fallback_reason: str                # "", "timeout", "overdue", "busy", "error", "disconnected"
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
        self._owner = sock
        self.socket = monitor_socket(sock, self._EVENTS)
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
        """Stop the monitor (its inproc peer inside libzmq goes too), then close our end."""
        close_monitor(self._owner, self.socket)


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
    """The client of a running edge daemon (``tether edge --listen ENDPOINT``): images and
    token streams."""

    def __init__(self, endpoint: str, timeout: float = 10.0,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout          # seconds per answer (per chunk of a token stream)
        self._ctx = context or zmq.Context.instance()
        # a gone edge is retried at 0.1 s, backing off to 1 s: an idle client does not
        # spin (nor queue a monitor event) ten times a second until it is closed
        self._sock = open_socket(self._ctx, zmq.DEALER, RECONNECT_IVL_MAX=1000)
        self._watch = PeerWatch(self._sock)
        self._sock.connect(endpoint)
        # closes in order (monitor, then socket) even when the client is only dropped: were
        # the monitor's socket collected first, libzmq's I/O thread would block for good
        # sending its next event (no peer) and take every connection of the context along
        self._closer = weakref.finalize(self, _close_client, self._sock, self._watch)
        self._ids = itertools.count(1)

    def infer(self, image: np.ndarray, deadline_seconds: float | None = None) -> EdgeAnswer:
        """Classify one image: uint8 HWC at the bundle's input size, or float NCHW in [0, 1].

        Raises the error class the edge reported (e.g. InputShapeError), BusyError when the
        edge is full or draining, DeadlineExceededError when nothing came within ``timeout``.
        """
        desc, view = P.tensor_frame(np.asarray(image))
        reply = self._call(P.ImageRequest(next(self._ids), (desc,), (view,), deadline_seconds))
        if not isinstance(reply, P.ImageReply):
            raise ProtocolError(f"unexpected {type(reply).__name__} from the edge to IMAGE")
        record = reply.record
        logits = np.array(P.frame_array(reply.tensors[0], reply.payload[0]), dtype=np.float32)
        return EdgeAnswer(logits, int(np.argmax(logits.reshape(-1))), str(record.get("action", "")),
                          str(record.get("outcome", "")), str(record.get("fallback_reason", "")),
                          float(record.get("total_seconds") or 0.0), reply.label, dict(record))

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> "TokenStream":
        """Stream the continuation of ``prompt`` (text or token ids) from the edge's LLM:
        ``for chunk in client.generate(p): chunk.text, chunk.source``; afterwards the
        stream's ``record`` holds the edge's StreamEnd (tokens by source, finish reason).

        Greedy (the whole model's argmax) unless ``temperature`` > 0: then sampled with
        ``top_k``/``top_p`` (0 and 1: no cut) from ``seed``, reproducibly. An error that
        ends the stream is raised as its typed error (the record is kept).
        """
        text = prompt if isinstance(prompt, str) else ""
        ids = () if isinstance(prompt, str) else tuple(int(t) for t in prompt)
        msg = P.Generate(next(self._ids), text, ids, max_new_tokens, float(temperature), top_k,
                         float(top_p), seed)
        self._send(msg)
        return TokenStream(self, msg.request_id)

    def info(self) -> P.BundleInfo:
        """What the edge serves first (its bundle, else its LLM): model id, fingerprint,
        split points, input shape. :meth:`models` lists everything it serves."""
        models = self.models()
        if not models:
            raise ProtocolError("the edge's READY lists nothing it serves")
        return models[0]

    def models(self) -> tuple[P.BundleInfo, ...]:
        """Everything the edge serves: its bundle and/or its LLM."""
        reply = self._call(P.Hello(next(self._ids), "edge-client"))
        if not isinstance(reply, P.Ready):
            raise ProtocolError(f"unexpected {type(reply).__name__} from the edge to HELLO")
        return reply.bundles

    def ping(self) -> float:
        """Round trip to the edge daemon in seconds."""
        t0 = time.perf_counter()
        self._call(P.Ping(next(self._ids), time.monotonic()))
        return time.perf_counter() - t0

    def _send(self, msg: Any) -> None:
        self._watch.begin()
        self._sock.send_multipart(P.encode(msg), copy=False)

    def _call(self, msg: Any) -> Any:
        self._send(msg)
        return self._answer(msg.request_id)

    def _answer(self, rid: int) -> Any:
        """The edge's next message for ``rid``; ERROR and BUSY raise their typed errors."""
        reply = receive_matching(self._sock, self._watch, rid, self.timeout, self.endpoint,
                                 "edge (`tether edge`)")[1]
        if isinstance(reply, P.Error):
            raise reply.to_exception()
        if isinstance(reply, P.Busy):
            raise BusyError(f"edge {self.endpoint} busy ({reply.reason}); retry later")
        return reply

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_client(sock: zmq.Socket, watch: PeerWatch) -> None:
    watch.close()
    sock.close(linger=0)


class TokenStream:
    """The chunks of one generation as they come (:class:`tether.core.protocol.TokenChunk`:
    ``tokens``, ``text``, ``source``); ``record`` is the edge's StreamEnd once it ended."""

    def __init__(self, client: EdgeClient, request_id: int) -> None:
        self._client, self.request_id = client, request_id
        self.record: P.StreamEnd | None = None
        self._done = False

    def __iter__(self) -> Iterator[P.TokenChunk]:
        return self

    def __next__(self) -> P.TokenChunk:
        if self._done:
            raise StopIteration
        try:
            reply = self._client._answer(self.request_id)
        except BaseException:
            self._done = True
            raise
        if isinstance(reply, P.TokenChunk):
            return reply
        self._done = True
        if not isinstance(reply, P.StreamEnd):
            raise ProtocolError(f"unexpected {type(reply).__name__} in a token stream")
        self.record = reply
        error = reply.to_exception()
        if error is not None:
            raise error
        raise StopIteration

    def text(self) -> str:
        """The rest of the stream's text, waiting for its end."""
        return "".join(chunk.text for chunk in self)
