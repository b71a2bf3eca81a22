"""The mechanics behind :mod:`tether.core.protocol`: header fields, validators, frame checks.

:mod:`tether.core.protocol` declares every message kind and owns :func:`encode` and
:func:`decode`; this module knows no message kind. It turns a message dataclass into its
header-field specs (:func:`field_specs`) and validates the parts of a received message
that do not depend on its kind: the msgpack header (:func:`unpack_header`), declared vs
actual frame sizes (:func:`check_sizes`) and tensor descriptions (:func:`read_tensors`).
Every failure is a :class:`~tether.core.errors.ProtocolError` (or
:class:`~tether.core.errors.VersionMismatchError`)::

    field_specs(cls) -> tuple[Field, ...]       header fields of a message class
    direct_fill(cls) -> (defaults, factories) | None   how decode may build it without __init__
    unpack_header(view, limits, version) -> dict
    check_sizes(name, header, payload, has_payload); read_tensors(header, payload, limits)
    to_wire(value); nbytes(buf); wire_size(frames) -> int; peek_request_id(frames) -> int
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, fields
from typing import Any

import msgpack

from tether.core.errors import ProtocolError, VersionMismatchError
from tether.core.frames import DEFAULT_LIMITS, Buffer, BundleInfo, Limits, TensorDesc, as_view

HEADER_KEY = {"request_id": "id"}       # attribute -> header key, where they differ
# How a header field is checked on decode's fast path (anything else goes to its full checker):
STR, INT, FLOAT, MAP, OTHER = range(5)
_KINDS = {str: STR, int: INT, float: FLOAT, dict: MAP}
NO_SIZES: list[int] = []


class Field(typing.NamedTuple):
    """One header field of a message class, as encode and decode see it."""

    name: str           # attribute
    key: str            # header key
    kind: int           # STR/INT/FLOAT/MAP: checked inline; OTHER: always by ``check``
    nullable: bool      # None allowed
    required: bool
    check: Any          # full validator (value, limits) -> value; raises ProtocolError


def field_specs(cls: type) -> tuple[Field, ...]:
    """The header fields of a message class (every field but ``payload`` and ``tensors``)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in fields(cls):
        if f.name in ("payload", "tensors"):
            continue
        key = HEADER_KEY.get(f.name, f.name)
        tp = hints[f.name]
        args = typing.get_args(tp)
        nullable = type(None) in args
        inner = next(a for a in args if a is not type(None)) if nullable else tp
        kind = _KINDS.get(typing.get_origin(inner) or inner, OTHER)
        required = f.default is MISSING and f.default_factory is MISSING
        specs.append(Field(f.name, key, kind, nullable, required,
                           _checker(tp, f"{cls.TYPE.name}.{key}")))
    return tuple(specs)


def direct_fill(cls: type) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...]] | None:
    """(static defaults, default factories) of a class decode may fill directly;
    None for classes that validate in ``__post_init__`` or have no ``__dict__``."""
    if hasattr(cls, "__post_init__") or "__slots__" in vars(cls):
        return None
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    factories = tuple((f.name, f.default_factory) for f in fields(cls)
                      if f.default_factory is not MISSING)
    return defaults, factories


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
    if typing.get_origin(tp) is tuple and args and args[0] is int:
        def check_ints(v: Any, limits: Limits) -> tuple[int, ...]:
            if not isinstance(v, list) or not all(type(i) is int and 0 <= i < 1 << 63 for i in v):
                raise ProtocolError(f"{where} must be a list of non-negative ints")
            return tuple(v)
        return check_ints
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


# --- encode side ---------------------------------------------------------------------------

def to_wire(value: Any) -> Any:
    if isinstance(value, (BundleInfo, TensorDesc)):
        return value.to_wire()
    if isinstance(value, tuple):
        return [to_wire(v) for v in value]
    return value


def nbytes(buf: Any) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def wire_size(frames: list[Any]) -> int:
    """Total bytes of ``frames`` (what the socket carries, before ZMTP framing)."""
    return sum(len(f) if type(f) is bytes else nbytes(as_view(f)) for f in frames)


# --- decode side ---------------------------------------------------------------------------

def peek_request_id(frames: list[Any]) -> int:
    """Best-effort request id of a message that failed decode (0 when unreadable)."""
    try:
        view = as_view(frames[1])
        if view.nbytes <= DEFAULT_LIMITS.max_header_bytes:
            rid = msgpack.unpackb(view, raw=False, ext_hook=no_ext).get("id", 0)
            return rid if type(rid) is int and 0 <= rid < (1 << 64) else 0
    except Exception:  # noqa: BLE001 - anything unreadable has no id
        pass
    return 0


def unpack_header(view: Buffer, limits: Limits, version: int) -> dict[str, Any]:
    """Frame 1 as a dict, refused unless a msgpack map of protocol ``version``."""
    if len(view) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(view)} bytes exceeds {limits.max_header_bytes}")
    try:            # from bytes: msgpack reads a memoryview about twice as slowly
        header = _unpackb(view if type(view) is bytes else bytes(view), raw=False,
                          strict_map_key=True, use_list=True, ext_hook=no_ext)
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from exc
    if type(header) is not dict:
        raise ProtocolError("header must be a msgpack map")
    got = header.get("v")
    if type(got) is not int:                # strict: a bool or 1.0 is not a version
        raise ProtocolError(f"header 'v' (protocol version) must be an int, got {got!r:.40}")
    if got != version:
        raise VersionMismatchError(f"peer speaks protocol version {got!r}, this tether "
                                   f"speaks {version}: upgrade the older side")
    return header


def no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def check_sizes(name: str, header: dict[str, Any], payload: tuple[memoryview, ...],
                has_payload: bool) -> None:
    """Header ``sizes`` against the payload frames of a message of type ``name``."""
    sizes = header.get("sizes", NO_SIZES)
    if type(sizes) is not list or not all(type(s) is int for s in sizes):
        raise ProtocolError("header 'sizes' must be a list of ints")
    if payload and not has_payload:
        raise ProtocolError(f"{name} carries no payload, got {len(payload)} extra frames")
    if len(sizes) != len(payload):
        raise ProtocolError(f"header declares {len(sizes)} payload frames, got {len(payload)}")
    for i, (declared, view) in enumerate(zip(sizes, payload)):
        if declared != view.nbytes:
            raise ProtocolError(f"payload frame {i}: declared {declared} bytes, got {view.nbytes}")


def read_tensors(header: dict[str, Any], payload: tuple[memoryview, ...],
                 limits: Limits) -> tuple[TensorDesc, ...]:
    """The header's ``tensors``, each checked against its payload frame."""
    raw = header.get("tensors", NO_SIZES)
    if type(raw) is not list or len(raw) > len(payload):
        raise ProtocolError("header 'tensors' must be a list with one payload frame per tensor")
    descs = tuple(TensorDesc.from_wire(d, limits, f"tensor {i}") for i, d in enumerate(raw))
    for i, (desc, view) in enumerate(zip(descs, payload)):
        if desc.nbytes != view.nbytes:
            raise ProtocolError(f"tensor {i}: {desc.shape} {desc.dtype} needs {desc.nbytes} bytes, "
                                f"frame has {view.nbytes}")
    return descs


_unpackb = msgpack.unpackb
