"""Split-point discovery and head/tail construction on a torch.fx graph.

A split point is a position in the traced graph (in topological order) after which
exactly one tensor produced by the first part is still needed by the rest. Parameters
and other values that do not depend on the input are not "crossing": each part keeps
its own copy. Residual blocks and branches therefore stay inside one part.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from tether.core.bundle import SplitEntry
from tether.core.errors import InputShapeError, ModelError, NotTraceableError, SplitError
from tether.core.types import DTYPE_SIZES
from tether.partitioner import exported as ex
from tether.partitioner.models import Normalize

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}


@dataclass(frozen=True)
class SplitPoint:
    """One valid cut: the crossing tensor's producer, shape and size for the example input."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    node: str          # fx node name of the crossing tensor

    def to_entry(self, head: str | None = None, batch1: bool = True) -> SplitEntry:
        """The bundle manifest entry (shape and bytes rescaled to batch 1)."""
        shape, nbytes = self.shape, self.bytes
        if batch1 and shape and shape[0] not in (0, 1):
            nbytes, shape = nbytes // shape[0], (1,) + shape[1:]
        return SplitEntry(self.name, self.index, shape, self.dtype, nbytes, head)


class _Tracer(fx.Tracer):
    """fx tracer that records module calls, the output node of each, and the failing module."""

    def __init__(self, leaf_modules: Iterable[str | type] = ()) -> None:
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = (Normalize,) + tuple(m for m in leaf_modules if isinstance(m, type))
        self.calls: Counter[str] = Counter()
        self.ends: dict[fx.Node, list[tuple[str, nn.Module]]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        qualname = self.path_of_module(m)
        self.calls[qualname] += 1
        try:
            out = super().call_module(m, forward, args, kwargs)
        except NotTraceableError:
            raise
        except Exception as exc:
            raise NotTraceableError(_untraceable_message(qualname, m, exc)) from exc
        if isinstance(out, fx.Proxy):
            self.ends.setdefault(out.node, []).append((qualname, m))
        return out


def _untraceable_message(qualname: str, m: nn.Module, exc: Exception) -> str:
    cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not qualname:     # the root's own forward(): no module to mark as a leaf
        return (f"torch.fx cannot trace the forward() of the root module "
                f"({type(m).__name__}): {cause}. Use the torch.export path (CLI: --method "
                f"export; Python: method='export'), or remove data-dependent Python control "
                f"flow from its forward()")
    return (f"torch.fx cannot trace module {qualname!r} ({type(m).__name__}): {cause}. "
            f"Mark it as a leaf so it runs as one opaque step: "
            f"leaf_modules=[{qualname!r}] (CLI: --leaf {qualname}), use the torch.export path "
            f"(--method export), or remove data-dependent Python control flow from its "
            f"forward()")


def trace(module: nn.Module,
          leaf_modules: Iterable[str | type] = ()) -> tuple[fx.GraphModule, _Tracer]:
    """Symbolically trace ``module``; untraceable code raises :class:`NotTraceableError`."""
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(module)
    except NotTraceableError:
        raise
    except Exception as exc:
        raise NotTraceableError(_untraceable_message("", module, exc)) from exc
    return fx.GraphModule(module, graph, class_name=type(module).__name__), tracer


class SplitGraph:
    """A traced model with its split points; builds head/tail pairs from one trace.

    ``module`` is traced with torch.fx, unless it is a graph from the torch.export path
    (:func:`tether.partitioner.exported.graph_of`), which is cut as it is.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor,
                 leaf_modules: Iterable[str | type] = ()) -> None:
        self.module = module
        leaf_modules = list(leaf_modules)
        self.leaf_modules = tuple(m for m in leaf_modules if isinstance(m, str))
        self.exported = ex.is_exported(module)
        if self.exported:
            self.gm, self._tracer = module, None
        else:
            self.gm, self._tracer = trace(module, leaf_modules)
        self.nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ModelError(f"{type(module).__name__}.forward takes {len(placeholders)} inputs; "
                             f"the partitioner supports models with exactly one tensor input")
        self._input = placeholders[0]
        self._module_names = {name for name, _ in module.named_modules()}
        _propagate_shapes(self.gm, example, type(module).__name__)
        self._depends = _input_dependence(self.nodes, self.exported)
        self._symbols = {ex.symbol_of(n) for n in self.nodes if _is_sym_size(n)} - {None}
        self._cuts: dict[str, tuple[fx.Node, int]] = {}
        self.points = self._find_points()

    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def point(self, name: str) -> SplitPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise SplitError(f"unknown split point {name!r}; valid split points: {self.names()}")

    def cut_of(self, name: str) -> tuple[fx.Node, int]:
        """The crossing node of split ``name`` and the graph position the cut follows."""
        self.point(name)
        return self._cuts[name]

    def split(self, name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
        """Head (input -> crossing tensor) and tail (crossing tensor -> output) modules."""
        self.point(name)
        node, cut = self._cuts[name]
        return self._head(node, cut), self._tail(node, cut)

    def _find_points(self) -> list[SplitPoint]:
        pos = {n: i for i, n in enumerate(self.nodes)}
        last_use = {n: max((pos[u] for u in n.users), default=-1) for n in self.nodes}
        live: set[fx.Node] = set()
        dying: dict[int, list[fx.Node]] = {}
        found: list[tuple[fx.Node, int]] = []
        for i, n in enumerate(self.nodes[:-1]):
            if self._depends[n] and last_use[n] > i:
                live.add(n)
                dying.setdefault(last_use[n], []).append(n)
            live.difference_update(dying.pop(i, ()))
            if len(live) == 1:
                (p,) = live
                if self._is_cut(p) and all(p is not q for q, _ in found):
                    found.append((p, i))
        return self._name_points(found)

    def _is_cut(self, p: fx.Node) -> bool:
        meta = p.meta.get("tensor_meta")
        only_output = all(u.op == "output" for u in p.users)
        if self._symbols and ex.batch_dim(p, self._symbols) is None:
            return False       # the tail could not recompute batch-size-derived values
        return p.op != "placeholder" and isinstance(meta, TensorMetadata) and not only_output

    def _name_points(self, found: list[tuple[fx.Node, int]]) -> list[SplitPoint]:
        points: list[SplitPoint] = []
        used: set[str] = set()
        if self.exported:
            last, prefix = ex.module_last_index(self.nodes), ex.common_prefix(self.nodes)
            pos = {n: i for i, n in enumerate(self.nodes)}
        for p, cut in found:
            name = ex.point_name(p, last, pos[p], prefix) if self.exported else self._name_of(p)
            if name in used:
                name = p.name
            used.add(name)
            meta = p.meta["tensor_meta"]
            dtype = str(meta.dtype).removeprefix("torch.")
            shape = tuple(int(d) for d in meta.shape)
            nbytes = int(torch.Size(shape).numel()) * DTYPE_SIZES.get(dtype, meta.dtype.itemsize)
            points.append(SplitPoint(name, len(points), shape, dtype, nbytes, p.name))
            self._cuts[name] = (p, cut)
        return points

    def _name_of(self, p: fx.Node) -> str:
        """Outermost module called once whose output is ``p`` (containers give way to their
        last child); the fx node name when no such module exists."""
        candidates = [(q, m) for q, m in self._tracer.ends.get(p, []) if self._tracer.calls[q] == 1]
        plain = [q for q, m in candidates if type(m) not in _CONTAINERS]
        if plain:
            return plain[-1]
        if candidates:
            return candidates[-1][0]
        # fx names the first call of a reused module after the module itself: disambiguate
        return f"{p.name}_0" if p.name in self._module_names else p.name

    def _copier(self, graph: fx.Graph, env: dict[fx.Node, fx.Node],
                crossing: tuple[fx.Node, fx.Node] | None = None) -> Any:
        """Map an original node to the new graph, copying input-free nodes on demand (in a
        tail, batch sizes of head-side tensors are read from the ``crossing`` tensor)."""
        def lookup(n: fx.Node) -> fx.Node:
            if n not in env:
                if self._depends[n]:
                    raise SplitError(f"internal: {n.name} crosses the cut but is not the split")
                source = n.args[0] if _is_sym_size(n) else None
                if crossing is not None and isinstance(source, fx.Node) \
                        and self._depends[source] and source not in env:
                    dim = ex.batch_dim(crossing[0], {ex.symbol_of(n)})
                    if dim is None:
                        raise SplitError(f"internal: the tail cannot recover {n.name}")
                    env[n] = graph.call_function(ex.SYM_SIZE, (crossing[1], dim))
                else:
                    env[n] = graph.node_copy(n, lookup)
            return env[n]
        return lookup

    def _head(self, p: fx.Node, cut: int) -> fx.GraphModule:
        graph = fx.Graph()
        env = {self._input: graph.placeholder(self._input.name)}
        lookup = self._copier(graph, env)
        for n in self.nodes[: cut + 1]:
            if self._depends[n] and n not in env:
                env[n] = graph.node_copy(n, lookup)
        graph.output(env[p])
        return _module(self.gm, graph, "Head")

    def _tail(self, p: fx.Node, cut: int) -> fx.GraphModule:
        graph = fx.Graph()
        env = {p: graph.placeholder(p.name)}
        if any(self._mutates(u) for u in p.users):  # never write into the caller's tensor
            env[p] = graph.call_method("clone", (env[p],))
        lookup = self._copier(graph, env, (p, env[p]))
        for n in self.nodes[cut + 1:]:
            if n.op == "output":
                graph.output(fx.map_arg(n.args[0], lookup))
            elif self._depends[n]:
                env[n] = graph.node_copy(n, lookup)
        return _module(self.gm, graph, "Tail")

    def _mutates(self, n: fx.Node) -> bool:
        """Whether ``n`` may write into its inputs (in-place module, function or method)."""
        if n.kwargs.get("inplace"):
            return True
        if n.op == "call_module":
            return bool(getattr(self.gm.get_submodule(str(n.target)), "inplace", False))
        if n.op == "call_function" and n.target in _INPLACE_OPERATORS:
            return True
        name = getattr(n.target, "__name__", str(n.target))
        return n.op in ("call_method", "call_function") and name.endswith("_") \
            and not name.startswith("_")


def _module(root: fx.GraphModule, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    gm = fx.GraphModule(root, graph, class_name=class_name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if ex.is_exported(root):
        setattr(gm, ex.EXPORTED_FLAG, True)
    return gm.eval()


def _is_sym_size(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is ex.SYM_SIZE


def _input_dependence(nodes: list[fx.Node], exported: bool = False) -> dict[fx.Node, bool]:
    """Whether each node depends on the input's values (in exported graphs, a batch size read
    with ``sym_size`` is not a dependence: each side recomputes it)."""
    depends: dict[fx.Node, bool] = {}
    for n in nodes:
        if exported and _is_sym_size(n):
            depends[n] = False
            continue
        depends[n] = n.op == "placeholder" or any(depends[a] for a in n.all_input_nodes)
    return depends


def _propagate_shapes(gm: fx.GraphModule, example: torch.Tensor, model_name: str) -> None:
    if not isinstance(example, torch.Tensor):
        raise InputShapeError(f"example input must be a tensor, got {type(example).__name__}")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # shape errors surface as RuntimeError/AssertionError/ValueError
        raise InputShapeError(
            f"{model_name} cannot run on an input of shape {tuple(example.shape)}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            f"pass a shape the model accepts (e.g. --input-shape 1,3,224,224)") from exc


def find_split_points(module: nn.Module, example: torch.Tensor,
                      leaf_modules: Iterable[str | type] = ()) -> list[SplitPoint]:
    """Every valid split point of ``module`` for ``example``, ordered input -> output."""
    return SplitGraph(module, example, leaf_modules).points


def split_at(module: nn.Module, example: torch.Tensor, name: str,
             leaf_modules: Iterable[str | type] = ()) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``(head, tail)`` with ``tail(head(x)) == module(x)``; unknown names raise SplitError."""
    return SplitGraph(module, example, leaf_modules).split(name)
