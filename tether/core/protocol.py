"""tether's wire protocol: one module owns every byte between edge and cloud.

A message is a ZeroMQ multipart message::

    frame 0   one byte: the message type (:class:`MsgType`)
    frame 1   msgpack map: the header. Always ``v`` (protocol version) and ``id`` (request id),
              ``sizes`` (byte length of each payload frame), then the type's own fields
    frame 2+  raw payload: codec bytes (INFER/PREFILL/DECODE) or contiguous tensors described
              by the header's ``tensors`` list (RESULT); zero-copy memoryviews

Never pickle. :func:`decode` treats its input as hostile and validates before anything is
allocated from it: frame count, total size, header size, version, field types, declared vs
actual frame sizes, dtype whitelist (:data:`tether.core.types.DTYPE_SIZES`), rank and element
limits. Every failure is a :class:`~tether.core.errors.ProtocolError` (or its subclass
:class:`~tether.core.errors.VersionMismatchError`); nothing else escapes.

API (used by tether.edge, tether.cloud and the LLM split)::

    PROTOCOL_VERSION, MsgType, Limits, DEFAULT_LIMITS, TensorDesc, BundleInfo
    Hello   edge -> cloud   edge_id, bundles (fingerprints wanted; empty: anything)
    Ready   cloud -> edge   server_id, bundles (what it serves), max_message_bytes
    Infer   edge -> cloud   fingerprint, split ("input" = full offload), codec, codec_header,
                            deadline_s (budget from arrival; None = no deadline), payload
    Result  cloud -> edge   tensors + payload (logits), queue_s, decode_s, tail_s, batch_size
    Error   either way      code (tether.core.errors code), message; .to_exception()
    Busy    cloud -> edge   reason ("queue_full" | "deadline" | "draining"), queue_depth,
                            retry_after_s
    Ping/Pong               t (sender's clock, echoed), Pong.queue_s (cloud's queue delay now)
    Prefill/Decode          LLM session steps: session_id, fingerprint, split, codec,
                            codec_header, position, token_count, deadline_s, payload;
                            Prefill also temperature, top_k, top_p, seed (the session's
                            sampling, validated: Prefill.sampling -> SamplingParams)
    Close                   session_id

    encode(msg) -> list[bytes | memoryview]   send with sock.send_multipart(frames, copy=False):
                                              pyzmq copies frames under 64 KiB, others zero-copy
    decode(frames, limits=DEFAULT_LIMITS) -> message   frames: bytes/memoryview/zmq.Frame
    tensor_frame(t) -> (TensorDesc, memoryview)        numpy array or torch tensor, any layout
    frame_array(desc, buf) -> numpy.ndarray            zero-copy, read-only
    frame_tensor(desc, buf) -> torch.Tensor            a private writable copy
    result_for(request_id, tensor, ...) -> Result ; Result.tensor(i=0) -> torch.Tensor
    wire_size(frames) -> int                           bytes that go on the socket
    peek_request_id(frames) -> int                     id of an undecodable message, or 0

Messages with unknown extra header fields still decode (fields added within a version are
ignored by older peers); a different ``v`` raises VersionMismatchError.
"""

from __future__ import annotations

import enum
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union

import msgpack
import numpy as np

from tether.core.errors import (
    ConfigError, ProtocolError, TetherError, VersionMismatchError, error_from_code,
)
from tether.core.sampling import SamplingParams
from tether.core.types import DTYPE_SIZES, TensorSpec

PROTOCOL_VERSION = 1
ZERO_COPY_BYTES = 64 * 1024     # frames at least this big are sent without copying

Buffer = Union[bytes, memoryview]


class MsgType(enum.IntEnum):
    """Frame 0. Values are the wire bytes; new types only ever get new numbers."""

    HELLO, READY, INFER, RESULT, ERROR, BUSY, PING, PONG, PREFILL, DECODE, CLOSE = range(1, 12)


@dataclass(frozen=True)
class Limits:
    """What :func:`decode` accepts; anything larger is refused before allocation."""

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


# --- messages -----------------------------------------------------------------------------
# Every field except ``payload`` and ``tensors`` is a header key of the same name.

@dataclass(frozen=True)
class Hello:
    request_id: int = 0
    edge_id: str = ""
    bundles: tuple[BundleInfo, ...] = ()
    TYPE: typing.ClassVar[MsgType] = MsgType.HELLO


@dataclass(frozen=True)
class Ready:
    request_id: int = 0
    server_id: str = ""
    bundles: tuple[BundleInfo, ...] = ()
    max_message_bytes: int = DEFAULT_LIMITS.max_message_bytes
    TYPE: typing.ClassVar[MsgType] = MsgType.READY

    def bundle(self, fingerprint: str) -> BundleInfo | None:
        return next((b for b in self.bundles if b.fingerprint == fingerprint), None)


@dataclass(frozen=True)
class Infer:
    request_id: int
    fingerprint: str
    split: str                          # split point name; "input" = full offload
    codec: str
    codec_header: dict[str, Any] = field(default_factory=dict)
    deadline_s: float | None = None     # time budget from the cloud's receipt
    payload: tuple[Buffer, ...] = ()
    TYPE: typing.ClassVar[MsgType] = MsgType.INFER


@dataclass(frozen=True)
class Result:
    request_id: int
    tensors: tuple[TensorDesc, ...] = ()
    payload: tuple[Buffer, ...] = ()
    queue_s: float = 0.0                # waiting in the cloud's queue
    decode_s: float = 0.0               # codec decode on the cloud
    tail_s: float = 0.0                 # tail compute (whole batch)
    batch_size: int = 1                 # requests in the batch this one ran in
    TYPE: typing.ClassVar[MsgType] = MsgType.RESULT

    def tensor(self, i: int = 0) -> Any:
        """The i-th result tensor as a writable torch tensor."""
        return frame_tensor(self.tensors[i], self.payload[i])

    @property
    def cloud_s(self) -> float:
        return self.queue_s + self.decode_s + self.tail_s


@dataclass(frozen=True)
class Error:
    request_id: int
    code: str
    message: str
    TYPE: typing.ClassVar[MsgType] = MsgType.ERROR

    @classmethod
    def from_exception(cls, request_id: int, exc: BaseException) -> "Error":
        code = exc.code if isinstance(exc, TetherError) else "internal"
        return cls(request_id, code, str(exc) or type(exc).__name__)

    def to_exception(self) -> TetherError:
        return error_from_code(self.code, self.message)


@dataclass(frozen=True)
class Busy:
    request_id: int
    reason: str = "queue_full"          # "queue_full", "deadline", "draining"
    queue_depth: int = 0
    retry_after_s: float = 0.0
    TYPE: typing.ClassVar[MsgType] = MsgType.BUSY


@dataclass(frozen=True)
class Ping:
    request_id: int = 0
    t: float = 0.0                      # sender's clock, echoed in PONG
    TYPE: typing.ClassVar[MsgType] = MsgType.PING


@dataclass(frozen=True)
class Pong:
    request_id: int = 0
    t: float = 0.0
    queue_s: float = 0.0                # the cloud's current queue delay estimate
    TYPE: typing.ClassVar[MsgType] = MsgType.PONG


@dataclass(frozen=True)
class Prefill:
    request_id: int
    session_id: str
    fingerprint: str
    split: str
    codec: str
    position: int = 0                   # first token position covered by this message
    token_count: int = 0
    codec_header: dict[str, Any] = field(default_factory=dict)
    deadline_s: float | None = None
    payload: tuple[Buffer, ...] = ()
    # sampling settings of the session (tether.core.sampling; defaults: greedy)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None             # None: the receiver picks one (sampling only)
    TYPE: typing.ClassVar[MsgType] = MsgType.PREFILL

    def __post_init__(self) -> None:
        try:
            SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)
        except ConfigError as exc:
            raise ProtocolError(f"PREFILL sampling settings: {exc}") from exc

    @property
    def sampling(self) -> SamplingParams:
        """The session's validated sampling settings."""
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(frozen=True)
class Decode:
    request_id: int
    session_id: str
    fingerprint: str
    split: str
    codec: str
    position: int = 0
    token_count: int = 1
    codec_header: dict[str, Any] = field(default_factory=dict)
    deadline_s: float | None = None
    payload: tuple[Buffer, ...] = ()
    TYPE: typing.ClassVar[MsgType] = MsgType.DECODE


@dataclass(frozen=True)
class Close:
    request_id: int
    session_id: str
    TYPE: typing.ClassVar[MsgType] = MsgType.CLOSE


Message = Union[Hello, Ready, Infer, Result, Error, Busy, Ping, Pong, Prefill, Decode, Close]

#: One literal mapping: message type -> class.
MESSAGE_CLASSES: dict[MsgType, type] = {
    MsgType.HELLO: Hello, MsgType.READY: Ready, MsgType.INFER: Infer,
    MsgType.RESULT: Result, MsgType.ERROR: Error, MsgType.BUSY: Busy,
    MsgType.PING: Ping, MsgType.PONG: Pong, MsgType.PREFILL: Prefill,
    MsgType.DECODE: Decode, MsgType.CLOSE: Close,
}
_FRAME0 = {t: bytes([int(t)]) for t in MsgType}
_BY_BYTE = {int(t): t for t in MsgType}
_HEADER_KEY = {"request_id": "id"}
_MISSING = object()
# How a header field is checked on the fast path (anything else goes to its full checker):
_STR, _INT, _FLOAT, _MAP, _OTHER = range(5)
_KINDS = {str: _STR, int: _INT, float: _FLOAT, dict: _MAP}
_INT_MIN, _INT_END = -(1 << 63), 1 << 64


class _Field(typing.NamedTuple):
    """One header field of a message class, as :func:`encode` and :func:`decode` see it."""

    name: str           # attribute
    key: str            # header key
    kind: int           # _STR/_INT/_FLOAT/_MAP: checked inline; _OTHER: always by ``check``
    nullable: bool      # None allowed
    required: bool
    check: Any          # full validator (value, limits) -> value; raises ProtocolError


def _field_specs(cls: type) -> tuple[_Field, ...]:
    """The header fields of a message class (every field but ``payload`` and ``tensors``)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in fields(cls):
        if f.name in ("payload", "tensors"):
            continue
        key = _HEADER_KEY.get(f.name, f.name)
        tp = hints[f.name]
        args = typing.get_args(tp)
        nullable = type(None) in args
        inner = next(a for a in args if a is not type(None)) if nullable else tp
        kind = _KINDS.get(typing.get_origin(inner) or inner, _OTHER)
        required = f.default is MISSING and f.default_factory is MISSING
        specs.append(_Field(f.name, key, kind, nullable, required,
                            _checker(tp, f"{cls.TYPE.name}.{key}")))
    return tuple(specs)


# --- encode --------------------------------------------------------------------------------

def encode(msg: Message) -> list[Buffer]:
    """Frames of ``msg``: type byte, msgpack header, payload (untouched, zero-copy)."""
    mtype = msg.TYPE
    header: dict[str, Any] = {"v": PROTOCOL_VERSION}
    for name, key, convert in _ENCODE[mtype]:
        value = getattr(msg, name)
        header[key] = _to_wire(value) if convert else value
    payload: tuple[Buffer, ...] = msg.payload if _HAS_PAYLOAD[mtype] else ()
    if payload:
        header["sizes"] = [len(b) if type(b) is bytes else _nbytes(b) for b in payload]
    if _HAS_TENSORS[mtype] and msg.tensors:
        header["tensors"] = [t.to_wire() for t in msg.tensors]
    return [_FRAME0[mtype], _packb(header, use_bin_type=True), *payload]


def _to_wire(value: Any) -> Any:
    if isinstance(value, (BundleInfo, TensorDesc)):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def _nbytes(buf: Any) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def wire_size(frames: list[Any]) -> int:
    """Total bytes of ``frames`` (what the socket carries, before ZMTP framing)."""
    return sum(len(f) if type(f) is bytes else _nbytes(_as_view(f)) for f in frames)


# --- decode --------------------------------------------------------------------------------

def decode(frames: list[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and validate ``frames`` (bytes, memoryview or zmq.Frame); raise ProtocolError."""
    try:
        return _decode(frames, limits)
    except TetherError:
        raise
    except Exception as exc:  # defensive: hostile input must never escape as anything else
        raise ProtocolError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def _decode(frames: list[Any], limits: Limits) -> Message:
    if type(frames) not in (list, tuple) or not 2 <= len(frames) <= limits.max_frames:
        n = len(frames) if isinstance(frames, (list, tuple)) else "?"
        raise ProtocolError(f"expected 2..{limits.max_frames} frames, got {n}")
    views = [f if type(f) is bytes else _as_view(f) for f in frames]   # len() = bytes
    total = sum(map(len, views))
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds max_message_bytes="
                            f"{limits.max_message_bytes}")
    kind = views[0]
    mtype = _BY_BYTE.get(kind[0]) if len(kind) == 1 else None
    if mtype is None:
        raise ProtocolError(f"frame 0 must be one message-type byte, got {bytes(kind[:8])!r}")
    header = _unpack_header(views[1], limits)
    payload = tuple(v if type(v) is memoryview else memoryview(v) for v in views[2:])
    _check_sizes(mtype, header, payload)
    values = _header_fields(mtype, header, limits)
    if _HAS_PAYLOAD[mtype]:
        values["payload"] = payload
    if _HAS_TENSORS[mtype]:
        values["tensors"] = _tensors(header, payload, limits)
    return _build(mtype, values)


def _header_fields(mtype: MsgType, header: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Validated attribute values from ``header``: exact types pass inline, the rest (ints
    for floats, nested structures, anything wrong) through the field's full checker."""
    values: dict[str, Any] = {}
    for name, key, kind, nullable, required, check in _SPECS[mtype]:
        v = header.get(key, _MISSING)
        if v is _MISSING:
            if required:
                raise ProtocolError(f"{mtype.name} header lacks required field {key!r}")
            continue
        t = type(v)
        if not ((t is str and kind == _STR) or (t is float and kind == _FLOAT and v - v == 0.0)
                or (t is int and kind == _INT and _INT_MIN <= v < _INT_END)
                or (t is dict and kind == _MAP) or (v is None and nullable)):
            v = check(v, limits)
        values[name] = v
    return values


def _build(mtype: MsgType, values: dict[str, Any]) -> Message:
    """The message object from validated values. Classes without ``__post_init__`` are
    filled directly (their ``__init__`` would only re-assign what was just validated)."""
    cls = MESSAGE_CLASSES[mtype]
    fill = _DIRECT[mtype]
    if fill is None:
        return cls(**values)
    defaults, factories = fill
    msg = object.__new__(cls)
    state = msg.__dict__
    state.update(defaults)
    for name, factory in factories:
        if name not in values:
            state[name] = factory()
    state.update(values)
    return msg


def peek_request_id(frames: list[Any]) -> int:
    """Best-effort request id of a message that failed :func:`decode` (0 when unreadable)."""
    try:
        view = _as_view(frames[1])
        if view.nbytes <= DEFAULT_LIMITS.max_header_bytes:
            rid = msgpack.unpackb(view, raw=False, ext_hook=_no_ext).get("id", 0)
            return rid if type(rid) is int and 0 <= rid < (1 << 64) else 0
    except Exception:  # noqa: BLE001 - anything unreadable has no id
        pass
    return 0


def _as_view(frame: Any) -> memoryview:
    if isinstance(frame, (bytes, bytearray)):
        return memoryview(frame)
    if isinstance(frame, memoryview):
        return frame if frame.format == "B" and frame.ndim == 1 else frame.cast("B")
    buf = getattr(frame, "buffer", None)       # zmq.Frame received with copy=False
    if isinstance(buf, memoryview):
        return _as_view(buf)
    raise ProtocolError(f"frame of type {type(frame).__name__} is not bytes-like")


def _unpack_header(view: Buffer, limits: Limits) -> dict[str, Any]:
    if len(view) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(view)} bytes exceeds {limits.max_header_bytes}")
    try:            # from bytes: msgpack reads a memoryview about twice as slowly
        header = _unpackb(view if type(view) is bytes else bytes(view), raw=False,
                          strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from exc
    if type(header) is not dict:
        raise ProtocolError("header must be a msgpack map")
    version = header.get("v")
    if type(version) is not int:            # strict: a bool or 1.0 is not a version
        raise ProtocolError(f"header 'v' (protocol version) must be an int, got {version!r:.40}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(f"peer speaks protocol version {version!r}, this tether "
                                   f"speaks {PROTOCOL_VERSION}: upgrade the older side")
    return header


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def _check_sizes(mtype: MsgType, header: dict[str, Any], payload: tuple[memoryview, ...]) -> None:
    sizes = header.get("sizes", _NO_SIZES)
    if type(sizes) is not list or not all(type(s) is int for s in sizes):
        raise ProtocolError("header 'sizes' must be a list of ints")
    if payload and not _HAS_PAYLOAD[mtype]:
        raise ProtocolError(f"{mtype.name} carries no payload, got {len(payload)} extra frames")
    if len(sizes) != len(payload):
        raise ProtocolError(f"header declares {len(sizes)} payload frames, got {len(payload)}")
    for i, (declared, view) in enumerate(zip(sizes, payload)):
        if declared != view.nbytes:
            raise ProtocolError(f"payload frame {i}: declared {declared} bytes, got {view.nbytes}")


_NO_SIZES: list[int] = []


def _tensors(header: dict[str, Any], payload: tuple[memoryview, ...],
             limits: Limits) -> tuple[TensorDesc, ...]:
    raw = header.get("tensors", _NO_SIZES)
    if type(raw) is not list or len(raw) > len(payload):
        raise ProtocolError("header 'tensors' must be a list with one payload frame per tensor")
    descs = tuple(TensorDesc.from_wire(d, limits, f"tensor {i}") for i, d in enumerate(raw))
    for i, (desc, view) in enumerate(zip(descs, payload)):
        if desc.nbytes != view.nbytes:
            raise ProtocolError(f"tensor {i}: {desc.shape} {desc.dtype} needs {desc.nbytes} bytes, "
                                f"frame has {view.nbytes}")
    return descs


_SCALARS: dict[type, tuple[str, Any]] = {
    int: ("an int", lambda v: type(v) is int and -(1 << 63) <= v < (1 << 64)),
    float: ("a finite number", lambda v: type(v) in (int, float) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a map", lambda v: isinstance(v, dict)),
}


def _checker(tp: Any, where: str) -> Any:
    """A validator ``(value, limits) -> value`` for one header field type."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        inner = _checker(next(a for a in args if a is not type(None)), where)
        return lambda v, limits: None if v is None else inner(v, limits)
    if typing.get_origin(tp) is tuple and args and args[0] is BundleInfo:
        def check_bundles(v: Any, limits: Limits) -> tuple[BundleInfo, ...]:
            if not isinstance(v, list):
                raise ProtocolError(f"{where} must be a list")
            return tuple(BundleInfo.from_wire(b, limits) for b in v)
        return check_bundles
    base = typing.get_origin(tp) or tp
    what, ok = _SCALARS[base]

    def check(v: Any, limits: Limits) -> Any:
        if not ok(v):
            raise ProtocolError(f"{where} must be {what}, got {v!r:.60}")
        return float(v) if base is float else v
    return check


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ProtocolError(f"{where} must be a list of strings")
    return tuple(value)


# --- tensors <-> frames --------------------------------------------------------------------

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
    view = _as_view(buf)
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
               tail_s: float = 0.0, batch_size: int = 1) -> Result:
    """RESULT message carrying one tensor (e.g. a row of logits)."""
    desc, view = tensor_frame(tensor)
    return Result(request_id, (desc,), (view,), queue_s, decode_s, tail_s, batch_size)


def _direct_fill(cls: type) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...]] | None:
    """(static defaults, default factories) of a class :func:`_build` may fill directly;
    None for classes that validate in ``__post_init__`` or have no ``__dict__``."""
    if hasattr(cls, "__post_init__") or "__slots__" in vars(cls):
        return None
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    factories = tuple((f.name, f.default_factory) for f in fields(cls)
                      if f.default_factory is not MISSING)
    return defaults, factories


# built last: the field checkers above must exist
_SPECS = {t: _field_specs(c) for t, c in MESSAGE_CLASSES.items()}
_ENCODE = {t: tuple((f.name, f.key, f.kind == _OTHER) for f in specs) for t, specs in _SPECS.items()}
_HAS_PAYLOAD = {t: any(f.name == "payload" for f in fields(c)) for t, c in MESSAGE_CLASSES.items()}
_HAS_TENSORS = {t: any(f.name == "tensors" for f in fields(c)) for t, c in MESSAGE_CLASSES.items()}
_DIRECT = {t: _direct_fill(c) for t, c in MESSAGE_CLASSES.items()}
_packb, _unpackb = msgpack.packb, msgpack.unpackb
