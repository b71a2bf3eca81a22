"""Run several policies on one trace and compare them with the hindsight references.

``"static"`` here is the *best static* action in hindsight: every candidate action is
simulated as a fixed policy on the same trace and arrivals, and the one with the lowest
mean latency (among those meeting the accuracy floor) is reported. ``"cloud"`` is the
same search restricted to full offloads (the best input codec for this trace).

References: ``"oracle"`` plans the whole sequence in hindsight with the edge's and the
link's queues (:func:`tether.policies.oracle.plan_sequence`), replayed through the same
simulator; ``"bound"`` is the proven per-request lower bound (idle edge, idle links);
``"oracle-x"`` plans likewise but, like any policy, does not know which early exits
will be confident; ``"causal"`` is adaptive with the true capacity of the past second;
``"greedy"`` the per-request hindsight oracle. The bandit is not in the defaults (retired: 4.6-5.5x the
oracle on real traces, see docs/benchmarks.md); it can still be named.

``profile`` (optional): the cost table as profiled, when ``table`` is the device as it
really is; the calibrating policies (:data:`CALIBRATING`) then start from the profile and
must correct it online, everybody else is given the truth.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tether.core.bundle import Manifest
from tether.core.errors import ConfigError
from tether.core.traces import Trace
from tether.core.types import CostTable
from tether.policies import POLICIES, PolicyConfig, build_cost_model, build_policy
from tether.policies.baselines import LocalOnly, StaticPolicy
from tether.policies.costmodel import CostModel
from tether.policies.oracle import lower_bound, plan_sequence
from tether.policies.simulator import RequestOutcome, SimConfig, SimResult, Simulator, _Scripted

DEFAULT_POLICIES = ("local", "cloud", "static", "neurosurgeon", "adaptive", "causal", "bound",
                    "oracle")
REFERENCES = ("oracle", "oracle-x", "bound", "greedy")
CALIBRATING = ("adaptive", "bandit")


def run_policies(table: CostTable, uplink: Trace, policies: tuple[str, ...] = DEFAULT_POLICIES,
                 policy_config: PolicyConfig | None = None, sim_config: SimConfig | None = None,
                 downlink: Trace | None = None, manifest: Manifest | None = None,
                 profile: CostTable | None = None, beam: int = 24) -> dict[str, SimResult]:
    """Simulate each named policy (fresh state per run) on the same trace and arrivals."""
    base = policy_config or PolicyConfig()
    unknown = [p for p in policies if p not in POLICIES and p not in REFERENCES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; valid: {sorted(POLICIES) + ['bound']}")
    model = build_cost_model(base, table, manifest)
    profiled = build_cost_model(base, profile, manifest) if profile is not None else model
    sim = Simulator(model, uplink, sim_config, downlink)
    results: dict[str, SimResult] = {}
    for name in policies:
        if name in ("static", "cloud"):
            results[name] = best_static(sim, model, base, offload_only=name == "cloud")
        elif name in ("oracle", "oracle-x"):
            results[name] = planned_oracle(sim, model, base, beam, know_exits=name == "oracle")
        elif name == "bound":
            results[name] = bound_result(sim, model, base)
        else:
            cfg = dataclasses.replace(base, name="oracle" if name == "greedy" else name)
            own = profiled if name in CALIBRATING else model
            policy = build_policy(cfg, own.table, own)
            if hasattr(policy, "attach_trace"):
                policy.attach_trace(uplink, sim.cfg.trace_offset_seconds)
            results[name] = sim.run(policy, name) if own is model else \
                Simulator(own, uplink, sim.cfg, downlink, truth=model).run(policy, name)
    return results


def _sim_args(sim: Simulator) -> dict:
    return dict(rtt=sim.cfg.rtt_seconds, deadline=sim.cfg.deadline_seconds, downlink=sim.downlink,
                queue=sim.cfg.cloud_queue_seconds, reserve=sim.cfg.fallback_reserve_seconds,
                offset=sim.cfg.trace_offset_seconds, overhead=sim.cfg.edge_overhead_seconds)


def planned_oracle(sim: Simulator, model: CostModel, cfg: PolicyConfig, beam: int = 24,
                   know_exits: bool = True) -> SimResult:
    """The hindsight plan of the whole sequence, replayed through the simulator
    (``know_exits=False``: "oracle-x", which knows the link but not the exits' outcomes)."""
    allowed = model.allowed(cfg.floor_for(model.table.full_accuracy))
    sim._reset(LocalOnly())   # draws sized to the arrivals
    plan, info = plan_sequence(model, sim.uplink, sim.arrival_times, sim.draws, allowed,
                               beam=beam, know_exits=know_exits, **_sim_args(sim))
    name = "oracle" if know_exits else "oracle-x"
    result = sim.run(_Scripted([model.actions[i] for i in plan]), name)
    result.meta.update(info)
    return result


def bound_result(sim: Simulator, model: CostModel, cfg: PolicyConfig) -> SimResult:
    """The per-request lower bound as a result row (latency only)."""
    allowed = model.allowed(cfg.floor_for(model.table.full_accuracy))
    sim._reset(LocalOnly())
    lat = lower_bound(model, sim.uplink, sim.arrival_times, sim.draws, allowed, **_sim_args(sim))
    reqs = [RequestOutcome(i, float(t), "bound", "bound", float(x), math.nan, done=True)
            for i, (t, x) in enumerate(zip(sim.arrival_times, lat))]
    return SimResult("bound", reqs, sim.cfg.deadline_seconds)


def best_static(sim: Simulator, model: CostModel, cfg: PolicyConfig,
                offload_only: bool = False) -> SimResult:
    """The fixed action with the lowest mean latency on this trace (hindsight)."""
    floor = cfg.floor_for(model.table.full_accuracy)
    allowed = model.offload_mask(floor) if offload_only else model.allowed(floor)
    name = "cloud" if offload_only else "static"
    bounds = model.lower_bounds(sim.cfg.rtt_seconds, sim.cfg.cloud_queue_seconds)
    best: SimResult | None = None
    for i in np.argsort(bounds, kind="stable"):
        if not allowed[i] or (best is not None and bounds[i] >= best.latencies.mean()):
            continue      # cannot beat the best so far even on an infinitely fast link
        result = sim.run(StaticPolicy(model.actions[i]), name)
        if best is None or result.latencies.mean() < best.latencies.mean():
            best = result
            best.meta["action"] = model.actions[i].key
    if best is None:
        raise ConfigError("no action meets the accuracy floor; lower policy.max_accuracy_drop")
    return best


def regret_curve(result: SimResult, oracle: SimResult) -> np.ndarray:
    """Cumulative latency regret (seconds) against the oracle, request by request."""
    return np.cumsum(result.latencies - oracle.latencies)


def regret_flattening(result: SimResult, oracle: SimResult) -> float:
    """Mean per-request regret over the last third divided by that over the first third.

    Below 1 the curve flattens (the policy learned); about 1 it grows linearly.
    """
    per = result.latencies - oracle.latencies
    third = max(1, per.size // 3)
    first, last = per[:third].mean(), per[-third:].mean()
    return float(last / first) if first > 0 else math.nan


def summarize(results: dict[str, SimResult], oracle: str = "oracle") -> list[dict]:
    """One row per policy, with ratios to the oracle and mean regret when it ran."""
    ref = results.get(oracle)
    rows = []
    for name, res in results.items():
        row = res.summary()
        row["policy"] = name
        if "action" in res.meta:
            row["action"] = res.meta["action"]
        if ref is not None:
            ro = ref.summary()
            row["mean_vs_oracle"] = row["mean_s"] / ro["mean_s"]
            row["p95_vs_oracle"] = row["p95_s"] / ro["p95_s"]
            row["regret_ms_per_request"] = float((res.latencies - ref.latencies).mean() * 1000)
        rows.append(row)
    return rows
