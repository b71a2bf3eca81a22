"""The one action space: every action an edge can really run, priced from its bundle.

:func:`action_space` is the single list the simulator, the oracles, the policies and the
edge all read. With the bundle's :class:`~tether.core.bundle.Manifest` it holds only what
the edge can execute: split points with an exported ONNX head, the codecs measured at
each (tensor codecs, image codecs at every measured quality, learned codecs listed in the
manifest, at each trained rate), exits with a calibrated head, full offload, local.

A codec with ``replaces_head`` (a "student" encoder that reads the input) costs the edge its
encoder only, not head + encoder, and needs no exported head.

Accuracy is part of every action: :func:`check_accuracies` makes a missing measurement an
error naming the fix, never a silent "no floor".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tether.core.bundle import Manifest
from tether.core.errors import BundleError
from tether.core.types import LOCAL, Action, ActionKind, CodecCost, CostTable

INPUT = "input"
#: Wire formats that reproduce their input exactly (with any lossless stage, ``+zlib``,
#: ``+zstd``): their accuracy is the full model's. Every other codec, the bundle's learned
#: ladder included, carries its own measured accuracy.
LOSSLESS_BASES = frozenset({"fp32", "png"})
#: Codecs that need no bundle entry (tether.codecs' tensor codecs; "int8" is the old name of
#: int8-channel). Policies never import tether.codecs: tests/codecs checks this stays equal.
_BASELINES = ("fp32", "fp16", "int8-channel", "int8-token", "int4-token", "int8")
#: Codecs any edge runs without a manifest entry (+ png); learned ones come from the manifest.
BASELINE_BASES = frozenset(_BASELINES) | {"png"}


def is_lossless(codec: str) -> bool:
    """True for ``fp32`` / ``png`` with any lossless stage (``fp32+zstd``, ...)."""
    return codec.partition("+")[0] in LOSSLESS_BASES


@dataclass(frozen=True)
class ActionCost:
    """The cost components of one action (seconds, bytes, probabilities, top-1 in [0, 1])."""

    action: Action
    pre_seconds: float
    encode_seconds: float
    up_bytes: float
    cloud_seconds: float
    down_bytes: float
    exit_rate: float
    accuracy: float | None          # expected accuracy of the action
    remote_accuracy: float | None   # accuracy of requests that go remote

    @property
    def remote(self) -> bool:
        return self.exit_rate < 1.0

    @property
    def edge_seconds(self) -> float:
        """Edge compute when the request goes remote (head/exit + encode), or local compute."""
        return self.pre_seconds + (self.encode_seconds if self.remote else 0.0)


def action_space(table: CostTable, manifest: Manifest | None = None, overhead: int = 256,
                 result: int = 64) -> list[ActionCost]:
    """Every runnable action with its measured bytes, accuracy and compute.

    Without ``manifest`` (a bare cost table, e.g. in unit tests) every profiled split point
    and every codec of the table counts as runnable.
    """
    runnable = _Runnable(table, manifest)
    full_acc = table.full_accuracy
    down = float(result + overhead)
    out = [ActionCost(LOCAL, table.edge_full_seconds, 0.0, 0.0, 0.0, 0.0, 1.0, full_acc, None)]
    raw_input = CodecCost(INPUT, "fp32", table.input.nbytes, 0.0, 0.0, full_acc)
    for codec in _codecs_at(table, INPUT, raw_input):
        acc = _acc(codec, full_acc)
        out.append(ActionCost(Action(ActionKind.OFFLOAD, None, codec.codec), 0.0,
                              codec.encode_seconds, codec.bytes + overhead + codec.header_bytes,
                              codec.decode_seconds + table.cloud_full_seconds, down, 0.0, acc, acc))
    exits = {e.split: e for e in table.exits if runnable.exit(e.split)}
    for split in table.splits:
        raw = CodecCost(split.name, "fp32", split.bytes, 0.0, 0.0, full_acc)
        for codec in _codecs_at(table, split.name, raw):
            student = bool(getattr(codec, "replaces_head", False))
            if not runnable.codec(split.name, codec.codec, student):
                continue
            up = codec.bytes + overhead + codec.header_bytes
            cloud = codec.decode_seconds + split.tail_seconds
            acc = _acc(codec, full_acc)
            pre = 0.0 if student else split.head_seconds
            out.append(ActionCost(Action(ActionKind.SPLIT, split.name, codec.codec), pre,
                                  codec.encode_seconds, up, cloud, down, 0.0, acc, acc))
            ex = exits.get(split.name)
            if ex is not None and not student:   # an exit reads the head's features
                p = min(max(ex.exit_rate, 0.0), 1.0)
                e_acc = None if acc is None or ex.accuracy is None else p * ex.accuracy + (1 - p) * acc
                out.append(ActionCost(Action(ActionKind.EXIT, split.name, codec.codec),
                                      pre + ex.exit_seconds, codec.encode_seconds,
                                      up, cloud, down, p, e_acc, acc))
    return out


class _Runnable:
    """What the edge of a bundle can execute (everything, without a manifest)."""

    def __init__(self, table: CostTable, manifest: Manifest | None) -> None:
        self.manifest = manifest
        if manifest is None:
            return
        self.heads = {e.name for e in manifest.split_points if e.head}
        self.learned = {(c.split, c.codec) for c in manifest.codecs}
        self.exits = {e.split for e in manifest.exits}

    def codec(self, split: str, codec: str, student: bool) -> bool:
        if self.manifest is None:
            return True
        if not student and split not in self.heads:
            return False
        return _is_baseline(codec) or (split, codec) in self.learned

    def exit(self, split: str) -> bool:
        return self.manifest is None or (split in self.exits and split in self.heads)


def _is_baseline(codec: str) -> bool:
    return codec.partition("+")[0] in BASELINE_BASES or codec.startswith(("jpeg", "webp"))


def unpriced_codecs(table: CostTable, manifest: Manifest | None) -> list[str]:
    """The bundle's codecs (its learned ladder) with no measured cost: they cannot be
    priced, so they would silently be missing from the action space."""
    if manifest is None:
        return []
    measured = {(c.split, c.codec) for c in table.codecs}
    return [f"{c.codec} at {c.split}" for c in manifest.codecs
            if not _is_baseline(c.codec) and (c.split, c.codec) not in measured]


def check_accuracies(costs: Iterable[ActionCost], table: CostTable, where: str = "",
                     manifest: Manifest | None = None) -> None:
    """Raise when an accuracy floor is asked for but a lossy action's accuracy is unknown
    (or a codec of the bundle's ladder was never measured at all)."""
    missing = [c.action.key for c in costs if c.accuracy is None and _lossy(c.action)]
    missing += unpriced_codecs(table, manifest)
    exits = [e.split for e in table.exits if e.accuracy is None]
    if table.full_accuracy is None and any(_lossy(c.action) for c in costs):
        missing.insert(0, "the full model (full_accuracy)")
    if missing or exits:
        what = missing + [f"exit at {s}" for s in exits]
        raise BundleError(
            f"cost table{' ' + where if where else ''} of {table.model_id} has no measured "
            f"accuracy for {', '.join(what[:6])}{' ...' if len(what) > 6 else ''}: run "
            "`tether codec eval BUNDLE` (it records every codec's and the full model's "
            "accuracy), or restrict policy.actions to lossless ones; without it the "
            "accuracy floor cannot be enforced")


def _lossy(action: Action) -> bool:
    return action.kind is ActionKind.EXIT or (action.kind is not ActionKind.LOCAL
                                              and not is_lossless(str(action.codec)))


def _codecs_at(table: CostTable, split: str, raw: CodecCost) -> list[CodecCost]:
    found = [c for c in table.codecs if c.split == split]
    return found if any(c.codec == "fp32" for c in found) else [raw] + found


def _acc(codec: CodecCost, full: float | None) -> float | None:
    if codec.accuracy is not None:
        return codec.accuracy
    return full if is_lossless(codec.codec) else None
