"""Test helpers: a cloud server on a background event loop and a raw DEALER protocol client."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq
from prometheus_client import CollectorRegistry

from tether.cloud import CloudConfig, ServedBundle
from tether.cloud.server import CloudServer
from tether.codecs import make_codec
from tether.core import protocol as P
from tether.core.metrics import CloudMetrics
from tether.core.types import TensorSpec

SPLITS = ("layer1.2", "layer2.2")


@dataclass
class Model:
    """cifar_resnet20 (seeded random weights) with its heads, for checking results."""

    module: torch.nn.Module
    fingerprint: str
    heads: dict[str, torch.nn.Module]

    def bundle(self) -> ServedBundle:
        return ServedBundle.from_module("cifar_resnet20", self.module, TensorSpec((1, 3, 32, 32)),
                                        self.fingerprint, list(SPLITS))

    def crossing(self, split: str, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return x if split == "input" else self.heads[split](x)

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x)


def build_model() -> Model:
    from tether.partitioner import load_model, split_at
    lm = load_model("cifar_resnet20")
    module = lm.module.eval()
    example = torch.zeros(1, 3, 32, 32)
    heads = {s: split_at(module, example, s)[0].eval() for s in SPLITS}
    return Model(module, lm.fingerprint, heads)


class SlowTail(torch.nn.Module):
    """A tail that takes ``seconds`` per call whatever the batch: overload and drain tests."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        self.batches.append(x.shape[0])
        return x.sum(dim=1, keepdim=True)


def slow_bundle(seconds: float) -> tuple[ServedBundle, SlowTail]:
    tail = SlowTail(seconds)
    return ServedBundle("slow", "f" * 64, TensorSpec((1, 4)), {}, lambda s: tail), tail


class ServerThread:
    """A :class:`CloudServer` running on its own event loop in a daemon thread."""

    def __init__(self, config: CloudConfig, bundles: list[ServedBundle]) -> None:
        self.metrics = CloudMetrics(CollectorRegistry())
        self.server = CloudServer(config, bundles, self.metrics)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


class RawClient:
    """A bare DEALER speaking :mod:`tether.core.protocol` (what an edge does, minus policy)."""

    def __init__(self, endpoint: str, ctx: zmq.Context, curve: tuple[bytes, bytes, bytes] | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)
        self._ids = iter(range(1, 1 << 30))

    def close(self) -> None:
        self.sock.close(0)

    def send(self, msg: Any) -> None:
        self.sock.send_multipart(P.encode(msg), copy=False)

    def recv(self, timeout: float = 10.0) -> Any:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply within {timeout} s")
        return P.decode(self.sock.recv_multipart())

    def request(self, msg: Any, timeout: float = 10.0) -> Any:
        self.send(msg)
        return self.recv(timeout)

    def infer_msg(self, fingerprint: str, split: str, tensor: torch.Tensor, codec: str = "fp32",
                  deadline_s: float | None = None, request_id: int | None = None) -> P.Infer:
        enc = make_codec(codec).encode(tensor)
        rid = next(self._ids) if request_id is None else request_id
        return P.Infer(rid, fingerprint, split, codec, enc.header, deadline_s, tuple(enc.payload))


def answer_to_frames(endpoint: str, frames: list[bytes], timeout: float = 10.0) -> tuple[Any, Any]:
    """What a peer that sends ``frames`` as they are (malformed, hostile: no client would)
    gets back from ``endpoint``, and then its answer to a PING on the same connection
    (is the peer still served?)."""
    client = RawClient(endpoint, zmq.Context.instance())
    try:
        client.sock.send_multipart(frames)
        reply = client.recv(timeout)
        return reply, client.request(P.Ping(1, 1.0), timeout)
    finally:
        client.close()
