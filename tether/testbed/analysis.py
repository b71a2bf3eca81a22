"""Results of a testbed run: per-request CSV, summary table, oracle regret, simulator error.

* ``requests.csv``: one row per request of every policy (columns in :data:`COLUMNS`).
* ``summary.csv`` / ``summary.md``: per policy mean, p50, p95, p99 latency, accuracy,
  deadline misses, fallbacks, bytes, regret against the hindsight oracle, and the error of
  the simulator's predictions.
* The **predicted** latency of each request is :func:`tether.policies.simulator.replay` of
  the actions the edge actually took, at the same trace times; the **oracle** latency is
  the planned hindsight oracle (:mod:`tether.policies.oracle`: the whole sequence, with the
  edge's and the link's queues) on the same arrivals and trace, over the bundle's action
  space. Latency and deadline misses are the application's view everywhere
  (:func:`app_latency`, :func:`deadline_miss`); ``sim_error.csv`` gives the simulator's
  error per action.
  Both price edge compute from the bundle's cost table scaled by the slowdown measured on
  the (throttled) edge in this run (``edge_scale`` in meta.json), plus the daemon's own
  per-request edge time measured in the same run (``edge_overhead_s``, :func:`edge_overhead`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tether.core.config import from_mapping
from tether.core.errors import ConfigError, TetherError
from tether.core.types import Action, ActionKind, CostTable, write_json_atomic

if TYPE_CHECKING:
    from tether.testbed.runner import Experiment

COLUMNS = (
    "policy", "edge", "request", "trace_time", "image", "label", "answered", "action", "outcome",
    "fallback", "error", "bytes_sent", "bytes_received", "head_s", "encode_s", "network_s",
    "queue_s", "decode_s", "tail_s", "local_s", "wait_s", "total_s", "client_s", "latency_s", "deadline_miss",
    "prediction", "correct", "predicted_s", "predicted_error_s", "oracle_s", "oracle_action",
)
_RECORD = {"head_s": "head_seconds", "encode_s": "encode_seconds",
           "network_s": "network_seconds", "queue_s": "cloud_queue_seconds",
           "decode_s": "cloud_decode_seconds", "tail_s": "tail_seconds",
           "local_s": "local_seconds", "wait_s": "edge_wait_seconds", "total_s": "total_seconds",
           "bytes_sent": "bytes_sent", "bytes_received": "bytes_received"}


def flatten(row: dict[str, Any], deadline_s: float) -> dict[str, Any]:
    """One CSV row from a load-generator row (with the edge's record inside)."""
    record = row.get("record") or {}
    out = {k: row.get(k, "") for k in ("policy", "edge", "request", "image", "label", "answered",
                                        "outcome", "error")}
    out["trace_time"] = round(float(row.get("trace_time", 0.0)), 6)
    out["action"] = record.get("action", "")
    out["fallback"] = record.get("fallback_reason", "")
    for col, key in _RECORD.items():
        out[col] = record.get(key, "")
    out["client_s"] = row.get("client_seconds", "")
    answered = bool(row.get("answered"))
    out["latency_s"] = app_latency(out["client_s"], out["total_s"]) if answered else ""
    out["deadline_miss"] = deadline_miss(answered, out["latency_s"] or None, deadline_s)
    out["prediction"] = row.get("prediction", "")
    label = int(row.get("label", -1))
    out["correct"] = (row.get("prediction") == label) if label >= 0 and row.get("answered") else ""
    return out


def app_latency(client_s: Any, edge_total_s: Any) -> float:
    """The one latency: what the application saw (client round trip), else the edge's total."""
    for value in (client_s, edge_total_s):
        if value not in ("", None):
            return float(value)
    return math.nan


def deadline_miss(answered: bool, latency_s: float | None, deadline_s: float) -> bool:
    """The one deadline miss: no answer, or an answer later than the deadline (app view)."""
    return not answered or latency_s is None or float(latency_s) > deadline_s


def compute_scales(rows: list[dict[str, Any]], table: CostTable) -> tuple[float, float]:
    """(edge, cloud): measured compute / cost-table compute, medians over this run's requests."""
    edge, cloud = [], []
    for r in rows:
        action = _parse(r.get("action", ""))
        if action is None or r.get("outcome") not in ("cloud", "local"):
            continue
        if action.kind is ActionKind.LOCAL and table.edge_full_seconds > 0:
            edge.append(float(r["local_s"] or r["total_s"]) / table.edge_full_seconds)
            continue
        split = _split(table, action.split)
        if action.kind is ActionKind.SPLIT and split and split.head_seconds > 0:
            edge.append(float(r["head_s"]) / split.head_seconds)
        cloud_cost = table.cloud_full_seconds if action.kind is ActionKind.OFFLOAD else (
            split.tail_seconds if split else 0.0)
        if r.get("outcome") == "cloud" and cloud_cost > 0 and r.get("tail_s") not in ("", None):
            cloud.append(float(r["tail_s"]) / cloud_cost)
    return (float(np.median(edge)) if edge else 1.0, float(np.median(cloud)) if cloud else 1.0)


def edge_overhead(rows: list[dict[str, Any]]) -> float:
    """The daemon's own edge time per request (decision, parsing, records, the sockets, the
    thread hand-off), measured: the mean of edge total - compute over the local answers that
    found their edge idle (every earlier request of that edge answered before it arrived), so
    none of it is queueing. On a CPU-quota'd edge this is the daemon's CPU at the quota's
    pace (about 3 ms of CPU per request, ~30 ms at 0.09 core): it occupies the edge like
    compute, and the simulator charges it so."""
    spans: dict[tuple[Any, Any], list[tuple[float, float, dict[str, Any]]]] = {}
    for r in rows:
        if r.get("trace_time") in ("", None) or r.get("latency_s") in ("", None):
            continue
        start = float(r["trace_time"])
        spans.setdefault((r.get("policy"), r.get("edge")), []).append(
            (start, start + float(r["latency_s"]), r))
    rest = []
    for group in spans.values():
        busy_until = -math.inf
        for start, end, r in sorted(group, key=lambda item: item[0]):
            if start >= busy_until and r.get("outcome") == "local" and \
                    r.get("action") == "local" and r.get("total_s") not in ("", None) and \
                    r.get("local_s") not in ("", None):
                rest.append(float(r["total_s"]) - float(r["local_s"]))
            busy_until = max(busy_until, end)
    return max(0.0, float(np.mean(rest))) if rest else 0.0


def scaled_table(table: CostTable, edge: float, cloud: float) -> CostTable:
    """``table`` with edge times times ``edge`` and cloud times times ``cloud``."""
    from tether.policies import scale_edge
    table = scale_edge(table, edge) if edge != 1.0 else table
    splits = tuple(dataclasses.replace(s, tail_seconds=s.tail_seconds * cloud)
                   for s in table.splits)
    return dataclasses.replace(table, splits=splits,
                               cloud_full_seconds=table.cloud_full_seconds * cloud)


def _split(table: CostTable, name: str | None) -> Any:
    for s in table.splits:
        if s.name == name:
            return s
    return None


def _parse(key: str) -> Action | None:
    try:
        return Action.parse(key) if key else None
    except ValueError:
        return None


def add_predictions(rows: list[dict[str, Any]], exp: "Experiment",
                    table: CostTable) -> dict[str, Any]:
    """Fill ``predicted_s`` and ``oracle_s`` per request (per policy and edge).

    Both use the bundle's action space (what this edge can run), priced at this run's
    measured edge/cloud slowdown; the oracle plans each edge's whole request sequence.
    """
    from tether.policies import CostModel
    from tether.policies.evaluate import planned_oracle
    from tether.policies.simulator import SimConfig, Simulator, replay

    edge, cloud = compute_scales(rows, table)
    overhead = edge_overhead(rows)
    model = CostModel(scaled_table(table, edge, cloud), prune=False, manifest=exp.manifest)
    sc = exp.scenario
    base = SimConfig(rtt_seconds=2 * sc.link.delay_ms / 1000.0, deadline_seconds=sc.deadline_s,
                     ping_interval_seconds=0.5, edge_overhead_seconds=overhead)
    notes: dict[str, Any] = {"edge_scale": edge, "cloud_scale": cloud, "unpriced": 0,
                             "edge_overhead_s": overhead, "oracle_exact": True}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["policy"], int(r["edge"])), []).append(r)
    for (policy, edge), group in groups.items():
        group.sort(key=lambda r: r["trace_time"])
        priced = [r for r in group if _parse(r["action"]) and _known(model, r["action"])]
        notes["unpriced"] += len(group) - len(priced)
        if not priced:
            continue
        times = np.array([r["trace_time"] for r in priced])
        cfg = dataclasses.replace(base, n_requests=len(priced), trace_offset_seconds=times[0])
        for r, out in zip(priced, replay(model, exp.up, times, [r["action"] for r in priced],
                                         cfg, exp.down)):
            r["predicted_s"] = out.latency
            if r["answered"] is True:
                r["predicted_error_s"] = out.latency - float(r["latency_s"])
        oracle_cfg = dataclasses.replace(base, n_requests=len(times), trace_offset_seconds=0.0)
        sim = Simulator(model, exp.up, oracle_cfg, exp.down)
        sim.arrival_times = times
        result = planned_oracle(sim, model, _policy_config(sc.policies), beam=64)
        notes["oracle_exact"] &= bool(result.meta.get("exact"))
        for r, out in zip(priced, result.requests):
            r["oracle_s"], r["oracle_action"] = out.latency, out.action
    try:
        notes["simulated_mean_s"] = simulated_means(exp, model.table, base)
    except TetherError as exc:   # e.g. a bundle without accuracies: the run's results stand
        notes["simulated_mean_s"] = {}
        notes["simulated_error"] = str(exc)
    return notes


def simulated_means(exp: "Experiment", table: CostTable, base: Any) -> dict[str, float]:
    """What the simulator says each policy of the scenario would score on this run's trace,
    arrival rate and measured device (edge/cloud slowdown, daemon overhead): the ordering
    the testbed is checked against. Adaptive starts from the unscaled profile, as on the edge."""
    from tether.policies.evaluate import run_policies
    sc = exp.scenario
    names = tuple(dict.fromkeys(p["name"] for p in sc.policies if p["name"] != "oracle"))
    cfg = dataclasses.replace(base, n_requests=max(1, int(sc.rate_hz * sc.duration_s)),
                              rate_hz=sc.rate_hz, arrival=sc.arrival, seed=sc.seed)
    profile = _cost_table(exp)
    results = run_policies(table, exp.up, names + ("oracle",), _policy_config(sc.policies), cfg,
                           exp.down, exp.manifest, profile=profile, beam=64)
    return {name: float(res.latencies.mean()) for name, res in results.items()}


def _known(model: Any, key: str) -> bool:
    try:
        model.cost(Action.parse(key))
        return True
    except (ConfigError, ValueError):
        return False


def _policy_config(entries: tuple[dict[str, Any], ...]) -> Any:
    """The oracle's config: the accuracy constraint of the first policy that sets one."""
    from tether.policies import PolicyConfig
    keys = ("objective", "accuracy_floor", "max_accuracy_drop", "deadline_seconds")
    for entry in entries:
        chosen = {k: entry[k] for k in keys if k in entry}
        if chosen:
            return from_mapping(PolicyConfig, chosen | {"name": "oracle"})
    return PolicyConfig(name="oracle")


def summarize(rows: list[dict[str, Any]], labels: list[str]) -> list[dict]:
    """One summary row per policy, computed from the CSV rows only."""
    out = []
    for label in labels:
        rs = [r for r in rows if r["policy"] == label]
        answered = [r for r in rs if r["answered"] is True]
        lat = np.array([float(r["latency_s"]) for r in answered]) if answered else np.array([])
        labelled = [r for r in answered if r["correct"] != ""]
        oracle = [r for r in answered if r.get("oracle_s", "") != ""]
        pred = [r for r in answered if r.get("predicted_error_s", "") != ""]
        row = {
            "policy": label, "requests": len(rs), "answered": len(answered),
            "mean_s": _stat(lat, np.mean), "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95),
            "p99_s": _pct(lat, 99),
            "accuracy": (sum(r["correct"] is True for r in labelled) / len(labelled)
                         if labelled else math.nan),
            "deadline_misses": sum(bool(r["deadline_miss"]) for r in rs),
            "fallbacks": sum(r["outcome"] == "fallback" for r in rs),
            "offloaded": sum(r["outcome"] in ("cloud", "fallback") for r in rs),
            "edge_mean_s": _stat(np.array([float(r["total_s"]) for r in answered
                                           if r["total_s"] not in ("", None)]), np.mean),
            "mean_bytes_sent": _stat(np.array([float(r["bytes_sent"] or 0) for r in answered]),
                                     np.mean),
            "oracle_mean_s": _stat(np.array([float(r["oracle_s"]) for r in oracle]), np.mean),
            "regret_s": _stat(np.array([float(r["latency_s"]) - float(r["oracle_s"])
                                        for r in oracle]), np.mean),
            "predicted_mean_s": _stat(np.array([float(r["predicted_s"]) for r in pred]), np.mean),
            "predicted_mae_s": _stat(np.array([abs(float(r["predicted_error_s"]))
                                               for r in pred]), np.mean),
        }
        out.append(row)
    return out


SIM_ERROR_COLUMNS = ("policy", "action", "requests", "mean_error_s", "mae_s", "p95_abs_error_s")


def sim_error_by_action(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The simulator's error (predicted - measured latency) per policy and action."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("predicted_error_s", "") not in ("", None):
            groups.setdefault((r["policy"], r["action"]), []).append(float(r["predicted_error_s"]))
    out = []
    for (policy, action), errs in sorted(groups.items()):
        e = np.array(errs)
        out.append({"policy": policy, "action": action, "requests": int(e.size),
                    "mean_error_s": float(e.mean()), "mae_s": float(np.abs(e).mean()),
                    "p95_abs_error_s": float(np.percentile(np.abs(e), 95))})
    return out


def sim_error_table(errors: list[dict[str, Any]]) -> str:
    lines = ["| policy | action | requests | sim error mean ms | MAE ms | p95 abs ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {e['policy']} | {e['action']} | {e['requests']} | {_ms(e['mean_error_s'])} | "
              f"{_ms(e['mae_s'])} | {_ms(e['p95_abs_error_s'])} |" for e in errors]
    return "\n".join(lines)


def _stat(values: np.ndarray, fn: Any) -> float:
    return float(fn(values)) if values.size else math.nan


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c, "")) for c in columns})


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


SUMMARY_COLUMNS = ("policy", "requests", "answered", "mean_s", "p50_s", "p95_s", "p99_s",
                   "accuracy", "deadline_misses", "fallbacks", "offloaded", "edge_mean_s",
                   "mean_bytes_sent",
                   "oracle_mean_s", "regret_s", "predicted_mean_s", "predicted_mae_s")


def summary_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (latencies in ms)."""
    head = ("| policy | answered | mean ms | p50 ms | p95 ms | p99 ms | accuracy | deadline "
            "misses | fallbacks | offloaded | regret ms | sim MAE ms |")
    lines = [head, "|" + "---|" * 12]
    for s in summary:
        acc = "-" if math.isnan(s["accuracy"]) else f"{s['accuracy']:.2%}"
        lines.append(
            f"| {s['policy']} | {s['answered']}/{s['requests']} | {_ms(s['mean_s'])} | "
            f"{_ms(s['p50_s'])} | {_ms(s['p95_s'])} | {_ms(s['p99_s'])} | {acc} | "
            f"{s['deadline_misses']} | {s['fallbacks']} | {s['offloaded']} | "
            f"{_ms(s['regret_s'])} | {_ms(s['predicted_mae_s'])} |")
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.1f}"


def write_results(exp: "Experiment", raw_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write requests.csv, summary.csv/.md, meta.json and the plots; print the table."""
    from tether.testbed.plots import write_plots
    sc = exp.scenario
    (exp.out / "raw_rows.json").write_text(json.dumps(_jsonable(raw_rows)))
    rows = sorted((flatten(r, sc.deadline_s) for r in raw_rows),
                  key=lambda r: (r["policy"], r["edge"], r["request"]))
    table = _cost_table(exp)
    notes: dict[str, Any] = {}
    if table is not None:
        notes = add_predictions(rows, exp, table)
    write_csv(exp.out / "requests.csv", rows, COLUMNS)
    summary = summarize(rows, sc.policy_labels)
    write_csv(exp.out / "summary.csv", summary, SUMMARY_COLUMNS)
    text = summary_table(summary)
    errors = sim_error_by_action(rows)
    write_csv(exp.out / "sim_error.csv", errors, SIM_ERROR_COLUMNS)
    simulated = notes.get("simulated_mean_s", {})
    ordering = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(simulated.items(),
                                                                   key=lambda kv: kv[1]))
    (exp.out / "summary.md").write_text(text + "\n\nSimulator error per action (predicted - "
                                        "measured, application latency):\n\n"
                                        + sim_error_table(errors) + "\n\nSimulated on the same "
                                        f"trace and device, mean latency: {ordering}\n")
    plots = write_plots(exp, rows)
    meta = {"scenario": _jsonable(dataclasses.asdict(sc)), "platform": exp.info.to_dict(),
            "backend": sc.link.backend, "kernel": exp.info.kernel,
            "traces": {"up": repr(exp.up), "down": repr(exp.down)},
            "bundle": str(exp.bundle), "model_id": exp.manifest.model_id,
            "fingerprint": exp.manifest.fingerprint, "images": exp.images.source,
            "assets": str(exp.assets) if exp.assets else None,
            "predictions": notes, "plots": plots} | exp.meta
    write_json_atomic(exp.out / "meta.json", _jsonable(meta))
    print(text, flush=True)
    return summary


def _cost_table(exp: "Experiment") -> CostTable | None:
    if not exp.manifest.cost_table:
        return None
    path = exp.bundle / exp.manifest.cost_table
    return CostTable.load(path) if path.is_file() else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
