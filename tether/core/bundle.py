"""The bundle manifest: the one file every component reads to know what a bundle holds.

A bundle is a directory::

    manifest.json      this schema (written last, atomically: its presence means complete)
    costs.json         the cost table (tether.core.types.CostTable)
    model.pt           full-model state dict (the cloud builds any tail from it)
    heads/<split>.onnx ONNX heads (dynamic batch) for the selected split points
    heads/full.onnx    the whole model, for local answers on the edge
    codecs/...         learned codec weights (written by tether.codecs)
    exits/...          early-exit heads (written by tether.codecs)

Paths in the manifest are relative to the bundle directory. Writers in different
packages (partitioner, codecs) extend it through :meth:`Manifest.save`; nobody imports
another component to read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tether.core.config import from_mapping
from tether.core.errors import BundleError, ConfigError, SplitError
from tether.core.types import TensorSpec, read_json, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "tether-bundle"
VERSION = 1


@dataclass(frozen=True)
class SplitEntry:
    name: str
    index: int
    shape: tuple[int, ...]      # crossing tensor, batch 1
    dtype: str
    bytes: int
    head: str | None = None     # relative path of the ONNX head, if exported


@dataclass(frozen=True)
class CodecEntry:
    split: str                  # split point name, or "input" for input codecs
    codec: str                  # codec id as used on the wire, e.g. "bottleneck-b0.01"
    kind: str                   # "fp16", "int8", "bottleneck", ...
    params: dict[str, Any] = field(default_factory=dict)   # weights paths, rate, ...


@dataclass(frozen=True)
class ExitEntry:
    split: str
    path: str                   # relative path of the exit head weights / ONNX
    threshold: float
    metric: str = "max_softmax"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    model_id: str               # e.g. "cifar_resnet20", "resnet18"
    fingerprint: str            # sha256 of the weights (what the cloud and edge must agree on)
    input: TensorSpec
    split_points: tuple[SplitEntry, ...]
    source: dict[str, Any] = field(default_factory=dict)   # how to rebuild the model
    weights: str = "model.pt"
    full_onnx: str | None = "heads/full.onnx"
    cost_table: str | None = "costs.json"
    codecs: tuple[CodecEntry, ...] = ()
    exits: tuple[ExitEntry, ...] = ()
    preprocess: dict[str, Any] = field(default_factory=dict)  # mean/std, labels
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> SplitEntry:
        for entry in self.split_points:
            if entry.name == name:
                return entry
        raise SplitError(f"unknown split point {name!r}; valid split points: "
                         f"{[e.name for e in self.split_points]}")

    @property
    def split_names(self) -> list[str]:
        return [e.name for e in self.split_points]

    def with_codec(self, entry: CodecEntry) -> "Manifest":
        kept = tuple(c for c in self.codecs if (c.split, c.codec) != (entry.split, entry.codec))
        return replace(self, codecs=kept + (entry,))

    def with_exit(self, entry: ExitEntry) -> "Manifest":
        kept = tuple(e for e in self.exits if e.split != entry.split)
        return replace(self, exits=kept + (entry,))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION,
            "model_id": self.model_id, "fingerprint": self.fingerprint,
            "input": self.input.to_dict(), "source": self.source,
            "weights": self.weights, "full_onnx": self.full_onnx,
            "cost_table": self.cost_table, "preprocess": self.preprocess,
            "split_points": [_split_dict(e) for e in self.split_points],
            "codecs": [vars(c) | {} for c in self.codecs],
            "exits": [vars(e) | {} for e in self.exits],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        """Validate every field's type (errors name the field, e.g. ``split_points[0].shape``)."""
        if not isinstance(d, dict):
            raise BundleError(f"invalid bundle manifest: expected a JSON object, "
                              f"got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise BundleError(f"not a tether bundle manifest (format={d.get('format')!r:.60})")
        if type(d.get("version")) is not int or d.get("version") != VERSION:
            raise BundleError(f"bundle version {d.get('version')!r:.20} unsupported; this tether "
                              f"reads version {VERSION}: re-run `tether partition`")
        known = {f.name for f in fields(cls)}
        data = {"full_onnx": None, "cost_table": None} | {k: v for k, v in d.items() if k in known}
        try:
            return from_mapping(cls, data)
        except ConfigError as exc:
            raise BundleError(f"invalid bundle manifest: {exc}") from exc

    def save(self, bundle_dir: str | Path) -> None:
        write_json_atomic(Path(bundle_dir) / MANIFEST, self.to_dict())

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "Manifest":
        path = Path(bundle_dir) / MANIFEST
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is not a complete bundle: no {MANIFEST} "
                              f"(create one with `tether partition MODEL --out DIR`)")
        data = read_json(path)              # its errors name the file already
        try:
            return cls.from_dict(data)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from exc


def _split_dict(e: SplitEntry) -> dict[str, Any]:
    return {"name": e.name, "index": e.index, "shape": list(e.shape), "dtype": e.dtype,
            "bytes": e.bytes, "head": e.head}
