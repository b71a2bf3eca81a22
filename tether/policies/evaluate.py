"""Run several policies on one trace and compare them with the hindsight oracle.

``"static"`` here is the *best static* action in hindsight: every candidate action is
simulated as a fixed policy on the same trace and arrivals, and the one with the lowest
mean latency (among those meeting the accuracy floor) is reported. ``"cloud"`` is the
same search restricted to full offloads (the best input codec for this trace).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tether.core.errors import ConfigError
from tether.core.traces import Trace
from tether.core.types import CostTable
from tether.policies import POLICIES, PolicyConfig, build_cost_model, build_policy
from tether.policies.baselines import StaticPolicy
from tether.policies.costmodel import CostModel
from tether.policies.simulator import SimConfig, SimResult, Simulator

DEFAULT_POLICIES = ("local", "cloud", "static", "neurosurgeon", "adaptive", "bandit", "oracle")


def run_policies(table: CostTable, uplink: Trace, policies: tuple[str, ...] = DEFAULT_POLICIES,
                 policy_config: PolicyConfig | None = None, sim_config: SimConfig | None = None,
                 downlink: Trace | None = None) -> dict[str, SimResult]:
    """Simulate each named policy (fresh state per run) on the same trace and arrivals."""
    base = policy_config or PolicyConfig()
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; valid: {sorted(POLICIES)}")
    model = build_cost_model(base, table)
    sim = Simulator(model, uplink, sim_config, downlink)
    results: dict[str, SimResult] = {}
    for name in policies:
        if name in ("static", "cloud"):
            results[name] = best_static(sim, model, base, offload_only=name == "cloud")
        else:
            cfg = dataclasses.replace(base, name=name)
            results[name] = sim.run(build_policy(cfg, table, model), name)
    return results


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
