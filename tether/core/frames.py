"""Tensor frames: how a tensor travels as one raw payload frame of a protocol message.

A tensor frame is the C-contiguous little-endian bytes of a numpy array or torch tensor,
described by a :class:`TensorDesc` (shape, dtype from the whitelist
:data:`tether.core.types.DTYPE_SIZES`) in the message header. :class:`Limits` bounds what
:func:`tether.core.protocol.decode` accepts. Imports numpy only; torch only when a torch
tensor is framed or wanted (the light edge client never needs it)::

    tensor_frame(t) -> (TensorDesc, memoryview)        numpy array or torch tensor, any layout
    frame_array(desc, buf) -> numpy.ndarray            zero-copy, read-only
    frame_tensor(desc, buf) -> torch.Tensor            a private writable copy
    result_for(request_id, tensor, ...) -> Result      a RESULT carrying one tensor
    as_view(frame) -> memoryview                       bytes, memoryview or zmq.Frame as bytes

:mod:`tether.core.protocol` re-exports all of these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from tether.core.errors import ProtocolError
from tether.core.types import DTYPE_SIZES, TensorSpec

if TYPE_CHECKING:
    from tether.core.protocol import Result

Buffer = Union[bytes, memoryview]


@dataclass(frozen=True)
class Limits:
    """What :func:`tether.core.protocol.decode` accepts; anything larger is refused before allocation."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_frames: int = 64
    max_rank: int = 8
    max_elements: int = 1 << 27

    def __post_init__(self) -> None:
        for f in fields(self):
            if int(getattr(self, f.name)) <= 0:
                raise ValueError(f"Limits.{f.name} must be positive")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TensorDesc(TensorSpec):
    """Shape and dtype of one raw tensor frame (C-contiguous, little-endian)."""

    def to_wire(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_wire(cls, d: Any, limits: Limits = DEFAULT_LIMITS, where: str = "tensor") -> "TensorDesc":
        if not isinstance(d, dict):
            raise ProtocolError(f"{where}: tensor descriptor must be a map")
        shape, dtype = d.get("shape"), d.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise ProtocolError(f"{where}: dtype {dtype!r:.40} not allowed; "
                                f"allowed: {sorted(DTYPE_SIZES)}")
        if not isinstance(shape, list) or len(shape) > limits.max_rank:
            raise ProtocolError(f"{where}: shape must be a list of at most {limits.max_rank} dims")
        if not all(type(n) is int and 0 <= n <= limits.max_elements for n in shape):
            raise ProtocolError(f"{where}: shape {shape!r} must hold non-negative ints")
        if math.prod(shape) > limits.max_elements:
            raise ProtocolError(f"{where}: {math.prod(shape)} elements exceed the limit "
                                f"{limits.max_elements}")
        desc = object.__new__(cls)          # validated above: what __post_init__ would check
        desc.__dict__.update(shape=tuple(shape), dtype=dtype)
        return desc


@dataclass(frozen=True)
class BundleInfo:
    """What a cloud serves for one bundle (sent in READY) or an edge wants (HELLO)."""

    model_id: str
    fingerprint: str
    splits: tuple[str, ...] = ()
    codecs: tuple[str, ...] = ()        # codec ids accepted; parametric ones (jpeg<q>) too
    input: TensorDesc | None = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model_id": self.model_id, "fingerprint": self.fingerprint,
                             "splits": list(self.splits), "codecs": list(self.codecs)}
        if self.input is not None:
            d["input"] = self.input.to_wire()
        return d

    @classmethod
    def from_wire(cls, d: Any, limits: Limits = DEFAULT_LIMITS) -> "BundleInfo":
        if not isinstance(d, dict):
            raise ProtocolError("bundle entry must be a map")
        mid, fp = d.get("model_id"), d.get("fingerprint")
        if not isinstance(mid, str) or not isinstance(fp, str):
            raise ProtocolError("bundle entry needs string model_id and fingerprint")
        splits = _str_tuple(d.get("splits", []), "bundle splits")
        codecs = _str_tuple(d.get("codecs", []), "bundle codecs")
        inp = d.get("input")
        desc = None if inp is None else TensorDesc.from_wire(inp, limits, "bundle input")
        return cls(mid, fp, splits, codecs, desc)


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ProtocolError(f"{where} must be a list of strings")
    return tuple(value)


def as_view(frame: Any) -> memoryview:
    """``frame`` (bytes, memoryview or a zmq.Frame received with copy=False) as flat bytes."""
    if isinstance(frame, (bytes, bytearray)):
        return memoryview(frame)
    if isinstance(frame, memoryview):
        return frame if frame.format == "B" and frame.ndim == 1 else frame.cast("B")
    buf = getattr(frame, "buffer", None)       # zmq.Frame received with copy=False
    if isinstance(buf, memoryview):
        return as_view(buf)
    raise ProtocolError(f"frame of type {type(frame).__name__} is not bytes-like")


def tensor_frame(t: Any) -> tuple[TensorDesc, memoryview]:
    """A numpy array or torch tensor as (descriptor, zero-copy byte view of its data).

    Non-contiguous inputs are made contiguous (one copy); the returned view keeps the data
    alive. bfloat16 torch tensors travel as their raw 16-bit patterns.
    """
    if isinstance(t, np.ndarray):
        arr = np.ascontiguousarray(t)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        dtype = arr.dtype.name
        if dtype not in DTYPE_SIZES:
            raise ProtocolError(f"dtype {dtype} cannot go on the wire; allowed: {sorted(DTYPE_SIZES)}")
        return TensorDesc(tuple(arr.shape), dtype), memoryview(arr.reshape(-1).view(np.uint8))
    import torch
    if not isinstance(t, torch.Tensor):
        raise ProtocolError(f"cannot send {type(t).__name__}: need a numpy array or torch tensor")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPE_SIZES:
        raise ProtocolError(f"dtype {dtype} cannot go on the wire; allowed: {sorted(DTYPE_SIZES)}")
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    desc, view = tensor_frame(raw.numpy())
    return TensorDesc(tuple(t.shape), dtype), view


def frame_array(desc: TensorDesc, buf: Buffer) -> np.ndarray:
    """Zero-copy, read-only numpy view of a validated tensor frame (bfloat16 as int16 bits)."""
    view = as_view(buf)
    if view.nbytes != desc.nbytes:
        raise ProtocolError(f"tensor {desc.shape} {desc.dtype} needs {desc.nbytes} bytes, "
                            f"frame has {view.nbytes}")
    np_dtype = "int16" if desc.dtype == "bfloat16" else desc.dtype
    return np.frombuffer(view, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(desc.shape)


def frame_tensor(desc: TensorDesc, buf: Buffer) -> Any:
    """A writable torch tensor holding a copy of a validated tensor frame."""
    import torch
    arr = np.array(frame_array(desc, buf), copy=True)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if desc.dtype == "bfloat16" else t


def result_for(request_id: int, tensor: Any, queue_s: float = 0.0, decode_s: float = 0.0,
               tail_s: float = 0.0, batch_size: int = 1) -> "Result":
    """RESULT message carrying one tensor (e.g. a row of logits)."""
    from tether.core.protocol import Result    # protocol imports this module first
    desc, view = tensor_frame(tensor)
    return Result(request_id, (desc,), (view,), queue_s, decode_s, tail_s, batch_size)
