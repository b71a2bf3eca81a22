"""How often adaptive beats every fixed choice on demo-sized episodes, in the simulator.

    .venv/bin/python bench/demo_episodes.py --bundle tether-demo/bundle [--duration 30]

One episode = one `tether demo` run: a fresh uplink from the demo's Markov process (its
states, dwells and one outage, a new seed per episode), Poisson arrivals at 2/s for
``--duration`` seconds, the edge priced at ``--edge-scale`` x the bundle's profile plus the
daemon's own ``--overhead-ms`` per request (the demo's throttled edge: CPU time over quota).
Per episode, local, cloud-only, the best static action in hindsight, Neurosurgeon and
adaptive run on the same trace and arrivals; it prints in how many episodes adaptive's
mean is below every fixed choice (and below Neurosurgeon too) and the median ratio of
adaptive to the best fixed choice. ``--demo-trace`` keeps the demo's own uplink (seed 1)
and varies only the arrivals' seed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from tether.core import traces
from tether.core.bundle import Manifest
from tether.core.types import CostTable
from tether.policies import PolicyConfig, scale_edge
from tether.policies.evaluate import run_policies
from tether.policies.simulator import SimConfig
from tether.testbed.demo import ACCURACY_DROP, demo_uplink

POLICIES = ("local", "cloud", "static", "neurosurgeon", "adaptive")


def episode(table: CostTable, manifest: Manifest, uplink: traces.Trace, seed: int,
            args: argparse.Namespace) -> dict[str, float]:
    """Mean latency (s) per policy on one episode."""
    cfg = SimConfig(n_requests=int(args.duration * args.rate), rate_hz=args.rate, seed=seed,
                    rtt_seconds=2 * args.delay_ms / 1000, deadline_seconds=1.0,
                    edge_overhead_seconds=args.overhead_ms / 1000)
    res = run_policies(table, uplink, POLICIES, PolicyConfig(max_accuracy_drop=ACCURACY_DROP),
                       cfg, traces.constant(30.0, max(args.duration, 10.0)), manifest=manifest)
    return {name: float(np.mean(r.latencies)) for name, r in res.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per episode")
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--edge-scale", type=float, default=18.0)
    p.add_argument("--overhead-ms", type=float, default=45.0)
    p.add_argument("--delay-ms", type=float, default=15.0, help="one way")
    p.add_argument("--demo-trace", action="store_true", help="the demo's own uplink (seed 1)")
    args = p.parse_args()
    table = scale_edge(CostTable.load(args.bundle / "costs.json"), args.edge_scale)
    manifest = Manifest.load(args.bundle)
    wins = lowest = 0
    ratios, ns_ratios, means = [], [], {name: [] for name in POLICIES}
    for k in range(1, args.episodes + 1):
        uplink = demo_uplink(max(args.duration, 10.0), 1 if args.demo_trace else k)
        m = episode(table, manifest, uplink, k if args.demo_trace else 7 * k, args)
        fixed = min(m["local"], m["cloud"], m["static"])
        wins += m["adaptive"] < fixed
        lowest += m["adaptive"] < min(fixed, m["neurosurgeon"])
        ratios.append(m["adaptive"] / fixed)
        ns_ratios.append(m["adaptive"] / m["neurosurgeon"])
        for name in POLICIES:
            means[name].append(m[name])
    print(f"{args.episodes} episodes of {args.duration:g} s at {args.rate:g}/s, edge scale "
          f"{args.edge_scale:g}, daemon {args.overhead_ms:g} ms/request"
          f"{', the demo trace' if args.demo_trace else ''} (load {os.getloadavg()[0]:.2f}):")
    print(f"  adaptive below every fixed choice in {wins}, below Neurosurgeon too in {lowest}; "
          f"median ratio to the best fixed choice {np.median(ratios):.3f}, "
          f"to Neurosurgeon {np.median(ns_ratios):.3f}")
    print("  mean of episode means (ms): " +
          ", ".join(f"{n} {np.mean(v) * 1000:.0f}" for n, v in means.items()))


if __name__ == "__main__":
    main()
