"""The codec contract: :class:`EncodedTensor` and :class:`Codec`, plus header validation.

Every codec turns a tensor into an :class:`EncodedTensor` — a small ``header`` (a dict of
msgpack-able scalars and lists) and ``payload`` frames (``bytes``/``memoryview``) that go on
the wire as they are — and back. ``decode`` treats header and payload as untrusted: it
checks the codec id, shapes, dtypes and frame lengths before allocating anything and
raises :class:`~tether.core.errors.PayloadError` with a message that names the problem.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import msgpack
import torch

from tether.core.errors import CodecError, PayloadError, WeightsError
from tether.core.types import DTYPE_SIZES

#: Largest tensor (in elements) a decoder agrees to allocate; protects against hostile headers.
MAX_ELEMENTS = 1 << 27
#: Most dimensions a decoded tensor may have.
MAX_DIMS = 8
#: Largest finite float16; codecs clamp to it rather than send infinities.
FP16_MAX = 65504.0
#: Floating dtypes a lossy codec accepts and restores on decode.
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

Frame = bytes | bytearray | memoryview

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class EncodedTensor:
    """What a codec sends: a small header and the payload frames, as they go on the wire."""

    header: dict[str, Any]
    payload: list[Frame] = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        """Bytes of all payload frames (what the socket carries besides the header)."""
        return sum(memoryview(f).nbytes for f in self.payload)

    @property
    def header_bytes(self) -> int:
        """Length of the msgpack-encoded header."""
        return len(msgpack.packb(self.header, use_bin_type=True))


class Codec(ABC):
    """One codec instance, bound to its id (and split point for learned codecs).

    ``encode`` runs on the edge, ``decode`` on the cloud. ``lossless`` tells whether
    ``decode(encode(x))`` equals ``x`` bit for bit.
    """

    codec_id: str = ""
    lossless: bool = False

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        """Compress ``tensor`` into a header and payload frames."""

    @abstractmethod
    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        """Rebuild the tensor; raise :class:`PayloadError` on anything malformed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.codec_id!r})"


def frame_len(frame: Any) -> int:
    """Length in bytes of one payload frame; PayloadError if it is not bytes-like."""
    try:
        return memoryview(frame).nbytes
    except TypeError as exc:
        raise PayloadError(f"payload frame is {type(frame).__name__}, expected bytes") from exc


def check_header(header: Any, codec_id: str) -> dict[str, Any]:
    """Check the header is a dict made for ``codec_id``."""
    if not isinstance(header, dict):
        raise PayloadError(f"codec header must be a dict, got {type(header).__name__}")
    got = header.get("codec")
    if got != codec_id:
        raise PayloadError(f"payload was encoded with codec {got!r} but is being decoded "
                           f"with {codec_id!r}: use the codec named in the header")
    return header


def check_shape(value: Any, what: str = "shape",
                max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    """Validate an untrusted shape list: non-negative ints, few dims, bounded size."""
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_DIMS:
        raise PayloadError(f"header {what} must be a list of 1..{MAX_DIMS} ints, got {value!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise PayloadError(f"header {what} must hold non-negative ints, got {value!r}")
    shape = tuple(value)
    if math.prod(shape) > max_elements:
        raise PayloadError(f"header {what} {shape} exceeds the limit of {max_elements} elements")
    return shape


def check_dtype(value: Any, allowed: Sequence[str] | None = None) -> str:
    """Validate an untrusted dtype name."""
    names = list(allowed) if allowed is not None else list(DTYPE_SIZES)
    if value not in names:
        raise PayloadError(f"header dtype {value!r} not allowed; expected one of {names}")
    return value


def check_frames(payload: Any, count: int) -> list[Frame]:
    """Require exactly ``count`` bytes-like payload frames."""
    if not isinstance(payload, (list, tuple)):
        raise PayloadError(f"payload must be a list of frames, got {type(payload).__name__}")
    if len(payload) != count:
        raise PayloadError(f"expected {count} payload frame(s), got {len(payload)}")
    for frame in payload:
        frame_len(frame)
    return list(payload)


def check_floats(value: Any, count: int, what: str, positive: bool = False) -> list[float]:
    """Validate an untrusted list of ``count`` finite numbers."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise PayloadError(f"header {what} must be a list of {count} numbers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PayloadError(f"header {what} holds a non-finite or non-numeric value {v!r}")
        if positive and v <= 0:
            raise PayloadError(f"header {what} must be positive, got {v!r}")
        out.append(float(v))
    return out


def finite_for_fp16(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 with NaN -> 0 and values clamped to the fp16 range (no infinities)."""
    return torch.nan_to_num(t.float(), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX) \
        .clamp(-FP16_MAX, FP16_MAX)


def tensor_from_frame(frame: Frame, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """Copy one frame into a new tensor after checking its exact length."""
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    got = frame_len(frame)
    if got != expected:
        raise PayloadError(f"payload frame has {got} bytes, expected {expected} for a "
                           f"{dtype} tensor of shape {list(shape)} (truncated or wrong length)")
    if expected == 0:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    flat = torch.frombuffer(bytearray(frame), dtype=TORCH_DTYPES[dtype])
    return flat.reshape(shape)


def tensor_frame(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes."""
    t = tensor.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype == torch.bfloat16:
        return memoryview(t.view(torch.int16).numpy()).cast("B")
    return memoryview(t.numpy()).cast("B")


def require_tensor(tensor: Any, floating: bool = True) -> torch.Tensor:
    """Input check for ``encode``: a CPU-movable tensor, floating if required."""
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"codec input must be a torch.Tensor, got {type(tensor).__name__}")
    if floating and not tensor.is_floating_point():
        raise CodecError(f"codec input must be floating point, got {tensor.dtype}; "
                         f"use an input codec (jpeg/webp/png) for uint8 images")
    if tensor.dim() == 0 or tensor.dim() > MAX_DIMS:
        raise CodecError(f"codec input must have 1..{MAX_DIMS} dims, got {tensor.dim()}")
    return tensor.detach().cpu()


def onnx_session(path: str | Path, threads: int, what: str) -> Any:
    """An ONNX Runtime CPU session; a file it cannot load is a WeightsError naming ``what``."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own zoo
        raise WeightsError(f"cannot load {what} {path}: {exc}") from exc
