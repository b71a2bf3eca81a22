"""Baseline tensor codecs: fp32 passthrough, fp16, per-channel int8, zlib and zstd stages.

Headers carry ``codec``, ``shape`` and ``dtype`` (the dtype ``decode`` restores), plus the
codec's own fields (int8-channel: per-channel ``scale`` and ``zero_point``; zlib/zstd: raw
frame sizes). Per-token int8/int4 (LLM hidden states) live in :mod:`tether.codecs.tokens`.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import Any, Sequence

import numpy as np
import torch

from tether.core.errors import CodecError, PayloadError
from tether.codecs.base import (
    DTYPE_NAMES, FLOAT_DTYPES, TORCH_DTYPES, Codec, EncodedTensor, Frame, check_dtype,
    check_floats, check_frames, check_header, check_shape, finite_for_fp16, frame_len,
    require_tensor, tensor_frame, tensor_from_frame,
)


class _CastCodec(Codec):
    """Send a floating tensor as ``wire_dtype``; decode restores the original dtype."""

    lossless = False
    wire_dtype = "float32"

    def __init__(self, codec_id: str) -> None:
        self.codec_id = codec_id

    def _to_wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(TORCH_DTYPES[self.wire_dtype])

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        t = require_tensor(tensor)
        header = {"codec": self.codec_id, "shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
        return EncodedTensor(header, [tensor_frame(self._to_wire(t))])

    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        check_header(header, self.codec_id)
        shape = check_shape(header.get("shape"))
        dtype = check_dtype(header.get("dtype"), FLOAT_DTYPES)
        (frame,) = check_frames(payload, 1)
        wire = tensor_from_frame(frame, shape, self.wire_dtype)
        return wire.to(TORCH_DTYPES[dtype])


class Fp32Codec(_CastCodec):
    """Passthrough: float32 bytes (lossless for float32 input)."""

    lossless = True
    wire_dtype = "float32"


class Fp16Codec(_CastCodec):
    """Half precision; values beyond the fp16 range (infinities too) are clamped to it and
    NaN is sent as 0, so one bad value never poisons the peer's computation."""

    wire_dtype = "float16"

    def _to_wire(self, t: torch.Tensor) -> torch.Tensor:
        return finite_for_fp16(t).to(torch.float16)


class Int8ChannelCodec(Codec):
    """``int8-channel``: per-channel affine int8 (channel = dim 1; per-tensor for 1-D input).

    ``q = clamp(round(x / scale) + zero_point, -128, 127)``, ``x' = (q - zero_point) * scale``;
    ``scale`` (float32 little-endian bytes) and ``zero_point`` (int8 bytes) travel in the
    header, one per channel (5 header bytes per channel). The range always includes 0, so
    zero (ReLU output) is exact. NaN encodes as 0, infinities as the channel's extremes.
    """

    lossless = False

    def __init__(self, codec_id: str = "int8-channel") -> None:
        self.codec_id = codec_id

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        t = require_tensor(tensor)
        x = t.double()
        channels = x.shape[1] if x.dim() >= 2 else 1
        per_channel = x.transpose(0, 1).reshape(channels, -1) if x.dim() >= 2 else x.reshape(1, -1)
        scale, zero_point = _affine_params(per_channel)
        bshape = [1, channels] + [1] * (x.dim() - 2) if x.dim() >= 2 else [1]
        s = scale.reshape(bshape)
        zp = zero_point.reshape(bshape)
        x = torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf)
        q = torch.clamp(torch.round(x / s) + zp, -128, 127).to(torch.int8)
        header = {"codec": self.codec_id, "shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype],
                  "scale": scale.float().numpy().astype("<f4").tobytes(),
                  "zero_point": zero_point.to(torch.int8).numpy().tobytes()}
        return EncodedTensor(header, [tensor_frame(q)])

    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        check_header(header, self.codec_id)
        shape = check_shape(header.get("shape"))
        dtype = check_dtype(header.get("dtype"), FLOAT_DTYPES)
        channels = shape[1] if len(shape) >= 2 else 1
        raw_scale = _floats_from(header.get("scale"), "<f4", channels, "scale")
        raw_zp = _floats_from(header.get("zero_point"), "i1", channels, "zero_point")
        scale = check_floats(raw_scale, channels, "scale", positive=True)
        zps = check_floats(raw_zp, channels, "zero_point")
        (frame,) = check_frames(payload, 1)
        q = tensor_from_frame(frame, shape, "int8").float()
        bshape = [1, channels] + [1] * (len(shape) - 2) if len(shape) >= 2 else [1]
        s = torch.tensor(scale, dtype=torch.float32).reshape(bshape)
        zp = torch.tensor(zps, dtype=torch.float32).reshape(bshape)
        return ((q - zp) * s).to(TORCH_DTYPES[dtype])


def _floats_from(value: Any, dtype: str, count: int, what: str) -> Any:
    """Bytes of ``count`` numbers of ``dtype`` -> list (lists pass through for checking)."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != count * np.dtype(dtype).itemsize:
            raise PayloadError(f"header {what} holds {len(value)} bytes, expected "
                               f"{count * np.dtype(dtype).itemsize} for {count} channels")
        return np.frombuffer(value, dtype=dtype).tolist()
    return value


def _affine_params(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float64 scale (as float32-representable) and integer zero point."""
    finite = torch.isfinite(rows)
    big = torch.finfo(torch.float64).max
    lo = torch.where(finite, rows, torch.full_like(rows, big)).amin(dim=1) if rows.numel() else \
        torch.zeros(rows.shape[0], dtype=torch.float64)
    hi = torch.where(finite, rows, torch.full_like(rows, -big)).amax(dim=1) if rows.numel() else \
        torch.zeros(rows.shape[0], dtype=torch.float64)
    empty = lo > hi                       # channel without finite values
    lo = torch.where(empty, torch.zeros_like(lo), torch.minimum(lo, torch.zeros_like(lo)))
    hi = torch.where(empty, torch.zeros_like(hi), torch.maximum(hi, torch.zeros_like(hi)))
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.float().clamp(min=1e-30).double()          # exactly what the header carries
    zero_point = torch.round(-128.0 - lo / scale).clamp(-128, 127)
    return scale, zero_point.to(torch.int64)


class LosslessStage(Codec):
    """A lossless stage after ``inner``: each inner frame is packed separately, its raw size
    in the header so that unpacking is bounded (no decompression bombs)."""

    suffix = ""

    def __init__(self, inner: Codec, level: int) -> None:
        self.inner = inner
        self.level = level
        self.codec_id = f"{inner.codec_id}+{self.suffix}"
        self.lossless = inner.lossless

    def _pack(self, frame: Frame) -> bytes:
        raise NotImplementedError

    def _unpack(self, frame: Frame, size: Any, limit: int) -> bytes:
        raise NotImplementedError

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        enc = self.inner.encode(tensor)
        sizes = [frame_len(f) for f in enc.payload]
        frames = [self._pack(f) for f in enc.payload]
        header = dict(enc.header, codec=self.codec_id, raw_sizes=sizes)
        return EncodedTensor(header, frames)

    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        check_header(header, self.codec_id)
        sizes = header.get("raw_sizes")
        if not isinstance(sizes, list):
            raise PayloadError("header raw_sizes must be a list of frame sizes")
        frames = check_frames(payload, len(sizes))
        limit = math.prod(check_shape(header.get("shape"))) * 8 + 1024
        raw = [self._unpack(f, n, limit) for f, n in zip(frames, sizes)]
        inner_header = {k: v for k, v in header.items() if k != "raw_sizes"}
        inner_header["codec"] = self.inner.codec_id
        return self.inner.decode(inner_header, raw)


def _check_raw_size(what: str, size: Any, limit: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= limit:
        raise PayloadError(f"{what} raw size {size!r} is invalid (limit {limit} bytes)")


class ZlibCodec(LosslessStage):
    """A lossless zlib stage after ``inner``: each inner frame is deflated separately."""

    suffix = "zlib"

    def __init__(self, inner: Codec, level: int = 6) -> None:
        if not 0 <= level <= 9:
            raise CodecError(f"zlib level must be 0..9, got {level}")
        super().__init__(inner, level)

    def _pack(self, frame: Frame) -> bytes:
        return zlib.compress(frame, self.level)

    def _unpack(self, frame: Frame, size: Any, limit: int) -> bytes:
        """Inflate one frame to exactly ``size`` bytes, never more than ``limit``."""
        _check_raw_size("zlib", size, limit)
        d = zlib.decompressobj()
        try:
            out = d.decompress(bytes(frame), size + 1)
        except zlib.error as exc:
            raise PayloadError(f"corrupt zlib frame: {exc}") from exc
        if len(out) != size or not d.eof or d.unused_data:
            raise PayloadError(f"zlib frame inflates to {len(out)}+ bytes, header says {size} "
                               f"(truncated or wrong length)")
        return out


class ZstdCodec(LosslessStage):
    """A lossless Zstandard stage after ``inner`` (the ``zstandard`` package), frame by frame."""

    suffix = "zstd"

    def __init__(self, inner: Codec, level: int = 10) -> None:
        import zstandard
        if not 1 <= level <= 22:
            raise CodecError(f"zstd level must be 1..22, got {level}")
        super().__init__(inner, level)
        self._zstd = zstandard
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=False)

    def _pack(self, frame: Frame) -> bytes:
        return self._compressor.compress(bytes(frame))

    def _unpack(self, frame: Frame, size: Any, limit: int) -> bytes:
        """Decompress one frame to exactly ``size`` bytes, never more than ``limit``."""
        _check_raw_size("zstd", size, limit)
        reader = self._zstd.ZstdDecompressor().stream_reader(io.BytesIO(bytes(frame)))
        try:
            out, extra = reader.read(size + 1), reader.read(1) if size else b""
        except self._zstd.ZstdError as exc:
            raise PayloadError(f"corrupt zstd frame: {exc}") from exc
        if len(out) != size or extra:
            raise PayloadError(f"zstd frame decompresses to {len(out)}+ bytes, header says "
                               f"{size} (truncated or wrong length)")
        return out
