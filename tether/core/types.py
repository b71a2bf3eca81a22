"""Shared value types: tensor specs, split costs, actions and per-request records.

These are plain frozen dataclasses with JSON-friendly ``to_dict``/``from_dict`` so that
the partitioner, policies, runtime and testbed exchange data without importing each
other.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tether.core.errors import BundleError

#: dtypes allowed anywhere in tether (and on the wire), with their item size in bytes.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor; ``shape[0]`` is the batch dimension."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; allowed: {sorted(DTYPE_SIZES)}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(tuple(d["shape"]), d.get("dtype", "float32"))


@dataclass(frozen=True)
class SplitCost:
    """Profile of one split point for one sample (batch 1).

    ``bytes`` is the raw size of the crossing tensor; codec sizes live in ``CodecCost``.
    """

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    head_seconds: float
    tail_seconds: float
    head_flops: int = 0
    tail_flops: int = 0
    head_params: int = 0
    tail_params: int = 0


@dataclass(frozen=True)
class CodecCost:
    """Measured behaviour of one codec at one split point (``split="input"`` for offload)."""

    split: str
    codec: str
    bytes: float            # mean payload bytes per sample, as sent on the wire
    encode_seconds: float
    decode_seconds: float
    accuracy: float | None = None   # top-1 on the honest evaluation set, if measured
    header_bytes: int = 0
    bytes_p95: float | None = None  # 95th percentile of payload bytes per sample
    encoder_flops: int | None = None  # edge encoder FLOPs per sample (learned codecs)
    replaces_head: bool = False     # student codec: the edge runs only its encoder on the input


@dataclass(frozen=True)
class ExitCost:
    """An early exit at a split point: its extra cost and calibrated behaviour."""

    split: str
    exit_seconds: float      # cost of the exit head on the edge, on top of the head
    exit_rate: float         # fraction of samples answered locally at the threshold
    accuracy: float | None   # accuracy of the samples it answers
    threshold: float = 0.0


@dataclass(frozen=True)
class CostTable:
    """Everything a policy needs to predict the latency of each action."""

    model_id: str
    input: TensorSpec
    edge_full_seconds: float           # whole model on the edge backend
    cloud_full_seconds: float          # whole model on the cloud (full offload tail)
    splits: tuple[SplitCost, ...]
    codecs: tuple[CodecCost, ...] = ()
    exits: tuple[ExitCost, ...] = ()
    full_accuracy: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> SplitCost:
        for s in self.splits:
            if s.name == name:
                return s
        from tether.core.errors import SplitError
        raise SplitError(f"unknown split point {name!r}; valid: {[s.name for s in self.splits]}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"] = self.input.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostTable":
        try:
            return cls(
                model_id=d["model_id"],
                input=TensorSpec.from_dict(d["input"]),
                edge_full_seconds=float(d["edge_full_seconds"]),
                cloud_full_seconds=float(d["cloud_full_seconds"]),
                splits=tuple(_build(SplitCost, s) for s in d["splits"]),
                codecs=tuple(_build(CodecCost, c) for c in d.get("codecs", ())),
                exits=tuple(_build(ExitCost, e) for e in d.get("exits", ())),
                full_accuracy=d.get("full_accuracy"),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid cost table: {exc}") from exc

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        return cls.from_dict(read_json(path))


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = dict(d)
    if "shape" in kwargs:
        kwargs["shape"] = tuple(kwargs["shape"])
    return cls(**kwargs)


class ActionKind(str, enum.Enum):
    LOCAL = "local"       # whole model on the edge
    SPLIT = "split"       # head on the edge, tail on the cloud
    OFFLOAD = "offload"   # input (optionally codec-compressed) to the cloud
    EXIT = "exit"         # head + early exit on the edge; if not confident, split there


@dataclass(frozen=True)
class Action:
    """What to do with one request. ``split`` names the split point for SPLIT/EXIT."""

    kind: ActionKind
    split: str | None = None
    codec: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ActionKind(self.kind))
        if self.kind in (ActionKind.SPLIT, ActionKind.EXIT) and not self.split:
            raise ValueError(f"action {self.kind.value} needs a split point")

    @property
    def key(self) -> str:
        """Stable text form, e.g. ``split:layer2:int8``, ``local``, ``offload:webp75``."""
        if self.kind is ActionKind.LOCAL:
            return "local"
        if self.kind is ActionKind.OFFLOAD:
            return f"offload:{self.codec}"
        return f"{self.kind.value}:{self.split}:{self.codec}"

    @classmethod
    def parse(cls, key: str) -> "Action":
        parts = key.split(":")
        kind = ActionKind(parts[0])
        if kind is ActionKind.LOCAL:
            return cls(kind)
        if kind is ActionKind.OFFLOAD:
            return cls(kind, None, parts[1] if len(parts) > 1 else "fp32")
        if len(parts) < 2:
            raise ValueError(f"action {key!r} needs a split point")
        return cls(kind, parts[1], parts[2] if len(parts) > 2 else "fp32")


LOCAL = Action(ActionKind.LOCAL)


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request on the edge: the testbed's CSV row and metrics source."""

    request_id: int
    edge_id: str
    start_time: float            # wall clock (time.time()) when the request arrived
    action: str                  # Action.key actually executed
    outcome: str                 # "cloud", "local", "exit", "fallback"
    fallback_reason: str = ""    # "", "timeout", "overdue", "busy", "error", "disconnected"
    head_seconds: float = 0.0
    encode_seconds: float = 0.0
    network_seconds: float = 0.0  # send-to-reply minus cloud-reported time
    cloud_queue_seconds: float = 0.0
    cloud_decode_seconds: float = 0.0
    tail_seconds: float = 0.0
    local_seconds: float = 0.0   # local fallback / exit compute
    edge_wait_seconds: float = 0.0  # queued behind other requests' edge compute (not in head/encode/local)
    total_seconds: float = 0.0
    bytes_sent: int = 0          # bytes of all frames put on the socket
    bytes_received: int = 0
    prediction: int | None = None

    def to_dict(self) -> dict[str, Any]:
        # every field is a scalar: a shallow copy, in field order (``asdict`` deep-copies
        # field by field, ~40 us a call, twice per request on a daemon whose CPU is scarce)
        return dict(vars(self))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, never half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"missing file {path}") from exc
    except (OSError, ValueError, RecursionError) as exc:   # ValueError: JSON or not UTF-8
        raise BundleError(f"unreadable JSON {path}: {exc}") from exc
