"""`tether demo`: the first thing a new user runs (no assets, no root needed).

On first use it builds ``OUT/bundle``: a seeded ResNet-56 (64x64 input) fitted to synthetic
images the demo makes, with a trained learned codec and an early exit (about three minutes on two cores;
cached afterwards). Then it starts a real `tether cloud`, a userspace link replaying a weak
LTE-like uplink and a `tether edge` under a CPU quota (cgroup as root, else enforced in
userspace), runs every fixed choice, Neurosurgeon and adaptive on the same trace and
requests, and prints adaptive's timeline and the comparison (see
:mod:`tether.testbed.demo`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: A weak edge: by default the quota is set so that the whole model takes about
#: :data:`tether.testbed.demo.LOCAL_TARGET_S` there (0.05 core where it takes 7 ms of CPU),
#: so the regime is the same on a fast and a slow machine.
DEFAULT_QUOTA = None


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo", help="weak edge + weak uplink: adaptive vs every fixed choice, live",
        description="Build a ResNet-56 (64x64) bundle with a trained learned codec (synthetic data, "
                    "cached in --out), start `tether cloud`, a userspace link (weak LTE-like "
                    "uplink) and a CPU-quota'd `tether edge`, run local, cloud-only, each "
                    "learned split, Neurosurgeon and adaptive on the same trace and requests, "
                    "print adaptive's timeline and the comparison; CSV and plots go to --out.")
    p.add_argument("--out", type=Path, default=Path("tether-demo"), metavar="DIR",
                   help="output directory (default ./tether-demo; the bundle is cached there)")
    p.add_argument("--duration", type=float, default=180.0, metavar="S",
                   help="seconds of requests in total, split across the policies (default 180: "
                        "30 s, about 60 requests, per policy)")
    p.add_argument("--rate", type=float, default=2.0, metavar="HZ",
                   help="requests per second (default 2)")
    p.add_argument("--cpu-quota", type=float, default=DEFAULT_QUOTA, metavar="CORES",
                   help="edge CPU quota in cores (default: what makes the whole model take "
                        "about 150 ms on the edge, measured on this machine at start)")
    p.add_argument("--delay-ms", type=float, default=15.0, metavar="MS",
                   help="one-way link delay (default 15)")
    p.set_defaults(handler=_run_demo)


def demo_scenario(args: argparse.Namespace, policies: int = 6):
    """The demo's scenario from the command-line options (policies are filled in later)."""
    from tether.core.errors import ConfigError
    from tether.testbed.demo_model import MODEL
    from tether.testbed.scenario import LinkSpec, Scenario
    if not args.duration > 0 or not args.rate > 0 or \
            (args.cpu_quota is not None and not args.cpu_quota > 0):
        raise ConfigError("--duration, --rate and --cpu-quota must be > 0")
    return Scenario(
        name="demo", model=MODEL, duration_s=max(3.0, args.duration / policies),
        warmup_s=1.0, edges=1, arrival="poisson", rate_hz=args.rate, deadline_s=1.0,
        cpu_quota=args.cpu_quota, cpu_pin=(_last_cpu(),), seed=7, images="random",
        link=LinkSpec(up="lte-like", down="constant:30", delay_ms=args.delay_ms))


def _last_cpu() -> int:
    """The highest CPU this process may run on: the demo's weak edge is that one core."""
    try:
        return max(os.sched_getaffinity(0))
    except (AttributeError, OSError, ValueError):
        return 0


def _run_demo(args: argparse.Namespace) -> int:
    from tether.testbed.demo import OUTAGE_S, UPLINK_STATES, run_demo
    from tether.testbed.demo_model import IMAGE_SIZE
    from tether.testbed.runner import _printer
    scenario = demo_scenario(args)
    edge = "quota set below" if args.cpu_quota is None else f"{args.cpu_quota:g} core"
    print(f"tether demo: {scenario.model} on {IMAGE_SIZE}x{IMAGE_SIZE} images, weak edge "
          f"({edge}), weak LTE-like uplink (Markov fades "
          f"{max(UPLINK_STATES):g} Mbit/s to {min(UPLINK_STATES) * 1000:g} kbit/s, one "
          f"{OUTAGE_S:g} s outage, {args.delay_ms:g} ms each way), {args.rate:g} requests/s, "
          f"{scenario.duration_s:g} s per policy; results in {args.out}/", flush=True)
    run_demo(scenario, args.out, _printer)
    out = args.out
    print(f"\nper-request CSV: {out}/requests.csv; summary: {out}/summary.md; timeline and "
          f"comparison: {out}/demo.txt; plots: {out}/timeline.png, {out}/latency_cdf.png",
          flush=True)
    return 0
