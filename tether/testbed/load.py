"""Open-loop load: seeded arrival times, test images, and an async client of edge daemons.

The same scenario seed gives every policy the same arrival times and the same images in
the same order. Requests are sent on schedule whether or not earlier ones were answered
(open loop), through the edge's local endpoint (the protocol of :mod:`tether.edge.server`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq
import zmq.asyncio

from tether.core import protocol as P
from tether.core.sockets import open_socket
from tether.core.errors import ConfigError, ProtocolError

CIFAR_LOSSLESS = "cifar10/cifar10_test_first1017_lossless.npz"


def arrival_times(kind: str, rate_hz: float, duration_s: float, seed: int) -> np.ndarray:
    """Request times in ``[0, duration_s)``: Poisson (exponential gaps) or periodic."""
    if kind == "periodic":
        return np.arange(0.0, duration_s, 1.0 / rate_hz)
    if kind != "poisson":
        raise ConfigError(f"unknown arrival process {kind!r}: use 'poisson' or 'periodic'")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_hz, size=int(rate_hz * duration_s * 2 + 20))
    times = np.cumsum(gaps) - gaps[0]
    return times[times < duration_s]


@dataclass(frozen=True)
class ImageSet:
    """Images the load generator sends (uint8 NHWC) and their labels (-1: unknown)."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def pick(self, count: int, seed: int) -> np.ndarray:
        """Indices of ``count`` images, in a seeded order that cycles through all of them."""
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(len(self.images))
                                for _ in range(count // len(self.images) + 1)])
        return order[:count]


def load_images(kind: str, shape: tuple[int, ...], seed: int, assets: Path | None) -> ImageSet:
    """``random`` uint8 images of the bundle's input size, or the CIFAR-10 lossless test set."""
    _, channels, height, width = shape
    if kind == "cifar10":
        if assets is None:
            raise ConfigError("images = 'cifar10' needs the shared assets: pass --assets DIR")
        path = Path(assets) / CIFAR_LOSSLESS
        if not path.is_file():
            raise ConfigError(f"CIFAR-10 images not found at {path}; check --assets")
        data = np.load(path)
        x, y = data["x"], data["y"].astype(np.int64)
        if x.shape[1:] != (height, width, channels):
            raise ConfigError(f"CIFAR-10 images are {x.shape[1:]}, the bundle takes "
                              f"{(height, width, channels)}: use images = 'random'")
        return ImageSet(x, y, "cifar10-lossless-0..1016")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(64, height, width, channels), dtype=np.uint8)
    return ImageSet(x, np.full(len(x), -1, dtype=np.int64), "random")


class EdgeLoad:
    """Sends scheduled requests to one edge daemon and collects its answers."""

    def __init__(self, endpoint: str, edge: int, deadline_s: float,
                 context: zmq.asyncio.Context) -> None:
        self.endpoint, self.edge, self.deadline_s = endpoint, edge, deadline_s
        self._sock = open_socket(context, zmq.DEALER, connect=endpoint)
        self._pending: dict[int, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []

    async def run(self, times: np.ndarray, picks: np.ndarray, images: ImageSet, t_start: float,
                  grace_s: float, on_row: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Send request ``i`` at ``t_start + times[i]``; wait ``grace_s`` for late answers."""
        receiver = asyncio.ensure_future(self._receive(on_row))
        try:
            for i, (t, idx) in enumerate(zip(times, picks)):
                delay = t_start + float(t) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._send(i + 1, int(idx), images)
            end = time.monotonic() + grace_s
            while self._pending and time.monotonic() < end:
                await asyncio.sleep(0.02)
        finally:
            receiver.cancel()
            self._sock.close(linger=0)
        for row in self._pending.values():
            row.update(answered=False, outcome="unanswered", error="no answer within grace")
            self.rows.append(row)
        self._pending.clear()

    def _send(self, rid: int, idx: int, images: ImageSet) -> None:
        desc, view = P.tensor_frame(np.ascontiguousarray(images.images[idx]))
        msg = P.ImageRequest(rid, (desc,), (view,), self.deadline_s)
        self._pending[rid] = {"edge": self.edge, "request": rid, "image": idx,
                              "label": int(images.labels[idx]), "sent_wall": time.time(),
                              "sent": time.monotonic()}
        self._sock.send_multipart(P.encode(msg), copy=False)

    async def _receive(self, on_row: Callable[[dict[str, Any]], None] | None) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            now = time.monotonic()
            try:
                msg = P.decode(frames)
            except ProtocolError:
                continue
            row = self._pending.pop(msg.request_id, None)
            if row is None:
                continue
            row["client_seconds"] = now - row["sent"]
            row.update(_answer_fields(msg))
            self.rows.append(row)
            if on_row is not None:
                on_row(row)


def _answer_fields(msg: Any) -> dict[str, Any]:
    """The record, prediction and outcome of one reply from the edge."""
    if isinstance(msg, P.ImageReply):
        logits = np.asarray(P.frame_array(msg.tensors[0], msg.payload[0])).reshape(-1)
        record = dict(msg.record)
        return {"answered": True, "prediction": int(np.argmax(logits)), "record": record,
                "outcome": record.get("outcome", "cloud"), "error": ""}
    if isinstance(msg, P.Busy):
        return {"answered": False, "outcome": "busy", "error": msg.reason}
    if isinstance(msg, P.Error):
        return {"answered": False, "outcome": "error", "error": f"{msg.code}: {msg.message}"}
    return {"answered": False, "outcome": "error", "error": type(msg).__name__}
