"""The edge's application endpoint: a ZeroMQ ROUTER, the one owner of its message format.

Applications (or :class:`tether.edge.client.EdgeClient`) speak the declared app-endpoint
messages of :mod:`tether.core.protocol`:

* ``ImageRequest`` (one tensor: a uint8 HWC image at the bundle's input size, or float NCHW
  in [0, 1]; ``deadline_s``) -> ``ImageReply``: the logits ``[1, classes]``, the request's
  :class:`~tether.core.types.RequestRecord` (action, outcome, fallback reason, per-stage
  seconds, bytes) as ``record``, and ``label`` when the bundle has class names;
* ``Generate`` (prompt text or token ids, max new tokens, sampling settings) -> one
  ``TokenChunk`` per generated token (id, text piece, source), then ``StreamEnd``: the
  stream's record (tokens by source, seconds, finish reason, and the typed error that ended
  it, if any);
* HELLO -> READY (the bundle, then the LLM), PING -> PONG. Bad input gets an ERROR, a full
  queue or a draining daemon a BUSY. The cloud's INFER / PREFILL are refused with a line
  that names the fix (older clients sent those here).

The IO task only parses and queues; image workers run :meth:`EdgeAgent.infer` (compute in
threads); each token stream is one task, at most ``max_streams`` at once (BUSY beyond), and
stops when its application disconnects. One server holds a bundle, an LLM or both:
``tether edge`` (``--bundle``, ``--llm-checkpoint``, or both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np
import zmq
import zmq.asyncio

from tether.core import protocol as P
from tether.core.sockets import open_socket
from tether.core.errors import ConfigError, ProtocolError, TetherError, UnknownModelError
from tether.core.sampling import SamplingParams
from tether.core.types import RequestRecord

if TYPE_CHECKING:
    from tether.edge.agent import EdgeAgent
    from tether.edge.llm import LLMEdge

log = logging.getLogger(__name__)

_Item = tuple[bytes, P.ImageRequest, np.ndarray, float]   # identity, request, image, arrival
_OLD = {P.MsgType.INFER: "ImageRequest", P.MsgType.PREFILL: "Generate"}


def sampling_of(msg: P.Generate) -> SamplingParams:
    """The sampling settings ``msg`` asks for (validated: a ConfigError names a bad one)."""
    return SamplingParams(msg.temperature, msg.top_k, msg.top_p, msg.seed)


def open_generation(llm: "LLMEdge", msg: P.Generate, cap: int) -> AsyncIterator[Any]:
    """``llm``'s token events for ``msg``: at most ``cap`` tokens, its sampling settings."""
    prompt = msg.prompt or list(msg.token_ids)
    return llm.generate(prompt, min(msg.max_new_tokens, cap), sampling=sampling_of(msg))


def image_reply(request_id: int, logits: np.ndarray, record: RequestRecord,
                label: str | None = None) -> P.ImageReply:
    """The ImageReply for one answered image."""
    desc, view = P.tensor_frame(np.ascontiguousarray(logits, dtype=np.float32))
    return P.ImageReply(request_id, (desc,), (view,), record.to_dict(), label or "")


class EdgeServer:
    """Serves an :class:`EdgeAgent` (images) and/or an :class:`LLMEdge` (token streams) on a
    local ROUTER endpoint."""

    def __init__(self, agent: "EdgeAgent | None", endpoint: str, queue_size: int = 256,
                 workers: int = 32, context: zmq.asyncio.Context | None = None,
                 limits: P.Limits = P.DEFAULT_LIMITS, llm: "LLMEdge | None" = None,
                 llm_max_new_tokens: int = 1024, llm_model_id: str = "llm",
                 max_streams: int | None = None) -> None:
        if agent is None and llm is None:
            raise ConfigError("the edge endpoint needs a bundle, an LLM or both to serve")
        self.agent, self.endpoint, self.limits = agent, endpoint, limits
        self.llm, self.llm_max_new_tokens, self.llm_model_id = llm, llm_max_new_tokens, llm_model_id
        self.max_streams = max_streams or workers
        self._streams: dict[asyncio.Task, bytes] = {}      # stream task -> application
        self._ctx = context or zmq.asyncio.Context.instance()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(queue_size)
        self._out: asyncio.Queue[list[Any]] = asyncio.Queue()
        self._n_workers = workers if agent is not None else 0
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._busy_workers = 0
        self.draining = False
        self.served = 0

    async def start(self) -> str:
        """Bind and start the IO and worker tasks; return the bound endpoint."""
        try:
            sock = open_socket(self._ctx, zmq.ROUTER, bind=self.endpoint, ROUTER_MANDATORY=1)
        except zmq.ZMQError as exc:
            raise ProtocolError(f"cannot listen on {self.endpoint}: {exc}; choose another "
                                "--listen endpoint") from exc
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks = [asyncio.create_task(self._receive(sock), name="edge-endpoint-recv"),
                       asyncio.create_task(self._send(sock), name="edge-endpoint-send")]
        self._tasks += [asyncio.create_task(self._work(), name=f"edge-worker-{i}")
                        for i in range(self._n_workers)]
        log.info("edge endpoint listening on %s", self.endpoint)
        return self.endpoint

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Refuse new requests (BUSY), let queued and running ones finish, then close."""
        self.draining = True
        deadline = time.monotonic() + drain_seconds
        while (self._queue.qsize() or self._busy_workers or self._streams) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        while not self._out.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for task in [*self._streams, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._streams, *self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            identity, body = frames[0].bytes, frames[1:]
            msg = None
            try:
                msg = P.decode(body, self.limits)
                self._accept(identity, msg)
            except TetherError as exc:    # oversized/malformed: the header's id if readable
                rid = msg.request_id if msg is not None else P.peek_request_id(body)
                self._reply(identity, P.encode(P.Error.from_exception(rid, exc)))

    def _accept(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, P.Ping):
            self._reply(identity, P.encode(P.Pong(msg.request_id, msg.t)))
        elif isinstance(msg, P.Hello):
            edge_id = self.agent.edge_id if self.agent is not None else "tether-edge"
            self._reply(identity, P.encode(P.Ready(msg.request_id, edge_id, self._infos())))
        elif isinstance(msg, P.Generate):
            self._start_stream(identity, msg)
        elif isinstance(msg, P.ImageRequest):
            self._queue_image(identity, msg)
        else:
            raise ProtocolError(self._refusal(msg))

    def _refusal(self, msg: Any) -> str:
        takes = "HELLO, PING" + ", IMAGE" * (self.agent is not None) + \
            ", GENERATE" * (self.llm is not None)
        if msg.TYPE in _OLD:
            return (f"the edge endpoint takes {takes}; {msg.TYPE.name} is the cloud's message "
                    f"(older clients sent it here): send {_OLD[msg.TYPE]} (tether.edge."
                    "EdgeClient of this tether version)")
        return f"the edge endpoint takes {takes}, not {msg.TYPE.name}"

    def _infos(self) -> tuple[P.BundleInfo, ...]:
        infos = (self.agent.compute.bundle_info(),) if self.agent is not None else ()
        if self.llm is not None:
            infos += (P.BundleInfo(self.llm_model_id, self.llm.fingerprint, (self.llm.split,),
                                   (self.llm.config.codec,)),)
        return infos

    def _queue_image(self, identity: bytes, msg: P.ImageRequest) -> None:
        if self.agent is None:
            raise UnknownModelError("this edge serves no image model (started without a "
                                    "bundle); it answers LLM generation requests only")
        if self.draining:
            self._reply(identity, P.encode(P.Busy(msg.request_id, "draining")))
            return
        image = P.frame_array(msg.tensors[0], msg.payload[0])
        try:
            self._queue.put_nowait((identity, msg, image, time.perf_counter()))
        except asyncio.QueueFull:
            self._reply(identity, P.encode(P.Busy(msg.request_id, "queue_full",
                                                  self._queue.qsize())))

    def _start_stream(self, identity: bytes, msg: P.Generate) -> None:
        """One task per stream (at most ``max_streams``); its messages share the send queue."""
        if self.llm is None:
            raise ConfigError("this edge serves no LLM (start it with --llm-checkpoint)")
        if self.draining or len(self._streams) >= self.max_streams:
            reason = "draining" if self.draining else "queue_full"
            self._reply(identity, P.encode(P.Busy(msg.request_id, reason, len(self._streams))))
            return
        task = asyncio.create_task(self._stream(identity, msg), name=f"edge-llm-{msg.request_id}")
        self._streams[task] = identity
        task.add_done_callback(lambda t: self._streams.pop(t, None))

    async def _stream(self, identity: bytes, msg: P.Generate) -> None:
        """TokenChunk per token, then StreamEnd with the record (and the error, if any)."""
        counts, started = dict.fromkeys(P.TOKEN_SOURCES, 0), time.perf_counter()
        finish, error = "length", None
        try:
            async with contextlib.aclosing(
                    open_generation(self.llm, msg, self.llm_max_new_tokens)) as events:
                async for ev in events:
                    counts[ev.source] += 1
                    self._reply(identity, P.encode(
                        P.TokenChunk(msg.request_id, (ev.token,), ev.text, ev.source)))
            if sum(counts.values()) < min(msg.max_new_tokens, self.llm_max_new_tokens):
                finish = "stop"
        except TetherError as exc:
            error = P.Error.from_exception(msg.request_id, exc)
        except Exception as exc:   # noqa: BLE001 - never leave an application hanging
            log.exception("generation %d failed", msg.request_id)
            error = P.Error.from_exception(msg.request_id, exc)
        self._reply(identity, P.encode(P.StreamEnd(
            msg.request_id, **counts, seconds=time.perf_counter() - started,
            finish="error" if error else finish, code=error.code if error else "",
            message=error.message if error else "")))

    def _label(self, index: int) -> str | None:
        labels = self.agent.compute.manifest.preprocess.get("labels")
        if isinstance(labels, list) and 0 <= index < len(labels):
            return str(labels[index])
        return None

    def _reply(self, identity: bytes, frames: list[Any]) -> None:
        self._out.put_nowait([identity, *frames])

    async def _send(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await self._out.get()
            try:
                await sock.send_multipart(frames, copy=False)
            except zmq.ZMQError as exc:   # the application went away: stop its streams
                log.debug("reply dropped: %s", exc)
                for task, identity in list(self._streams.items()):
                    if identity == frames[0]:
                        task.cancel()

    async def _work(self) -> None:
        while True:
            identity, msg, image, received = await self._queue.get()
            self._busy_workers += 1
            try:
                result = await self.agent.infer(image, msg.deadline_s, received)
                frames = P.encode(image_reply(msg.request_id, result.logits, result.record,
                                              self._label(result.prediction)))
                self.served += 1
            except TetherError as exc:
                frames = P.encode(P.Error.from_exception(msg.request_id, exc))
            except Exception as exc:   # noqa: BLE001 - never leave an application hanging
                log.exception("request %d failed", msg.request_id)
                frames = P.encode(P.Error.from_exception(msg.request_id, exc))
            finally:
                self._busy_workers -= 1
            self._reply(identity, frames)
