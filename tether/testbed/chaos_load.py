"""What the chaos ledger sends: the ledgered request stream's client, heavy batches straight
to the cloud, and seeded malformed frames (see :mod:`tether.testbed.chaos`)."""

from __future__ import annotations

import random
import time
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from tether.core import protocol as P
from tether.core.sockets import open_socket


class ChaosClient:
    """One DEALER per edge: sends images (ImageRequest), counts every reply per request id."""

    def __init__(self, edge: int, endpoint: str, ctx: zmq.asyncio.Context, ledger: Any,
                 images: np.ndarray, reference: np.ndarray, deadline_s: float) -> None:
        self.edge, self.ledger, self.images, self.reference = edge, ledger, images, reference
        self.deadline_s = deadline_s
        self.sock = open_socket(ctx, zmq.DEALER, connect=endpoint)
        self._ids = iter(range(1, 1 << 62))

    def send(self, index: int, kind: str) -> None:
        rid = next(self._ids)
        desc, view = P.tensor_frame(np.ascontiguousarray(self.images[index]))
        msg = P.ImageRequest(rid, (desc,), (view,), self.deadline_s)
        self.ledger.rows[(self.edge, rid)] = {
            "edge": self.edge, "request": rid, "kind": kind, "image": index,
            "sent": time.monotonic(), "replies": 0, "outcome": "unanswered"}
        self.sock.send_multipart(P.encode(msg), copy=False)

    async def receive(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            now = time.monotonic()
            try:
                msg = P.decode(frames)
            except Exception:  # noqa: BLE001 - counted as garbage, never as an answer
                continue
            row = self.ledger.rows.get((self.edge, msg.request_id))
            if row is None:
                continue
            row["replies"] += 1
            if row["replies"] == 1:
                row["seconds"] = now - row["sent"]
                row.update(self._outcome(msg, row["image"]))

    def _outcome(self, msg: Any, index: int) -> dict[str, Any]:
        if isinstance(msg, P.ImageReply):
            logits = np.asarray(P.frame_array(msg.tensors[0], msg.payload[0]),
                                dtype=np.float32).reshape(-1)
            record = msg.record
            ref = self.reference[index]
            return {"outcome": record.get("outcome", "?"),
                    "reason": record.get("fallback_reason", ""),
                    "prediction": int(np.argmax(logits)), "expected": int(np.argmax(ref)),
                    "max_abs_diff": float(np.max(np.abs(logits - ref))),
                    "matches": bool(np.allclose(logits, ref, rtol=1e-3, atol=1e-3))}
        if isinstance(msg, P.Busy):
            return {"outcome": "busy", "reason": msg.reason}
        if isinstance(msg, P.Error):
            return {"outcome": "error", "reason": f"{msg.code}: {msg.message[:200]}"}
        return {"outcome": "error", "reason": type(msg).__name__}


def fuzz_frames(rng: random.Random, count: int, image: np.ndarray) -> list[list[bytes]]:
    """Seeded malformed messages: flipped bytes, truncations, bad headers, lies about sizes."""
    desc, view = P.tensor_frame(np.ascontiguousarray(image))
    valid = [bytes(memoryview(f)) for f in P.encode(
        P.ImageRequest(7, (desc,), (view,), 1.0))]
    out = []
    for _ in range(count):
        frames = [bytearray(f) for f in valid]
        how = rng.randrange(6)
        i = rng.randrange(len(frames))
        if how == 0 and frames[i]:
            for _ in range(rng.randint(1, 8)):
                frames[i][rng.randrange(len(frames[i]))] = rng.randrange(256)
        elif how == 1:
            frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
        elif how == 2:
            frames[1] = bytearray(msgpack.packb({"v": rng.choice([1, True, "1", 2.0]),
                                                 "id": rng.choice([0, -1, 2**64 - 1, "x", 9]),
                                                 "sizes": [rng.randrange(1 << 40)]}))
        elif how == 3:
            frames = frames[:1]
        elif how == 4:
            frames.append(bytearray(rng.randbytes(rng.randrange(1, 4096))))
        else:
            frames = [bytearray(rng.randbytes(rng.randrange(0, 64))) for _ in range(rng.randint(1, 5))]
        out.append([bytes(f) for f in frames])
    return out


async def cloud_burst(endpoint: str, ctx: zmq.asyncio.Context, images: np.ndarray, n: int,
                       batch: int, fingerprint: str, timeout: float = 120.0) -> dict[str, int]:
    """``n`` full-offload INFERs of ``batch`` images at once, no deadline; replies by type."""
    import torch

    from tether.codecs import make_codec
    x = np.ascontiguousarray(images[np.arange(batch) % len(images)].transpose(0, 3, 1, 2),
                             dtype=np.float32) / 255.0
    encoded = make_codec("fp32").encode(torch.from_numpy(x))
    sock = open_socket(ctx, zmq.DEALER, connect=endpoint)
    got: dict[str, int] = {}
    try:
        for rid in range(1, n + 1):
            await sock.send_multipart(P.encode(P.Infer(rid, fingerprint, "input", "fp32",
                                                       dict(encoded.header), None,
                                                       tuple(encoded.payload))))
        end = time.monotonic() + timeout
        while sum(got.values()) < n and (left := end - time.monotonic()) > 0:
            if await sock.poll(int(left * 1000)):
                name = type(P.decode(await sock.recv_multipart())).__name__.lower()
                got[name] = got.get(name, 0) + 1
    finally:
        sock.close(linger=0)
    return got


async def send_fuzz(endpoint: str, frames: list[list[bytes]], ctx: zmq.asyncio.Context) -> int:
    """Send every message; return how many replies came back within a second."""
    sock = open_socket(ctx, zmq.DEALER, connect=endpoint)
    replies = 0
    try:
        for msg in frames:
            await sock.send_multipart(msg)
        end = time.monotonic() + 1.0
        while (left := end - time.monotonic()) > 0:
            if await sock.poll(int(left * 1000)):
                await sock.recv_multipart()
                replies += 1
    finally:
        sock.close(linger=0)
    return replies
