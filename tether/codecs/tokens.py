"""Per-token int8/int4 (``int8-token``, ``int4-token``) and decoding LLM hidden states.

A tensor ``[..., D]`` is read as rows of ``D`` values: one row per token for the ``[T, D]``
hidden states an LLM split sends. Each row gets one fp16 absmax scale, values become
``round(x / scale)`` clamped to ``±(2**(bits-1) - 1)``; int4 packs two values per byte (low
nibble first, offset 8). Payload frames: the quantised values, then the per-row scales, so
a token costs ``D + 2`` bytes at 8 bits and ``ceil(D / 2) + 2`` at 4. This suits one-token
decode steps better than ``int8-channel``, whose per-channel scales ride in the header.
The header is every tensor codec's: ``codec``, ``shape``, ``dtype``. NaN is sent as 0 and
infinities as the fp16 extremes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from tether.core.errors import CodecError, PayloadError
from tether.codecs.base import (
    DTYPE_NAMES, FLOAT_DTYPES, TORCH_DTYPES, Codec, EncodedTensor, Frame, check_dtype,
    check_frames, check_header, check_shape, finite_for_fp16, require_tensor, tensor_frame,
    tensor_from_frame,
)

#: Smallest positive fp16 (subnormal): a row's scale never rounds to 0.
_MIN_SCALE = 2.0 ** -24


class TokenIntCodec(Codec):
    """Symmetric integer quantisation with one fp16 scale per row (token); 8 or 4 bits."""

    lossless = False

    def __init__(self, codec_id: str, bits: int) -> None:
        if bits not in (4, 8):
            raise CodecError(f"per-token codecs have 4 or 8 bits, got {bits}")
        self.codec_id, self.bits = codec_id, bits
        self.qmax = (1 << (bits - 1)) - 1

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        t = require_tensor(tensor)
        rows, dim = _rows(t.shape), t.shape[-1]
        h = finite_for_fp16(t).reshape(rows, dim)
        if h.numel():
            scale = (h.abs().amax(dim=1) / self.qmax).half().clamp(min=_MIN_SCALE)
        else:
            scale = torch.ones(rows, dtype=torch.float16)
        q = torch.round(h / scale.float().unsqueeze(1)).clamp(-self.qmax, self.qmax)
        q = q.to(torch.int8)
        if self.bits == 4:
            q = _pack4(q)
        header = {"codec": self.codec_id, "shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
        return EncodedTensor(header, [tensor_frame(q), tensor_frame(scale)])

    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        check_header(header, self.codec_id)
        shape = check_shape(header.get("shape"))
        dtype = check_dtype(header.get("dtype"), FLOAT_DTYPES)
        rows, dim = _rows(shape), shape[-1]
        values, scales = check_frames(payload, 2)
        q = tensor_from_frame(values, (rows, self.row_bytes(dim)), "int8")
        scale = tensor_from_frame(scales, (rows,), "float16").float()
        if not torch.isfinite(scale).all():
            raise PayloadError(f"{self.codec_id}: non-finite per-token scale in the payload")
        if self.bits == 4:
            q = _unpack4(q, rows, dim)
        out = q.float() * scale.unsqueeze(1)
        return out.reshape(shape).to(TORCH_DTYPES[dtype])

    def row_bytes(self, dim: int) -> int:
        """Bytes of one row's quantised values (its fp16 scale adds 2)."""
        return dim if self.bits == 8 else (dim + 1) // 2


def decode_hidden(codec: Codec, header: Any, payload: Sequence[Frame], dim: int,
                  tokens: int | None = None) -> torch.Tensor:
    """One message's LLM hidden states as float32 ``[tokens, dim]``.

    The header's shape is checked against the model's hidden size ``dim`` (and the
    message's token count) before ``codec`` allocates anything.
    """
    shape = check_shape(header.get("shape") if isinstance(header, dict) else None,
                        "hidden-state shape")
    if len(shape) != 2 or shape[0] == 0:
        raise PayloadError(f"hidden states must be [tokens, hidden size] with tokens >= 1, "
                           f"got shape {list(shape)}")
    if shape[1] != dim:
        raise PayloadError(f"hidden size {shape[1]} does not match the model's {dim}: edge and "
                           f"cloud run different models")
    if tokens is not None and shape[0] != tokens:
        raise PayloadError(f"payload holds {shape[0]} tokens, the message says {tokens}")
    return codec.decode(header, payload).float()


def wire_roundtrip(codec: Codec) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h -> decode(encode(h))``: what the cloud sees of ``[T, D]`` hidden states."""
    def through(hidden: torch.Tensor) -> torch.Tensor:
        enc = codec.encode(hidden)
        return decode_hidden(codec, enc.header, enc.payload, hidden.shape[-1], hidden.shape[0])
    return through


def _rows(shape: Sequence[int]) -> int:
    return math.prod(shape[:-1])


def _pack4(q: torch.Tensor) -> torch.Tensor:
    n, d = q.shape
    u = (q + 8).to(torch.uint8)
    if d % 2:
        u = torch.cat([u, torch.full((n, 1), 8, dtype=torch.uint8)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).view(torch.int8)


def _unpack4(packed: torch.Tensor, n: int, d: int) -> torch.Tensor:
    u = packed.view(torch.uint8).reshape(n, (d + 1) // 2)
    lo, hi = (u & 15).to(torch.int16) - 8, (u >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=2).reshape(n, 2 * u.shape[1])[:, :d]
