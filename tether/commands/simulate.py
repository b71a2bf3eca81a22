"""`tether simulate`: replay a bandwidth trace through every policy and compare them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tether.core.errors import ConfigError

POLICY_NAMES = "local,cloud,static,neurosurgeon,adaptive,causal,bound,oracle"


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``simulate`` sub-command."""
    p = subparsers.add_parser(
        "simulate", help="trace-driven simulation of the offloading policies",
        description="Replay an uplink bandwidth trace (mahimahi or Pensieve file, or a synthetic "
                    "spec such as lte-like, constant:5, onoff:8:5:2, steps:10@8,5@0.5) and a "
                    "seeded arrival process through each policy with the bundle's cost table; "
                    "write requests.csv, summary.csv, summary.json and plots to --out.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cost-table", type=Path, metavar="JSON", help="a costs.json")
    src.add_argument("--bundle", type=Path, metavar="DIR", help="a bundle (reads its costs.json)")
    p.add_argument("--trace", required=True, metavar="FILE|SPEC", help="uplink trace")
    p.add_argument("--downlink", metavar="FILE|SPEC", help="downlink trace (default: the uplink)")
    p.add_argument("--policies", default=POLICY_NAMES, metavar="A,B,...",
                   help=f"policies to run (default {POLICY_NAMES}); 'static' = best static in "
                        "hindsight; the oracle always runs as the reference of the ratios")
    p.add_argument("--policy-config", type=Path, metavar="TOML",
                   help="TOML file with a [policy] table (objective, accuracy floor, estimator...)")
    p.add_argument("--requests", type=int, default=2000, metavar="N",
                   help="requests simulated per policy")
    p.add_argument("--rate", type=float, default=2.0, metavar="HZ",
                   help="mean arrival rate, requests per second")
    p.add_argument("--arrival", choices=("poisson", "periodic"), default="poisson",
                   help="arrival process")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="propagation RTT (default 40)")
    p.add_argument("--cloud-queue-ms", type=float, default=0.0, metavar="MS",
                   help="queueing delay added at the cloud per offload")
    p.add_argument("--deadline", type=float, default=1.0, metavar="S",
                   help="per-request deadline; offloads fall back locally before it (default 1.0)")
    p.add_argument("--edge-scale", type=float, default=1.0, metavar="X",
                   help="multiply every edge-side time (emulate a slower edge device)")
    p.add_argument("--calibrate", action="store_true",
                   help="with --edge-scale: adaptive starts from the unscaled profile and must "
                        "calibrate online (everybody else is given the device's true costs)")
    p.add_argument("--trace-offset", type=float, default=0.0, metavar="S",
                   help="start the replay this many seconds into the trace")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder (required)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from tether.core.traces import from_spec
    from tether.policies import PolicyConfig, load_policy_config
    from tether.policies.evaluate import run_policies, summarize
    from tether.policies.report import (format_table, plot_all, write_requests_csv,
                                        write_summary_csv)
    from tether.policies.simulator import SimConfig

    if args.calibrate and args.edge_scale == 1.0:
        raise ConfigError("--calibrate needs --edge-scale X (X != 1): without it the device "
                          "equals the profile and there is nothing to calibrate")
    table, profile, manifest = _load_table(args)
    policy_cfg = load_policy_config(str(args.policy_config)) if args.policy_config else PolicyConfig()
    uplink = from_spec(args.trace)
    downlink = from_spec(args.downlink) if args.downlink else None
    sim_cfg = SimConfig(n_requests=args.requests, arrival=args.arrival, rate_hz=args.rate,
                        seed=args.seed, rtt_seconds=args.rtt_ms / 1000,
                        cloud_queue_seconds=args.cloud_queue_ms / 1000,
                        deadline_seconds=args.deadline, trace_offset_seconds=args.trace_offset)
    names = tuple(n.strip() for n in args.policies.split(",") if n.strip())
    if "oracle" not in names:         # the reference of the ratio columns and regret.png
        names += ("oracle",)
    results = run_policies(table, uplink, names, policy_cfg, sim_cfg, downlink, manifest=manifest,
                           profile=profile if args.calibrate else None)
    rows = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_requests_csv(results, args.out / "requests.csv")
    write_summary_csv(rows, args.out / "summary.csv")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    plots = [] if args.no_plots else plot_all(results, uplink, args.out, args.trace_offset)
    print(f"{table.model_id} on {uplink!r}, {args.requests} requests at {args.rate:g} Hz")
    print(format_table(rows))
    written = ["requests.csv", "summary.csv", "summary.json"] + [p.name for p in plots
                                                                   if p.is_file()]
    print(f"wrote {args.out}/{', '.join(written)}")
    return 0


def _load_table(args: argparse.Namespace):  # noqa: ANN202 - CostTable, imported lazily
    """(device table: edge times x --edge-scale, profiled table, the bundle's manifest or None)."""
    from tether.core.bundle import Manifest
    from tether.core.types import CostTable
    from tether.policies import scale_edge

    manifest = None
    if args.bundle is not None:
        manifest = Manifest.load(args.bundle)
        if not manifest.cost_table:
            raise ConfigError(f"bundle {args.bundle} has no cost table; run `tether profile {args.bundle}`")
        table = CostTable.load(args.bundle / manifest.cost_table)
    else:
        table = CostTable.load(args.cost_table)
    if table.meta.get("busy"):
        import sys
        print("warning: this cost table was profiled on a busy machine (meta.busy in costs.json: "
              "the timings spread widely); the simulation inherits its noise. Re-run "
              "`tether profile DIR` on an idle machine.", file=sys.stderr)
    device = scale_edge(table, args.edge_scale) if args.edge_scale != 1.0 else table
    return device, table, manifest
