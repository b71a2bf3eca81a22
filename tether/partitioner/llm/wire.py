"""Per-token hidden-state codecs for the LLM split (what crosses the cut, one row per token).

Ids (one literal mapping, :data:`HIDDEN_CODECS`): ``fp32``, ``fp16``, ``int8`` (symmetric,
one fp16 absmax scale per token), ``int4`` (same, two values per byte), each optionally
followed by ``+zlib``. tether.codecs' generic ``int8`` scales per channel (dim 1) with the
scales in the msgpack header; per-token scales in a binary frame suit one-row-per-token
decode steps better (``D + 2`` bytes per token). The header is tiny: ``{"n": tokens,
"d": dim}``; payload frames are the quantised values then the scales. ``decode`` validates
sizes against the header and the expected hidden size before allocating.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import torch

from tether.core.errors import PayloadError, UnknownCodecError

Frame = bytes | bytearray | memoryview
FP16_MAX = 65504.0
MAX_TOKENS = 1 << 16


def _view(frame: Any) -> memoryview:
    try:
        v = memoryview(frame)
    except TypeError as exc:
        raise PayloadError(f"payload frame of type {type(frame).__name__} is not bytes-like") from exc
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


class HiddenCodec:
    """Encode ``[T, D]`` float hidden states per token; decode to float32 ``[T, D]``."""

    def __init__(self, codec_id: str, bits: int, compress: bool) -> None:
        self.codec_id, self.bits, self.compress = codec_id, bits, compress

    def encode(self, hidden: torch.Tensor) -> tuple[dict[str, Any], list[bytes]]:
        h = hidden.detach().float().reshape(-1, hidden.shape[-1])
        frames = self._quantise(torch.nan_to_num(h, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX))
        header: dict[str, Any] = {"n": int(h.shape[0]), "d": int(h.shape[1])}
        if self.compress:
            header["raw"] = [len(f) for f in frames]
            frames = [zlib.compress(f, 6) for f in frames]
        return header, frames

    def _quantise(self, h: torch.Tensor) -> list[bytes]:
        if self.bits == 32:
            return [h.numpy().astype("<f4").tobytes()]
        if self.bits == 16:
            return [h.clamp(-FP16_MAX, FP16_MAX).half().numpy().astype("<f2").tobytes()]
        qmax = (1 << (self.bits - 1)) - 1
        scale = (h.abs().amax(dim=1) / qmax).clamp(min=1e-8, max=FP16_MAX).half()
        q = torch.round(h / scale.float().unsqueeze(1)).clamp(-qmax, qmax).to(torch.int8)
        if self.bits == 4:
            q = _pack4(q)
        return [q.numpy().tobytes(), scale.numpy().astype("<f2").tobytes()]

    def decode(self, header: dict[str, Any], payload: Sequence[Frame],
               dim: int | None = None) -> torch.Tensor:
        n, d = _dims(header, dim)
        frames = [_view(f) for f in payload]
        if self.compress:
            frames = _inflate(header, frames)
        sizes = self.frame_sizes(n, d)
        if [f.nbytes for f in frames] != sizes:
            raise PayloadError(f"{self.codec_id}: payload frames of {[f.nbytes for f in frames]} "
                               f"bytes, expected {sizes} for {n} tokens x {d}")
        if self.bits == 32:
            return torch.from_numpy(np.frombuffer(frames[0], "<f4").reshape(n, d).copy())
        if self.bits == 16:
            return torch.from_numpy(np.frombuffer(frames[0], "<f2").reshape(n, d).astype(np.float32))
        q = torch.from_numpy(np.frombuffer(frames[0], np.int8).copy())
        q = _unpack4(q, n, d) if self.bits == 4 else q.reshape(n, d)
        scale = torch.from_numpy(np.frombuffer(frames[1], "<f2").astype(np.float32))
        if not torch.isfinite(scale).all():
            raise PayloadError(f"{self.codec_id}: non-finite per-token scale in the payload")
        return q.float() * scale.unsqueeze(1)

    def frame_sizes(self, n: int, d: int) -> list[int]:
        if self.bits >= 16:
            return [n * d * self.bits // 8]
        return [n * ((d + 1) // 2 if self.bits == 4 else d), 2 * n]

    def bytes_per_token(self, d: int) -> int:
        """Payload bytes per token before any zlib stage."""
        return sum(self.frame_sizes(1, d))


def _dims(header: Any, dim: int | None) -> tuple[int, int]:
    if not isinstance(header, dict):
        raise PayloadError("hidden-state codec header must be a map")
    n, d = header.get("n"), header.get("d")
    if type(n) is not int or type(d) is not int or not (0 < n <= MAX_TOKENS and 0 < d <= 1 << 16):
        raise PayloadError(f"hidden-state header needs 1..{MAX_TOKENS} tokens and a sane dim, "
                           f"got n={n!r} d={d!r}")
    if dim is not None and d != dim:
        raise PayloadError(f"hidden size {d} does not match the model's {dim}: edge and cloud "
                           f"run different models")
    return n, d


def _inflate(header: dict[str, Any], frames: list[memoryview]) -> list[memoryview]:
    raw = header.get("raw")
    if not isinstance(raw, list) or len(raw) != len(frames) or \
            not all(type(r) is int and 0 <= r <= 1 << 28 for r in raw):
        raise PayloadError("zlib stage needs 'raw' frame sizes in the header")
    out = []
    for frame, size in zip(frames, raw):
        try:
            d = zlib.decompressobj()
            data = d.decompress(frame, size + 1)
        except zlib.error as exc:
            raise PayloadError(f"corrupt zlib payload: {exc}") from exc
        if len(data) != size:
            raise PayloadError(f"zlib payload inflates to {len(data)} bytes, header says {size}")
        out.append(memoryview(data))
    return out


def _pack4(q: torch.Tensor) -> torch.Tensor:
    n, d = q.shape
    u = (q + 8).to(torch.uint8)
    if d % 2:
        u = torch.cat([u, torch.full((n, 1), 8, dtype=torch.uint8)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).view(torch.int8)


def _unpack4(packed: torch.Tensor, n: int, d: int) -> torch.Tensor:
    u = packed.view(torch.uint8).reshape(n, -1)
    lo, hi = (u & 15).to(torch.int16) - 8, (u >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=2).reshape(n, -1)[:, :d]


#: One literal mapping: hidden-state codec id -> (bits, zlib stage).
HIDDEN_CODECS: dict[str, tuple[int, bool]] = {
    "fp32": (32, False), "fp16": (16, False), "int8": (8, False), "int4": (4, False),
    "fp16+zlib": (16, True), "int8+zlib": (8, True), "int4+zlib": (4, True),
}


def make_hidden_codec(codec_id: str) -> HiddenCodec:
    if codec_id not in HIDDEN_CODECS:
        raise UnknownCodecError(f"unknown hidden-state codec {codec_id!r}; LLM split codecs: "
                                f"{sorted(HIDDEN_CODECS)}")
    bits, compress = HIDDEN_CODECS[codec_id]
    return HiddenCodec(codec_id, bits, compress)
