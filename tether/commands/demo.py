"""`tether demo`: the first thing a new user runs (no assets, no root needed).

Builds a bundle for cifar_resnet20 (random weights, or the pretrained ones with ``--assets``
or ``--weights``), starts a cloud, a link replaying the shipped synthetic LTE-like uplink
trace, and an edge (CPU-throttled where cgroups allow), runs three policies for about a
minute in total, prints the summary table and writes the CSV and plots.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_POLICIES = "local,cloud,adaptive"


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo", help="run cloud + edge over an emulated LTE-like link, compare policies",
        description="Build a cifar_resnet20 bundle, start `tether cloud`, `tether testbed link` "
                    "(synthetic LTE-like uplink) and `tether edge`, run each policy on the same "
                    "trace and requests, print the summary and write CSV and plots to --out.")
    p.add_argument("--out", type=Path, default=Path("tether-demo"), metavar="DIR",
                   help="output directory (default ./tether-demo; the bundle is cached there)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="seconds of requests in total, split across the policies (default 60)")
    p.add_argument("--assets", type=Path, metavar="DIR",
                   help="shared assets: pretrained resnet20 weights and CIFAR-10 test images "
                        "(accuracy is then reported); default $TETHER_ASSETS if set")
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="resnet20 state dict (CIFAR-10 pretrained); images stay random unless "
                        "--assets is given")
    p.add_argument("--policies", default=DEFAULT_POLICIES, metavar="A,B,C",
                   help=f"policies to compare (default {DEFAULT_POLICIES})")
    p.add_argument("--trace", default="lte-like", metavar="TRACE",
                   help="uplink trace spec or file (default: the shipped lte-like trace)")
    p.add_argument("--rate", type=float, default=5.0, metavar="HZ", help="requests per second")
    p.add_argument("--cpu-quota", type=float, default=0.5, metavar="CORES",
                   help="edge CPU quota in cores (0: unthrottled; default 0.5)")
    p.set_defaults(handler=_run_demo)


def _pretrained(assets: Path) -> str | None:
    found = sorted((assets / "resnet_cifar").glob("resnet20-*.th"))
    return str(found[0]) if found else None


def demo_scenario(args: argparse.Namespace, assets: Path | None):
    """The demo's scenario from the command-line options."""
    from tether.core.errors import ConfigError
    from tether.testbed.scenario import LinkSpec, Scenario
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise ConfigError("--policies needs at least one policy name, e.g. local,cloud,adaptive")
    weights = str(args.weights) if args.weights else (_pretrained(assets) if assets else None)
    if assets is not None and weights is None:
        raise ConfigError(f"no resnet20-*.th under {assets}/resnet_cifar: check --assets")
    return Scenario(
        name="demo", model="cifar_resnet20", weights=weights,
        duration_s=max(2.0, args.duration / len(policies)), warmup_s=1.0, edges=1,
        arrival="poisson", rate_hz=args.rate, deadline_s=0.3,
        cpu_quota=args.cpu_quota if args.cpu_quota > 0 else None, seed=7,
        images="cifar10" if assets is not None else "random",
        link=LinkSpec(up=args.trace, down="constant:30", delay_ms=25.0),
        policies=tuple({"name": p} for p in policies))


def _run_demo(args: argparse.Namespace) -> int:
    from tether.testbed.runner import run_scenario
    assets = args.assets or (Path(os.environ["TETHER_ASSETS"])
                             if os.environ.get("TETHER_ASSETS") else None)
    scenario = demo_scenario(args, assets)
    what = "pretrained resnet20 + CIFAR-10 test images" if assets else (
        "resnet20 with given weights" if args.weights else "resnet20 with random weights")
    print(f"tether demo: {what}; {len(scenario.policies)} policies x {scenario.duration_s:g} s "
          f"over the {scenario.link.up} uplink; results in {args.out}/", flush=True)
    out = run_scenario(scenario, args.out, assets)
    print(f"\nper-request CSV: {out}/requests.csv; summary: {out}/summary.csv; plots: "
          f"{out}/latency_cdf.png, {out}/timeline.png, {out}/accuracy_latency.png", flush=True)
    return 0
