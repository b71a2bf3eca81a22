"""Per-split-point profiling: head on ONNX Runtime, tail in torch, bytes, params and FLOPs."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from tether.core.types import CostTable, SplitCost, TensorSpec
from tether.partitioner.onnxrt import INPUT_NAME, OnnxModule, export_onnx
from tether.partitioner.splits import SplitGraph, SplitPoint

log = logging.getLogger(__name__)


def example_input(spec: TensorSpec, seed: int = 0) -> torch.Tensor:
    """A deterministic float input in [0, 1] of ``spec``'s shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(spec.shape, generator=gen)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _FlopInterpreter(fx.Interpreter):
    """Runs the graph once, counting FLOPs node by node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        counter = FlopCounterMode(display=False)
        with counter:
            out = super().run_node(n)
        self.flops[n] = int(counter.get_total_flops())
        return out


def split_flops(graph: SplitGraph, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """``{split name: (head FLOPs, tail FLOPs)}`` for one pass of ``example``."""
    interp = _FlopInterpreter(graph.gm)
    with torch.no_grad():
        interp.run(example)
    total = sum(interp.flops.values())
    out = {}
    for p in graph.points:
        _, cut = graph.cut_of(p.name)
        head = sum(interp.flops.get(n, 0) for n in graph.nodes[: cut + 1])
        out[p.name] = (head, total - head)
    return out


def pareto_front(points: list[SplitPoint], head_flops: dict[str, int]) -> list[str]:
    """Points that can ever be the best choice: a point with at least the head FLOPs and at
    least the bytes of another point never wins (on exact ties the later, outer one is kept)."""
    keep = []
    for j, pj in enumerate(points):
        fj = head_flops[pj.name]
        dominated = False
        for i, pi in enumerate(points):
            fi = head_flops[pi.name]
            if i == j or fi > fj or pi.bytes > pj.bytes:
                continue
            if fi < fj or pi.bytes < pj.bytes or i > j:
                dominated = True
                break
        if not dominated:
            keep.append(pj.name)
    return keep


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _profile_point(graph: SplitGraph, point: SplitPoint, example: torch.Tensor, onnx_path: Path,
                   flops: tuple[int, int], opts: dict[str, int]) -> SplitCost:
    head, tail = graph.split(point.name)
    if not onnx_path.is_file():
        export_onnx(head, example, onnx_path)
    session = OnnxModule(onnx_path, threads=opts["threads"])
    x = example.numpy()
    with torch.no_grad():
        crossing = head(example)
        head_s = median_seconds(lambda: session(x), opts["repeats"], opts["warmup"])
        tail_s = median_seconds(lambda: tail(crossing), opts["repeats"], opts["warmup"])
    entry = point.to_entry()
    return SplitCost(name=point.name, index=point.index, shape=entry.shape, dtype=point.dtype,
                     bytes=entry.bytes, head_seconds=head_s, tail_seconds=tail_s,
                     head_flops=flops[0], tail_flops=flops[1],
                     head_params=_params(head), tail_params=_params(tail))


def profile_graph(graph: SplitGraph, example: torch.Tensor, model_id: str, *,
                  head_onnx: dict[str, Path] | None = None, full_onnx: Path | None = None,
                  threads: int = 1, cloud_threads: int | None = None, repeats: int = 20,
                  warmup: int = 3, progress: bool = True,
                  only: list[str] | None = None) -> CostTable:
    """Profile every split point of ``graph`` (or those in ``only``; batch 1) into a
    :class:`CostTable`.

    Heads run on ONNX Runtime with ``threads``, tails in torch with ``cloud_threads``
    (default: ``threads``). Heads without a file in ``head_onnx`` are exported to a temp dir.
    """
    opts = {"threads": threads, "cloud_threads": cloud_threads or threads,
            "repeats": repeats, "warmup": warmup}
    previous = torch.get_num_threads()
    torch.set_num_threads(opts["cloud_threads"])
    try:
        points = [p for p in graph.points if only is None or p.name in only]
        return _profile_all(graph, points, example, model_id, head_onnx or {}, full_onnx, opts,
                            progress)
    finally:
        torch.set_num_threads(previous)


def _profile_all(graph: SplitGraph, points: list[SplitPoint], example: torch.Tensor, model_id: str,
                 head_onnx: dict[str, Path], full_onnx: Path | None, opts: dict[str, int],
                 progress: bool) -> CostTable:
    from tqdm import tqdm

    flops = split_flops(graph, example)
    with tempfile.TemporaryDirectory(prefix="tether-profile-") as tmp:
        missing = [p.name for p in points if p.name not in head_onnx]
        head_onnx = {**head_onnx, **extract_heads(graph, missing, example, Path(tmp))}
        costs = []
        bar = tqdm(points, desc=f"profiling {model_id}", unit="split",
                   disable=not progress, leave=False)
        for p in bar:
            path = head_onnx.get(p.name) or Path(tmp) / f"{p.index}.onnx"
            costs.append(_profile_point(graph, p, example, path, flops[p.name], opts))
        edge_full, cloud_full = _full_latency(graph, example, full_onnx, Path(tmp), opts)
    return CostTable(model_id=model_id, input=TensorSpec(tuple(example.shape)),
                     edge_full_seconds=edge_full, cloud_full_seconds=cloud_full,
                     splits=tuple(costs), meta=_meta(opts))


def extract_heads(graph: SplitGraph, names: list[str], example: torch.Tensor,
                  out_dir: Path) -> dict[str, Path]:
    """ONNX heads for ``names`` cut out of one multi-output export of the whole graph (far
    faster than one export per head on big models). For timing only; shipped heads are
    exported one by one and verified. Returns {} when the exporter cannot do it."""
    if not names:
        return {}
    import onnx

    graph_out = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    graph_out.graph_copy(graph.gm.graph, values)
    outputs = []
    for name in names:
        node = values[graph.cut_of(name)[0]]
        with graph_out.inserting_after(node):  # snapshot before any later in-place op
            outputs.append(graph_out.call_method("clone", (node,)))
    graph_out.output(tuple(outputs))
    labels = [f"split_{graph.point(n).index}" for n in names]
    try:
        path = export_onnx(fx.GraphModule(graph.gm, graph_out), example, out_dir / "all.onnx",
                           output_names=labels)
        extractor = onnx.utils.Extractor(onnx.load(str(path)))
        found = {}
        for name, label in zip(names, labels):
            found[name] = out_dir / f"{label}.onnx"
            onnx.save(extractor.extract_model([INPUT_NAME], [label]), str(found[name]))
        return found
    except Exception as exc:  # fall back to exporting each head on its own
        log.warning("multi-output ONNX export failed (%s); exporting heads one by one", exc)
        return {}


def _full_latency(graph: SplitGraph, example: torch.Tensor, full_onnx: Path | None,
                  tmp: Path, opts: dict[str, int]) -> tuple[float, float]:
    path = full_onnx if full_onnx and full_onnx.is_file() else export_onnx(
        graph.module, example, tmp / "full.onnx")
    session = OnnxModule(path, threads=opts["threads"])
    x = example.numpy()
    with torch.no_grad():
        edge = median_seconds(lambda: session(x), opts["repeats"], opts["warmup"])
        cloud = median_seconds(lambda: graph.module(example), opts["repeats"], opts["warmup"])
    return edge, cloud


def _meta(opts: dict[str, int]) -> dict[str, Any]:
    import onnxruntime

    return {"edge_backend": "onnxruntime", "edge_threads": opts["threads"],
            "cloud_backend": "torch", "cloud_threads": opts["cloud_threads"],
            "repeats": opts["repeats"], "warmup": opts["warmup"], "statistic": "median",
            "batch": 1, "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def format_cost_table(table: CostTable, exported: set[str] | None = None) -> str:
    """Split table: name, shape, bytes, head ms, tail ms, FLOPs (``*``: ONNX head exported)."""
    exported = exported or set()
    width = max([len(s.name) for s in table.splits] + [10]) + 2
    lines = [f"{'split':<{width}}{'shape':<18}{'bytes':>10}{'head ms':>10}{'tail ms':>10}"
             f"{'head MFLOP':>12}{'tail MFLOP':>12}  onnx"]
    for s in table.splits:
        shape = "x".join(str(d) for d in s.shape[1:])
        lines.append(f"{s.name:<{width}}{shape:<18}{s.bytes:>10}{s.head_seconds * 1e3:>10.3f}"
                     f"{s.tail_seconds * 1e3:>10.3f}{s.head_flops / 1e6:>12.2f}"
                     f"{s.tail_flops / 1e6:>12.2f}  {'*' if s.name in exported else ''}")
    lines.append(f"full model: edge (ONNX Runtime, {table.meta.get('edge_threads', '?')} thr) "
                 f"{table.edge_full_seconds * 1e3:.3f} ms, cloud (torch) "
                 f"{table.cloud_full_seconds * 1e3:.3f} ms; input {list(table.input.shape)} "
                 f"{table.input.nbytes} bytes")
    return "\n".join(lines)
