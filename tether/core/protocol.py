"""tether's wire protocol: one module owns every byte between edge and cloud.

A message is a ZeroMQ multipart message::

    frame 0   one byte: the message type (:class:`MsgType`)
    frame 1   msgpack map: the header. Always ``v`` (protocol version) and ``id`` (request id),
              ``sizes`` (byte length of each payload frame), then the type's own fields
    frame 2+  raw payload: codec bytes (INFER/PREFILL/DECODE) or contiguous tensors described
              by the header's ``tensors`` list (RESULT, IMAGE...); zero-copy memoryviews

Never pickle. :func:`decode` treats its input as hostile and validates before anything is
allocated from it: frame count, total size, header size, version, field types, declared vs
actual frame sizes, dtype whitelist (:data:`tether.core.types.DTYPE_SIZES`), rank and element
limits. Every failure is a :class:`~tether.core.errors.ProtocolError` (or its subclass
:class:`~tether.core.errors.VersionMismatchError`); nothing else escapes.

API (used by tether.edge, tether.cloud and the LLM split)::

    edge <-> cloud   Hello -> Ready (handshake: bundles, fingerprints), Infer -> Result,
                     Prefill/Decode -> Result (LLM session steps), Close, Ping -> Pong
    app <-> edge     ImageRequest -> ImageReply (logits + the edge's RequestRecord),
                     Generate -> TokenChunk ... StreamEnd (the stream's record), Hello -> Ready,
                     Ping -> Pong (the edge's application endpoint, tether.edge.server)
    either way       Error (code, message; .to_exception()), Busy (reason, retry_after_s)
                     (Prefill also carries the session's sampling: temperature, top_k, top_p,
                     seed, validated: Prefill.sampling -> SamplingParams)

    encode(msg) -> list[bytes | memoryview]   send with sock.send_multipart(frames, copy=False):
                                              pyzmq copies frames under 64 KiB, others zero-copy
    decode(frames, limits=DEFAULT_LIMITS) -> message   frames: bytes/memoryview/zmq.Frame
    wire_size(frames) -> int; peek_request_id(frames) -> id of an undecodable message, or 0
    Limits, TensorDesc, BundleInfo, tensor_frame, frame_array, frame_tensor, result_for:
    tether.core.frames, re-exported here.

This module declares every message kind (:class:`MsgType`, the message classes,
:data:`MESSAGE_CLASSES`) and owns :func:`encode`/:func:`decode`; the kind-independent
mechanics (header-field specs and validators, header/size/tensor checks, wire_size,
peek_request_id) live in :mod:`tether.core.wire`.

Unknown extra header fields are ignored (fields added within a version); a different ``v``
raises VersionMismatchError.
"""

from __future__ import annotations

import enum
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Union

import msgpack

from tether.core.errors import ConfigError, ProtocolError, TetherError, error_from_code
from tether.core.frames import (  # noqa: F401 (re-exported: part of this module's API)
    DEFAULT_LIMITS, Buffer, BundleInfo, Limits, TensorDesc, as_view as _as_view, frame_array,
    frame_tensor, result_for, tensor_frame,
)
from tether.core.sampling import SamplingParams
from tether.core.wire import (  # noqa: F401 (peek_request_id, wire_size: re-exported)
    FLOAT as _FLOAT, INT as _INT, MAP as _MAP, OTHER as _OTHER, STR as _STR,
    check_sizes as _check_sizes, direct_fill as _direct_fill, field_specs as _field_specs,
    nbytes as _nbytes, peek_request_id, read_tensors as _read_tensors, to_wire as _to_wire,
    unpack_header as _unpack_header, wire_size,
)

PROTOCOL_VERSION = 1
ZERO_COPY_BYTES = 64 * 1024     # frames at least this big are sent without copying


class MsgType(enum.IntEnum):
    """Frame 0. Values are the wire bytes; new types only ever get new numbers."""

    HELLO, READY, INFER, RESULT, ERROR, BUSY, PING, PONG, PREFILL, DECODE, CLOSE = range(1, 12)
    IMAGE, IMAGE_REPLY, GENERATE, TOKENS, STREAM_END = range(12, 17)   # application endpoint


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


# --- the edge's application endpoint (apps <-> `tether edge`, tether.edge.client) ---------

TOKEN_SOURCES = ("cloud", "exit", "local")    # the cloud, a confident exit, the exit alone
FINISH_REASONS = ("length", "stop", "error")  # max_new_tokens reached, end of text, an error


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ProtocolError(message)


@dataclass(frozen=True)
class ImageRequest:
    request_id: int
    tensors: tuple[TensorDesc, ...] = ()    # one: uint8 HWC image or float NCHW in [0, 1]
    payload: tuple[Buffer, ...] = ()
    deadline_s: float | None = None         # budget from the edge's receipt
    TYPE: typing.ClassVar[MsgType] = MsgType.IMAGE

    def __post_init__(self) -> None:
        no_deadline_or_positive = self.deadline_s is None or self.deadline_s > 0
        _require(len(self.tensors) == len(self.payload) == 1 and no_deadline_or_positive,
                 "IMAGE carries one tensor (the image) and a deadline_s > 0 or none")


@dataclass(frozen=True)
class ImageReply:
    request_id: int
    tensors: tuple[TensorDesc, ...] = ()    # one: the logits [1, classes]
    payload: tuple[Buffer, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)   # tether.core.types.RequestRecord
    label: str = ""                         # class name, when the bundle has labels
    TYPE: typing.ClassVar[MsgType] = MsgType.IMAGE_REPLY

    def __post_init__(self) -> None:
        _require(len(self.tensors) == len(self.payload) == 1, "IMAGE_REPLY carries one tensor")
        _require(all(isinstance(k, str) and (v is None or type(v) in (str, bool, int) or
                                             type(v) is float and math.isfinite(v))
                     for k, v in self.record.items()),
                 "IMAGE_REPLY.record must map names to strings or finite numbers")


@dataclass(frozen=True)
class Generate:                             # greedy unless temperature > 0; seeded: reproducible
    request_id: int
    prompt: str = ""                        # the prompt text, or
    token_ids: tuple[int, ...] = ()         # its token ids
    max_new_tokens: int = 64                # the edge caps it at its own limit
    temperature: float = 0.0
    top_k: int = 0                          # 0: no top-k cut
    top_p: float = 1.0                      # 1: no nucleus cut
    seed: int | None = None                 # None: the edge picks one
    TYPE: typing.ClassVar[MsgType] = MsgType.GENERATE

    def __post_init__(self) -> None:
        _require(bool(self.prompt) != bool(self.token_ids) and all(
            0 <= t < 1 << 31 for t in self.token_ids), "GENERATE needs a prompt or token_ids "
            "in [0, 2**31) (exactly one of them)")
        _require(self.max_new_tokens >= 1 and self.temperature >= 0 and self.top_k >= 0 and
                 0 < self.top_p <= 1 and (self.seed is None or 0 <= self.seed < 1 << 64),
                 "GENERATE needs max_new_tokens >= 1, temperature >= 0, top_k >= 0, "
                 "0 < top_p <= 1 and seed >= 0")


@dataclass(frozen=True)
class TokenChunk:
    request_id: int
    tokens: tuple[int, ...]                 # the next token id(s)
    text: str = ""                          # text they complete ("" mid UTF-8 sequence)
    source: str = "cloud"                   # TOKEN_SOURCES
    TYPE: typing.ClassVar[MsgType] = MsgType.TOKENS

    def __post_init__(self) -> None:
        _require(bool(self.tokens) and self.source in TOKEN_SOURCES,
                 f"TOKENS needs token ids and a source in {TOKEN_SOURCES}")


@dataclass(frozen=True)
class StreamEnd:                            # a stream's record; its error as ERROR's code/message
    request_id: int
    cloud: int = 0                          # tokens by source (TOKEN_SOURCES)
    exit: int = 0
    local: int = 0
    seconds: float = 0.0
    finish: str = "length"                  # FINISH_REASONS
    code: str = ""
    message: str = ""
    TYPE: typing.ClassVar[MsgType] = MsgType.STREAM_END

    def __post_init__(self) -> None:
        _require(min(self.cloud, self.exit, self.local, self.seconds) >= 0 and
                 self.finish in FINISH_REASONS and (self.finish == "error") == bool(self.code),
                 f"STREAM_END needs counts >= 0, finish in {FINISH_REASONS} and an error "
                 "code exactly when finish is 'error'")

    def by_source(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in TOKEN_SOURCES}

    def to_exception(self) -> TetherError | None:
        return error_from_code(self.code, self.message) if self.code else None


Message = Union[Hello, Ready, Infer, Result, Error, Busy, Ping, Pong, Prefill, Decode, Close,
                ImageRequest, ImageReply, Generate, TokenChunk, StreamEnd]

#: One literal mapping: message type -> class.
MESSAGE_CLASSES: dict[MsgType, type] = {
    MsgType.HELLO: Hello, MsgType.READY: Ready, MsgType.INFER: Infer,
    MsgType.RESULT: Result, MsgType.ERROR: Error, MsgType.BUSY: Busy,
    MsgType.PING: Ping, MsgType.PONG: Pong, MsgType.PREFILL: Prefill,
    MsgType.DECODE: Decode, MsgType.CLOSE: Close,
    MsgType.IMAGE: ImageRequest, MsgType.IMAGE_REPLY: ImageReply, MsgType.GENERATE: Generate,
    MsgType.TOKENS: TokenChunk, MsgType.STREAM_END: StreamEnd,
}
_FRAME0 = {t: bytes([int(t)]) for t in MsgType}
_BY_BYTE = {int(t): t for t in MsgType}
_MISSING = object()
_INT_MIN, _INT_END = -(1 << 63), 1 << 64


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
    header = _unpack_header(views[1], limits, PROTOCOL_VERSION)
    payload = tuple(v if type(v) is memoryview else memoryview(v) for v in views[2:])
    _check_sizes(mtype.name, header, payload, _HAS_PAYLOAD[mtype])
    values = _header_fields(mtype, header, limits)
    if _HAS_PAYLOAD[mtype]:
        values["payload"] = payload
    if _HAS_TENSORS[mtype]:
        values["tensors"] = _read_tensors(header, payload, limits)
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


# per message type, built once from the classes above (tether.core.wire.field_specs)
_SPECS = {t: _field_specs(c) for t, c in MESSAGE_CLASSES.items()}
_ENCODE = {t: tuple((f.name, f.key, f.kind == _OTHER) for f in specs) for t, specs in _SPECS.items()}
_HAS_PAYLOAD = {t: any(f.name == "payload" for f in fields(c)) for t, c in MESSAGE_CLASSES.items()}
_HAS_TENSORS = {t: any(f.name == "tensors" for f in fields(c)) for t, c in MESSAGE_CLASSES.items()}
_DIRECT = {t: _direct_fill(c) for t, c in MESSAGE_CLASSES.items()}
_packb = msgpack.packb
