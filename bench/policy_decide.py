"""CPU time of one policy decision (``decide``) on a bundle's cost table, under a stream of
observations like an edge's (a heartbeat RTT every other request, each request's measured
compute and bytes), for adaptive and Neurosurgeon.

    .venv/bin/python bench/policy_decide.py --bundle /tmp/demo/bundle [--requests 3000]

A throttled edge pays this in wall time times its slowdown (x12 at the demo's 0.08 core).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tether.core.bundle import Manifest
from tether.core.policy import DecisionContext, Observation
from tether.core.types import CostTable
from tether.policies import PolicyConfig, build_policy


def decide_cpu_us(name: str, table: CostTable, manifest: Manifest, requests: int) -> float:
    """Mean CPU microseconds per ``decide`` over ``requests`` seeded requests at 2/s."""
    policy = build_policy(PolicyConfig(name=name, max_accuracy_drop=0.02), table,
                          manifest=manifest)
    rng = np.random.default_rng(0)
    cpu, now = 0.0, 0.0
    for i in range(requests):
        now += 0.5
        if i % 2 == 0:
            policy.observe(Observation(now=now, rtt_seconds=0.03 + 0.05 * rng.random()))
        t = time.process_time()
        action = policy.decide(DecisionContext(now=now))
        cpu += time.process_time() - t
        local = action.key == "local"
        policy.observe(Observation(
            now=now + 0.2, action=action, bytes_sent=0 if local else 1100,
            network_seconds=0.0 if local else 0.05 + 0.02 * rng.random(), total_seconds=0.3,
            edge_seconds=(0.3 if local else 0.04) * (0.5 + rng.random()),
            cloud_seconds=None if local else 0.03))
    return cpu / requests * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="a bundle dir (costs.json)")
    p.add_argument("--requests", type=int, default=3000)
    args = p.parse_args()
    table = CostTable.load(args.bundle / "costs.json")
    manifest = Manifest.load(args.bundle)
    for name in ("adaptive", "neurosurgeon"):
        print(f"{name:13s} {decide_cpu_us(name, table, manifest, args.requests):6.0f} us CPU "
              f"per decide")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
