"""The edge's local endpoint for applications: a ZeroMQ ROUTER speaking tether's protocol.

Applications (or :class:`tether.edge.client.EdgeClient`) send one INFER per image::

    Infer(request_id, fingerprint="", split="input", codec="tensor",
          codec_header={"shape": [...], "dtype": "uint8" | "float32" | ...},
          deadline_s=<seconds or None>, payload=(<raw C-contiguous tensor bytes>,))

with a uint8 HWC image at the bundle's input size, or float NCHW in [0, 1]. The reply is
a RESULT carrying the logits ``[1, classes]`` (and the cloud's queue/decode/tail seconds);
its header also holds an ``edge`` map: the request's :class:`~tether.core.types.RequestRecord`
(action, outcome, fallback reason, per-stage seconds, bytes) and ``label``, the
class name when the bundle has labels. Bad input gets an ERROR,
a full queue or a draining daemon a BUSY, PING a PONG, and HELLO a READY
describing the bundle (model id, fingerprint, input shape). The IO task only parses and
queues; worker tasks run :meth:`EdgeAgent.infer` (whose compute runs in threads).

With an :class:`~tether.edge.llm.LLMEdge` (``tether edge --llm-checkpoint``) the same
endpoint also streams LLM generations: a PREFILL with codec ``"text"`` gets one RESULT per
token exactly as ``tether llm-edge`` answers it (:func:`~tether.edge.llm.stream_generation`),
and READY lists the LLM after the bundle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from tether.core import protocol as P
from tether.core.errors import InputShapeError, ProtocolError, TetherError, UnknownModelError
from tether.core.types import RequestRecord
from tether.edge.agent import EdgeAgent
from tether.edge.client import LOCAL_CODEC
from tether.edge.llm import LLMEdge, is_generate_request, stream_generation

log = logging.getLogger(__name__)

_Item = tuple[bytes, P.Infer, np.ndarray, float]   # identity, request, image, arrival


def request_tensor(msg: P.Infer, limits: P.Limits = P.DEFAULT_LIMITS) -> np.ndarray:
    """The validated image array of a local INFER (raises ProtocolError / InputShapeError)."""
    if msg.codec != LOCAL_CODEC:
        raise InputShapeError(f"the edge endpoint takes codec {LOCAL_CODEC!r} (a raw tensor), "
                              f"got {msg.codec!r}: use tether.edge.EdgeClient")
    if len(msg.payload) != 1:
        raise ProtocolError(f"expected one tensor frame, got {len(msg.payload)}")
    desc = P.TensorDesc.from_wire(msg.codec_header, limits, "image")
    return P.frame_array(desc, msg.payload[0])


def encode_reply(request_id: int, logits: np.ndarray, record: RequestRecord,
                 label: str | None = None) -> list[Any]:
    """RESULT frames with the logits and the record (plus ``label``) in the header's ``edge`` map."""
    result = P.result_for(request_id, np.ascontiguousarray(logits, dtype=np.float32),
                          record.cloud_queue_seconds, record.cloud_decode_seconds,
                          record.tail_seconds)
    frames = P.encode(result)
    header = msgpack.unpackb(frames[1], raw=False)
    header["edge"] = record.to_dict() | ({"label": label} if label else {})
    frames[1] = msgpack.packb(header, use_bin_type=True)
    return frames


class EdgeServer:
    """Serves an :class:`EdgeAgent` on a local ROUTER endpoint."""

    def __init__(self, agent: EdgeAgent | None, endpoint: str, queue_size: int = 256, workers: int = 32,
                 context: zmq.asyncio.Context | None = None,
                 limits: P.Limits = P.DEFAULT_LIMITS, llm: LLMEdge | None = None,
                 llm_max_new_tokens: int = 1024, llm_model_id: str = "llm") -> None:
        self.agent = agent
        self.llm, self.llm_max_new_tokens, self.llm_model_id = llm, llm_max_new_tokens, llm_model_id
        self._streams: set[asyncio.Task] = set()
        self.endpoint = endpoint
        self.limits = limits
        self._ctx = context or zmq.asyncio.Context.instance()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(queue_size)
        self._out: asyncio.Queue[list[Any]] = asyncio.Queue()
        self._n_workers = workers
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._busy_workers = 0
        self.draining = False
        self.served = 0

    async def start(self) -> str:
        """Bind and start the IO and worker tasks; return the bound endpoint."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
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
            return
        if isinstance(msg, P.Hello):
            infos = ((self.agent.compute.bundle_info(),) if self.agent else ()) + self._llm_info()
            edge_id = self.agent.edge_id if self.agent else "tether-edge"
            self._reply(identity, P.encode(P.Ready(msg.request_id, edge_id, infos)))
            return
        if self.llm is not None and is_generate_request(msg):
            self._start_stream(identity, msg)
            return
        if not isinstance(msg, P.Infer):
            extra = ", PREFILL (codec 'text')" if self.llm is not None else ""
            raise ProtocolError(f"the edge endpoint answers HELLO, INFER{extra} and PING, "
                                f"not {msg.TYPE.name}")
        if self.agent is None:
            raise UnknownModelError("this edge serves no image model (started without a "
                                    "bundle); it answers LLM generation requests only")
        if self.draining:
            self._reply(identity, P.encode(P.Busy(msg.request_id, "draining")))
            return
        image = request_tensor(msg, self.limits)
        try:
            self._queue.put_nowait((identity, msg, image, time.perf_counter()))
        except asyncio.QueueFull:
            self._reply(identity, P.encode(P.Busy(msg.request_id, "queue_full",
                                                  self._queue.qsize())))

    def _llm_info(self) -> tuple[P.BundleInfo, ...]:
        if self.llm is None:
            return ()
        return (P.BundleInfo(self.llm_model_id, self.llm.fingerprint, (self.llm.split,),
                             (self.llm.config.codec,)),)

    def _start_stream(self, identity: bytes, msg: P.Prefill) -> None:
        """Stream one generation; its RESULTs go through the same send queue as INFER's."""
        if self.draining:
            self._reply(identity, P.encode(P.Busy(msg.request_id, "draining")))
            return

        async def send(reply: Any) -> None:
            self._reply(identity, P.encode(reply))
        task = asyncio.create_task(
            stream_generation(self.llm, msg, send, self.llm_max_new_tokens),
            name=f"edge-llm-{msg.request_id}")
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

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
            except zmq.ZMQError as exc:   # the application went away
                log.debug("reply dropped: %s", exc)

    async def _work(self) -> None:
        while True:
            identity, msg, image, received = await self._queue.get()
            self._busy_workers += 1
            try:
                result = await self.agent.infer(image, msg.deadline_s, received)
                frames = encode_reply(msg.request_id, result.logits, result.record,
                                      self._label(result.prediction))
                self.served += 1
            except TetherError as exc:
                frames = P.encode(P.Error.from_exception(msg.request_id, exc))
            except Exception as exc:   # noqa: BLE001 - never leave an application hanging
                log.exception("request %d failed", msg.request_id)
                frames = P.encode(P.Error.from_exception(msg.request_id, exc))
            finally:
                self._busy_workers -= 1
            self._reply(identity, frames)
