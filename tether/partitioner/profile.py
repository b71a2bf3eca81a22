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
    """A deterministic input of ``spec``: floats in [0, 1], integers (token ids) in [0, 100)."""
    gen = torch.Generator().manual_seed(seed)
    if spec.dtype.startswith(("int", "uint")):
        return torch.randint(0, 100, spec.shape, generator=gen, dtype=getattr(torch, spec.dtype))
    return torch.rand(spec.shape, generator=gen)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(sample_seconds(fn, repeats))


def sample_seconds(fn: Callable[[], Any], n: int) -> list[float]:
    times = []
    for _ in range(max(1, n)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


#: (p90 - p10) / median above this means the machine was busy while profiling
BUSY_SPREAD = 0.5
#: shorter measurements are dominated by timer and scheduler jitter: not judged
MIN_JUDGED_SECONDS = 5e-4


def summarize(times: list[float]) -> dict[str, float]:
    """median, p10, p90 and relative spread ``(p90 - p10) / median`` of timed samples."""
    ordered = sorted(times)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    median = statistics.median(ordered)
    return {"median": median, "p10": pct(0.1), "p90": pct(0.9), "n": len(ordered),
            "spread": (pct(0.9) - pct(0.1)) / median if median > 0 else 0.0}


class Rounds:
    """Timed samples taken in ``rounds`` interleaved rounds over every measured function, so a
    burst of load on the machine spoils one round of each, not all samples of one."""

    def __init__(self, repeats: int, warmup: int, rounds: int) -> None:
        self.rounds = max(1, min(rounds, repeats))
        self.per_round = max(1, -(-repeats // self.rounds))
        self.warmup = warmup
        self.fns: dict[str, Callable[[], Any]] = {}

    def add(self, key: str, fn: Callable[[], Any]) -> None:
        self.fns[key] = fn

    def run(self) -> dict[str, dict[str, float]]:
        samples: dict[str, list[float]] = {k: [] for k in self.fns}
        for fn in self.fns.values():
            for _ in range(self.warmup):
                fn()
        for _ in range(self.rounds):
            for key, fn in self.fns.items():
                samples[key] += sample_seconds(fn, self.per_round)
        return {k: summarize(v) for k, v in samples.items()}


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


def _add_point(graph: SplitGraph, point: SplitPoint, example: torch.Tensor, onnx_path: Path,
               opts: dict[str, int], rounds: Rounds) -> tuple[int, int]:
    """Queue the head (ONNX Runtime) and tail (torch) timings of ``point``; return params."""
    head, tail = graph.split(point.name)
    if not onnx_path.is_file():
        export_onnx(head, example, onnx_path)
    session = OnnxModule(onnx_path, threads=opts["threads"])
    x = example.numpy()
    with torch.no_grad():
        crossing = head(example)

    def run_tail() -> Any:
        with torch.no_grad():
            return tail(crossing)

    rounds.add(f"head:{point.name}", lambda: session(x))
    rounds.add(f"tail:{point.name}", run_tail)
    return _params(head), _params(tail)


def _cost(point: SplitPoint, stats: dict[str, dict[str, float]], flops: tuple[int, int],
          params: tuple[int, int]) -> SplitCost:
    entry = point.to_entry()
    return SplitCost(name=point.name, index=point.index, shape=entry.shape, dtype=point.dtype,
                     bytes=entry.bytes, head_seconds=stats[f"head:{point.name}"]["median"],
                     tail_seconds=stats[f"tail:{point.name}"]["median"],
                     head_flops=flops[0], tail_flops=flops[1],
                     head_params=params[0], tail_params=params[1])


def profile_graph(graph: SplitGraph, example: torch.Tensor, model_id: str, *,
                  head_onnx: dict[str, Path] | None = None, full_onnx: Path | None = None,
                  threads: int = 1, cloud_threads: int | None = None, repeats: int = 20,
                  warmup: int = 3, rounds: int = 3, progress: bool = True,
                  only: list[str] | None = None) -> CostTable:
    """Profile every split point of ``graph`` (or those in ``only``; batch 1) into a
    :class:`CostTable`.

    Heads run on ONNX Runtime with ``threads``, tails in torch with ``cloud_threads``
    (default: ``threads``). Heads without a file in ``head_onnx`` are exported to a temp dir.
    Each time is the median of ``repeats`` samples taken in ``rounds`` interleaved rounds;
    ``meta["spread"]`` keeps p10/p90 per measurement and ``meta["busy"]`` says whether the
    spread shows the machine was busy (a warning is logged then).
    """
    opts = {"threads": threads, "cloud_threads": cloud_threads or threads,
            "repeats": repeats, "warmup": warmup, "rounds": rounds}
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
    rounds = Rounds(opts["repeats"], opts["warmup"], opts["rounds"])
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="tether-profile-") as tmp:
        missing = [p.name for p in points if p.name not in head_onnx and not graph.exported]
        head_onnx = {**head_onnx, **extract_heads(graph, missing, example, Path(tmp))}
        params = {}
        bar = tqdm(points, desc=f"preparing {model_id}", unit="split",
                   disable=not progress, leave=False)
        for p in bar:
            path = head_onnx.get(p.name) or Path(tmp) / f"{p.index}.onnx"
            params[p.name] = _add_point(graph, p, example, path, opts, rounds)
        _add_full(graph, example, full_onnx, Path(tmp), opts, rounds)
        stats = rounds.run()
    costs = tuple(_cost(p, stats, flops[p.name], params[p.name]) for p in points)
    loads = [x for x in (load_before, _loadavg()) if x is not None]
    meta = {**_meta(opts), **_spread_meta(stats, loads, model_id)}
    return CostTable(model_id=model_id, input=TensorSpec(tuple(example.shape),
                                                         str(example.dtype).removeprefix("torch.")),
                     edge_full_seconds=stats["edge_full"]["median"],
                     cloud_full_seconds=stats["cloud_full"]["median"], splits=costs, meta=meta)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _spread_meta(stats: dict[str, dict[str, float]], load: list[float],
                 model_id: str) -> dict[str, Any]:
    """p10/p90/spread per measurement; ``busy`` when the spread (or the load average before
    and after, ``load``) says so."""
    spread = {k: {"p10_seconds": v["p10"], "p90_seconds": v["p90"],
                  "median_seconds": v["median"], "spread": round(v["spread"], 4)}
              for k, v in stats.items()}
    timed = {k: v for k, v in stats.items() if v["median"] >= MIN_JUDGED_SECONDS} or stats
    worst = max(timed.items(), key=lambda kv: kv[1]["spread"])
    busy_load = bool(load) and max(load) > 0.75 * (os.cpu_count() or 1)
    busy = worst[1]["spread"] > BUSY_SPREAD or busy_load
    if busy:
        log.warning("profiling %s: the machine looks busy (worst spread %.0f%% on %s, load "
                    "average %s): times are unreliable; re-run `tether profile` when it is idle",
                    model_id, 100 * worst[1]["spread"], worst[0],
                    "/".join(f"{x:.1f}" for x in load) or "?")
    return {"spread": spread, "busy": busy, "statistic": "median",
            "spread_statistic": "(p90 - p10) / median", "loadavg": load}


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


def _add_full(graph: SplitGraph, example: torch.Tensor, full_onnx: Path | None, tmp: Path,
              opts: dict[str, int], rounds: Rounds) -> None:
    path = full_onnx if full_onnx and full_onnx.is_file() else export_onnx(
        graph.module, example, tmp / "full.onnx")
    session = OnnxModule(path, threads=opts["threads"])
    x = example.numpy()

    def cloud() -> Any:
        with torch.no_grad():
            return graph.module(example)

    rounds.add("edge_full", lambda: session(x))
    rounds.add("cloud_full", cloud)


def _meta(opts: dict[str, int]) -> dict[str, Any]:
    import onnxruntime

    return {"edge_backend": "onnxruntime", "edge_threads": opts["threads"],
            "cloud_backend": "torch", "cloud_threads": opts["cloud_threads"],
            "repeats": opts["repeats"], "warmup": opts["warmup"], "rounds": opts["rounds"],
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
