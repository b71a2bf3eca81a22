"""Bundle export (``tether partition``) and loading (:class:`BundleModel`).

The layout is the one documented in :mod:`tether.core.bundle`. A bundle is built in a
hidden sibling directory and renamed into place only when complete; the manifest is
written last, so a directory with ``manifest.json`` is always a whole bundle.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from tether import __version__
from tether.core.bundle import MANIFEST, Manifest
from tether.core.errors import (
    BundleError, InputShapeError, ModelError, NotTraceableError, SplitError, WeightsError,
)
from tether.core.types import CostTable, TensorSpec
from tether.partitioner.exported import (
    PROGRAM_FILE, export_program, graph_of, load_program, save_program,
)
from tether.partitioner.models import (
    LoadedModel, fingerprint, load_state, read_state_dict,
)
from tether.partitioner.sources import (
    REBUILDABLE, default_kind_is_rgb, image_contract, load_reference, rebuild, resolve_model,
)
from tether.partitioner.onnxrt import OPSET, OnnxModule, check_onnx_matches, export_onnx
from tether.partitioner.profile import example_input, pareto_front, profile_graph, split_flops
from tether.partitioner.splits import SplitGraph

log = logging.getLogger(__name__)
HEADS = "heads"
FULL_ONNX = "heads/full.onnx"


def input_spec(shape: Sequence[int] | None, default: TensorSpec, rgb: bool = True) -> TensorSpec:
    """Validated batch-1 input spec from ``N,C,H,W`` (the batch is dynamic in the heads);
    ``rgb=False`` (user and Hugging Face models) accepts any rank and channel count."""
    if shape is None:
        return default
    shape = tuple(int(d) for d in shape)
    if not rgb:
        if len(shape) < 1 or min(shape) < 1:
            raise InputShapeError(f"input shape {shape} needs positive sizes, batch first")
        return TensorSpec((1,) + shape[1:], default.dtype)
    if len(shape) != 4 or min(shape) < 1:
        raise InputShapeError(f"input shape {shape} is not N,C,H,W with positive sizes")
    if shape[1] != 3:
        raise InputShapeError(f"input shape {shape} has {shape[1]} channels; models take RGB "
                              f"input: use N,3,H,W (e.g. {list(default.shape)})")
    return TensorSpec((1,) + shape[1:])


ModelLike = Union[str, nn.Module, LoadedModel]


def export_bundle(model: ModelLike, out_dir: str | Path, weights: str | Path | None = None,
                  splits: Sequence[str] | None = None, *, input_shape: Sequence[int] | None = None,
                  example: torch.Tensor | None = None, leaf_modules: Iterable[str] = (),
                  method: str = "auto", normalize: Any = "default", source: str | None = None,
                  threads: int = 1, cloud_threads: int | None = None, repeats: int = 20,
                  warmup: int = 3, rounds: int = 3, progress: bool = True,
                  overwrite: bool = False, profile_all: bool = True) -> Manifest:
    """Partition ``model`` and write a complete bundle to ``out_dir``; returns its manifest.

    ``model``: a model spec (zoo name, ``pkg.mod:attr``, ``file.py:attr``, ``hf:DIR``), an
    ``nn.Module`` (with ``example`` or ``input_shape``; ``source="pkg.mod:attr"`` lets the
    cloud rebuild it from code) or a :class:`LoadedModel`. ``method``: ``fx``, ``export``
    (torch.export, self-contained ``model.pt2``) or ``auto`` (fx when the model can be rebuilt
    from code and traces, else export). ``splits``: names of the points to export ONNX heads
    for, ``["all"]``, or None for the Pareto front of head FLOPs vs bytes crossing.
    ``profile_all=False`` profiles only those.
    """
    if method not in METHODS:
        raise ModelError(f"method {method!r}: use one of {list(METHODS)}")
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    loaded = _loaded(model, weights, normalize, source)
    spec = input_spec(input_shape, loaded.input, rgb=default_kind_is_rgb(loaded.source))
    if example is not None:
        spec = TensorSpec((1, *example.shape[1:]), str(example.dtype).removeprefix("torch."))
    example = example[:1] if example is not None else example_input(spec)
    graph, program = _graph(loaded, example, list(leaf_modules), method)
    flops = split_flops(graph, example)
    selected = _select(graph, splits, {k: v[0] for k, v in flops.items()})
    profile = {"threads": threads, "cloud_threads": cloud_threads, "repeats": repeats,
               "warmup": warmup, "rounds": rounds, "progress": progress,
               "only": None if profile_all else selected}
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        manifest = _write_bundle(tmp, loaded, spec, graph, program, example, selected, profile)
        manifest = replace(manifest, extra={**manifest.extra, "selection": (
            "pareto" if splits is None else "all" if list(splits) == ["all"] else "explicit")})
        manifest.save(tmp)  # last: its presence marks the bundle complete
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


METHODS = ("auto", "fx", "export")


def _loaded(model: ModelLike, weights: str | Path | None, normalize: Any,
            source: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return resolve_model(model, weights, normalize)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, a LoadedModel or a model spec "
                         f"string, got {type(model).__name__}")
    if source is not None:               # rebuildable from code: check it is the same model
        loaded = load_reference(source, None, normalize)
        load_state(loaded.module, model.state_dict(), origin=f"the {type(model).__name__} passed")
        return replace(loaded, fingerprint=fingerprint(loaded.module))
    model.eval()
    src = {"model_id": type(model).__name__.lower(), "kind": "object",
           "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    return LoadedModel(module=model, input=TensorSpec((1, 3, 224, 224)), source=src,
                       fingerprint=fingerprint(model), preprocess=image_contract(None))


def _graph(loaded: LoadedModel, example: torch.Tensor, leaves: list[str],
           method: str) -> tuple[SplitGraph, Any]:
    """The split graph, by torch.fx or torch.export (then also the exported program)."""
    rebuildable = loaded.source.get("kind") in REBUILDABLE
    if method == "fx" and not rebuildable:
        raise ModelError(f"method 'fx' needs a model the cloud can rebuild from code (a zoo "
                         f"name or pkg.module:attr / file.py:attr, or source=...); "
                         f"{loaded.source.get('kind')} models use method 'export'")
    if method == "fx" or (method == "auto" and rebuildable):
        try:
            return SplitGraph(loaded.module, example, leaves), None
        except NotTraceableError as exc:
            if method == "fx" or leaves:
                raise
            log.info("torch.fx cannot trace %s (%s); using torch.export",
                     loaded.source.get("model_id"), exc)
    program = export_program(loaded.module, example)
    return SplitGraph(graph_of(program), example), program


def _write_bundle(tmp: Path, loaded: LoadedModel, spec: TensorSpec, graph: SplitGraph,
                  program: Any, example: torch.Tensor, selected: list[str],
                  profile: dict[str, Any]) -> Manifest:
    """Write heads, weights and costs into ``tmp``; return the manifest (not yet saved)."""
    heads = _write_heads(graph, example, selected, tmp)
    source = {**loaded.source, "leaf_modules": list(graph.leaf_modules),
              "graph": "export" if program is not None else "fx"}
    if program is not None:
        save_program(program, tmp / PROGRAM_FILE)
        weights, fp = PROGRAM_FILE, fingerprint(graph.module)
    else:
        torch.save(loaded.module.state_dict(), tmp / "model.pt")
        weights, fp = "model.pt", loaded.fingerprint
    table = profile_graph(graph, example, loaded.source["model_id"], head_onnx=heads,
                          full_onnx=tmp / FULL_ONNX, **profile)
    table.save(tmp / "costs.json")
    return Manifest(
        model_id=loaded.source["model_id"], fingerprint=fp, input=spec,
        split_points=tuple(p.to_entry(f"{HEADS}/{p.name}.onnx" if p.name in heads else None)
                           for p in graph.points),
        source=source, preprocess=loaded.preprocess, weights=weights,
        extra={"tether_version": __version__, "onnx_opset": OPSET, "torch": torch.__version__})


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"--out {out_dir} is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file() \
            and not overwrite:
        raise BundleError(f"--out {out_dir} is a non-empty directory that is not a tether bundle; "
                          f"choose another path or pass --force to replace it")


def _select(graph: SplitGraph, splits: Sequence[str] | None,
            head_flops: dict[str, int]) -> list[str]:
    if splits is None:
        return pareto_front(graph.points, head_flops)
    if list(splits) == ["all"]:
        return graph.names()
    for name in splits:
        graph.point(name)  # SplitError listing the valid names
    return list(dict.fromkeys(splits))


def _write_heads(graph: SplitGraph, example: torch.Tensor, selected: list[str],
                 root: Path) -> dict[str, Path]:
    heads = {}
    for name in selected:
        head, _ = graph.split(name)
        path = export_onnx(head, example, root / HEADS / f"{name}.onnx")
        check_onnx_matches(path, head, example)
        heads[name] = path
    full = export_onnx(graph.module, example, root / FULL_ONNX)
    check_onnx_matches(full, graph.module, example)
    return heads


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        if (out_dir / MANIFEST).is_file():
            log.info("replacing the existing bundle in %s", out_dir)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class BundleModel:
    """A loaded bundle: manifest, torch full model / heads / tails (cached), ONNX paths, costs."""

    def __init__(self, bundle_dir: Path, manifest: Manifest) -> None:
        self.dir = bundle_dir
        self.manifest = manifest
        self._full: nn.Module | None = None
        self._graph: SplitGraph | None = None
        self._parts: dict[str, tuple[nn.Module, nn.Module]] = {}
        self._lock = threading.RLock()  # the cloud builds tails from several threads

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "BundleModel":
        bundle_dir = Path(bundle_dir)
        return cls(bundle_dir, Manifest.load(bundle_dir))

    def example(self) -> torch.Tensor:
        return example_input(self.manifest.input)

    def __repr__(self) -> str:
        return (f"Bundle({str(self.dir)!r}, model={self.manifest.model_id!r}, "
                f"splits={self.manifest.split_names})")

    def full_model(self) -> nn.Module:
        """The whole model (eval), rebuilt from its source and ``model.pt``; fingerprint checked."""
        with self._lock:
            if self._full is None:
                self._full = self._load_full()
        return self._full

    def _load_full(self) -> nn.Module:
        path = self.dir / self.manifest.weights
        if self.manifest.source.get("graph") == "export":
            module = graph_of(load_program(path))
        else:
            module = rebuild(self.manifest.source, self.manifest.model_id)
            try:
                load_state(module, read_state_dict(path), origin=str(path))
            except WeightsError as exc:
                raise BundleError(f"bundle {self.dir} has bad weights: {exc}") from exc
        got = fingerprint(module)
        if got != self.manifest.fingerprint:
            raise BundleError(f"bundle {self.dir}: {self.manifest.weights} fingerprint {got[:12]} "
                              f"does not match the manifest's {self.manifest.fingerprint[:12]}; "
                              f"re-run `tether partition`")
        return module

    def split_graph(self) -> SplitGraph:
        with self._lock:
            return self._split_graph()

    def _split_graph(self) -> SplitGraph:
        if self._graph is None:
            leaves = self.manifest.source.get("leaf_modules", [])
            graph = SplitGraph(self.full_model(), self.example(), leaves)
            if graph.names() != self.manifest.split_names:
                raise BundleError(f"bundle {self.dir}: split points of the rebuilt model differ "
                                  f"from the manifest (other torch/tether version?); "
                                  f"re-run `tether partition`")
            self._graph = graph
        return self._graph

    def _pair(self, split: str) -> tuple[nn.Module, nn.Module]:
        self.manifest.split(split)
        with self._lock:
            if split not in self._parts:
                self._parts[split] = self.split_graph().split(split)
            return self._parts[split]

    def head(self, split: str) -> nn.Module:
        return self._pair(split)[0]

    def tail(self, split: str) -> nn.Module:
        return self._pair(split)[1]

    @property
    def exported_splits(self) -> list[str]:
        return [e.name for e in self.manifest.split_points if e.head]

    def head_onnx_path(self, split: str) -> Path:
        entry = self.manifest.split(split)
        if not entry.head:
            raise SplitError(f"split point {split!r} has no ONNX head in bundle {self.dir}; "
                             f"exported: {self.exported_splits} (re-run `tether partition "
                             f"--splits ...` to add it)")
        return self.dir / entry.head

    def full_onnx_path(self) -> Path:
        if not self.manifest.full_onnx:
            raise BundleError(f"bundle {self.dir} has no full-model ONNX file")
        return self.dir / self.manifest.full_onnx

    def onnx_head(self, split: str, threads: int = 1) -> OnnxModule:
        return OnnxModule(self.head_onnx_path(split), threads=threads)

    def cost_table(self, exported_only: bool = True) -> CostTable:
        """The profiled costs of the points this bundle can run on the edge (those with an ONNX
        head); ``exported_only=False`` gives every profiled point, as in ``costs.json``."""
        if not self.manifest.cost_table:
            raise BundleError(f"bundle {self.dir} has no cost table: "
                              f"run `tether profile {self.dir}`")
        table = CostTable.load(self.dir / self.manifest.cost_table)
        if exported_only:
            keep = set(self.exported_splits)
            table = replace(table, splits=tuple(s for s in table.splits if s.name in keep))
        return table


def profile_bundle(bundle_dir: str | Path, *, threads: int = 1, cloud_threads: int | None = None,
                   repeats: int = 20, warmup: int = 3, rounds: int = 3, progress: bool = True,
                   profile_all: bool = True) -> CostTable:
    """Re-profile a bundle and rewrite its cost table, keeping codec/exit/accuracy entries
    (``profile_all=False``: only the points with an ONNX head)."""
    bundle = BundleModel.load(bundle_dir)
    graph = bundle.split_graph()
    heads = {name: bundle.head_onnx_path(name) for name in bundle.exported_splits}
    table = profile_graph(graph, bundle.example(), bundle.manifest.model_id, head_onnx=heads,
                          full_onnx=bundle.full_onnx_path(), threads=threads,
                          cloud_threads=cloud_threads, repeats=repeats, warmup=warmup,
                          rounds=rounds, progress=progress,
                          only=None if profile_all else list(heads))
    path = bundle.dir / (bundle.manifest.cost_table or "costs.json")
    if path.is_file():
        old = CostTable.load(path)
        table = replace(table, codecs=old.codecs, exits=old.exits,
                        full_accuracy=old.full_accuracy, meta={**old.meta, **table.meta})
    table.save(path)
    return table

