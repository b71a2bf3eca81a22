"""The torch.export path: models torch.fx cannot trace (Hugging Face transformers, code with
Python control flow on shapes) become an ATen graph with a dynamic batch dimension.

An exported model is stored in a bundle as ``model.pt2`` (``torch.export.save``): the bundle is
self-contained, the cloud needs no user code to rebuild it. :func:`load_graph` turns the
program into a plain ``fx.GraphModule`` that :class:`~tether.partitioner.splits.SplitGraph`
cuts like a traced one; split points are named after the module whose output crosses
(``nn_module_stack``). Values that depend on the input only through its batch size (masks,
position ids) are recomputed on each side of a cut, so they never cross.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from tether.core.errors import BundleError, ModelError, NotTraceableError

SYM_SIZE = torch.ops.aten.sym_size.int
PROGRAM_FILE = "model.pt2"
MAX_BATCH = 4096
EXPORTED_FLAG = "_tether_exported"


def export_program(module: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export`` ``module`` (eval) with a dynamic batch dimension; NotTraceableError
    naming the cause when the exporter refuses it."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    x2 = torch.cat([example, example], 0)      # batch 2: avoids specialising on size 1
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (x2,), dynamic_shapes=({0: batch},),
                                       strict=False)
    except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependent...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotTraceableError(
            f"torch.export cannot capture {type(module).__name__} with a dynamic batch: "
            f"{type(exc).__name__}: {first}. Make forward() free of data-dependent Python "
            f"control flow, or use the torch.fx path with --leaf for the offending "
            f"module") from exc


def graph_of(program: Any) -> fx.GraphModule:
    """A plain (eval-able) GraphModule of an exported program: one tensor in, one tensor out,
    node metadata (``val``, ``nn_module_stack``) kept."""
    stateful = program.module()
    graph = fx.Graph()
    out = graph.graph_copy(stateful.graph, {})
    if isinstance(out, (tuple, list)):
        if len(out) != 1:
            raise ModelError(f"the model returns {len(out)} values; the partitioner needs one "
                             f"tensor output (wrap it to return e.g. the logits)")
        out = out[0]
    graph.output(out)
    gm = fx.GraphModule(stateful, graph, class_name="Exported")
    setattr(gm, EXPORTED_FLAG, True)
    return gm.eval()


def is_exported(module: nn.Module) -> bool:
    return bool(getattr(module, EXPORTED_FLAG, False))


def save_program(program: Any, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    torch.export.save(program, str(tmp))
    tmp.replace(path)


def load_program(path: Path) -> Any:
    """Load ``model.pt2``. Note: like any model file, load only bundles you trust."""
    if not path.is_file():
        raise BundleError(f"bundle file {path} is missing: re-run `tether partition`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as exc:
        raise BundleError(f"cannot load the exported program {path}: {exc}") from exc


def symbol_of(node: fx.Node) -> str | None:
    """The batch symbol a ``sym_size`` node stands for (e.g. ``s77``)."""
    val = node.meta.get("val")
    return None if val is None else str(val)


def batch_dim(node: fx.Node, symbols: set[str]) -> int | None:
    """The dimension of ``node``'s tensor that carries one of ``symbols`` (the batch)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    for k, d in enumerate(val.shape):
        if str(d) in symbols:
            return k
    return None


def point_name(node: fx.Node, last_index: dict[str, int], index: int, prefix: str) -> str:
    """Outermost module (``nn_module_stack``) whose last computation is ``node``, containers
    giving way to their last child (as on the fx path); else the node name."""
    ends = [(path, str(kind)) for path, kind in _stack(node) if last_index.get(path) == index]
    plain = [path for path, kind in ends if not kind.endswith(_CONTAINERS)]
    for path in plain[:1] or [p for p, _ in ends[-1:]]:
        return path.removeprefix(prefix) or path
    return node.name


_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


def _stack(node: fx.Node) -> list[tuple[str, Any]]:
    """(module path, type) of the modules ``node`` ran inside, outermost first (the root and
    the exporter's own bookkeeping entries left out)."""
    return [(path, kind) for path, kind in (node.meta.get("nn_module_stack") or {}).values()
            if path and not path.startswith("_")]


def module_last_index(nodes: list[fx.Node]) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for path, _type in _stack(n):
            last[path] = i
    return last


def common_prefix(nodes: list[fx.Node]) -> str:
    """The wrapper prefix shared by every module path (``m.`` for a wrapped HF model)."""
    paths = [p for n in nodes for p, _ in _stack(n) if p != "normalize"]  # tether's own step
    if not paths:
        return ""
    first = min(paths, key=len)
    return first + "." if all(p == first or p.startswith(first + ".") for p in paths) else ""


def export_onnx_dynamo(module: nn.Module, example: torch.Tensor, path: Path,
                       outputs: list[str], input_name: str, opset: int) -> None:
    """ONNX export of an exported-graph module with the dynamo exporter (keeps the batch
    symbolic, which the TorchScript exporter would freeze)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    x2 = torch.cat([example[:1], example[:1]], 0)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (x2,), dynamo=True, input_names=[input_name],
                                    output_names=outputs, dynamic_shapes=({0: batch},),
                                    opset_version=max(opset, 18), verbose=False)
    program.save(str(path))


class _quiet:
    """Silence the dynamo exporter's progress prints."""

    def __enter__(self) -> None:
        import contextlib
        import logging
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
