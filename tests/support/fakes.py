"""Test doubles for the edge tests: a scriptable cloud speaking the real protocol over ZeroMQ."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import numpy as np
import uvloop
import zmq
import zmq.asyncio

from tether.core import protocol as P


def run(coro: Any, timeout: float = 30.0) -> Any:
    """Run ``coro`` on a fresh uvloop event loop with an overall timeout."""
    return uvloop.run(asyncio.wait_for(coro, timeout))


def fingerprint_bundle(fp: str = "f" * 64, splits: tuple[str, ...] = ("s1",)) -> P.BundleInfo:
    return P.BundleInfo("toy", fp, splits, ("fp32",))


class FakeCloud:
    """A ROUTER that answers HELLO with READY for ``bundles`` and INFER via ``mode``.

    Modes: ``echo`` (RESULT with the payload's float32 values + 1 as logits), ``busy``,
    ``error``, ``silent`` (never answers INFER), ``garbage`` (an undecodable reply), ``mute``
    (answers HELLO only: a half-open link that only heartbeats can detect).
    """

    def __init__(self, bundles: tuple[P.BundleInfo, ...], mode: str = "echo",
                 endpoint: str = "tcp://127.0.0.1:0") -> None:
        self.bundles = bundles
        self.mode = mode
        self.endpoint = endpoint
        self.infers: list[P.Infer] = []
        self.hellos: list[P.Hello] = []
        self.pings = 0
        self.on_infer: Callable[[P.Infer], None] | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._task = asyncio.create_task(self._serve(sock))
        return self.endpoint

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
        self._task = self._sock = None

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            identity, *frames = await sock.recv_multipart()
            msg = P.decode(frames)
            reply = self._answer(msg)
            if reply is not None:
                await sock.send_multipart([identity, *reply])

    def _answer(self, msg: Any) -> list[Any] | None:
        if isinstance(msg, P.Hello):
            self.hellos.append(msg)
            return P.encode(P.Ready(0, "fake-cloud", self.bundles))
        if isinstance(msg, P.Ping):
            self.pings += 1
            return None if self.mode == "mute" else P.encode(P.Pong(msg.request_id, msg.t, 0.004))
        self.infers.append(msg)
        if self.on_infer is not None:
            self.on_infer(msg)
        rid = msg.request_id
        if self.mode == "busy":
            return P.encode(P.Busy(rid, "queue_full", 7))
        if self.mode == "error":
            return P.encode(P.Error(rid, "unknown_split", "no split s9"))
        if self.mode == "silent":
            return None
        if self.mode == "garbage":
            return [b"\x04", b"\xc1"]
        values = np.frombuffer(bytes(msg.payload[0]), dtype=np.float32) + 1
        return P.encode(P.result_for(rid, values.reshape(1, -1), 0.001, 0.0005, 0.002, 2))
