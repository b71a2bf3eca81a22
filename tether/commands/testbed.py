"""`tether testbed link|calibrate|probe|run`: emulated links, calibration, experiments."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``testbed`` and its sub-commands."""
    tb = subparsers.add_parser(
        "testbed", help="network-emulated testbed: trace-driven links, calibration, experiments",
        description="Run the cloud and edge agents as real processes over an emulated link "
                    "that replays bandwidth traces (see docs/testbed.md).")
    sub = tb.add_subparsers(dest="testbed_command", metavar="SUBCOMMAND")
    tb.set_defaults(handler=lambda args: tb.print_help() or 2)
    _add_link_parser(sub)
    _add_calibrate_parser(sub)
    _add_run_parsers(sub)


def _add_link_parser(sub: argparse._SubParsersAction) -> None:
    link = sub.add_parser("link", help="run a userspace trace-driven TCP relay (no root needed)",
                          description="Listen on --listen, relay to --target, shaping the "
                                      "uplink (client->target) and downlink by their traces.")
    link.add_argument("--target", required=True, metavar="HOST:PORT", type=_hostport,
                      help="address to relay to (required)")
    link.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT", type=_hostport,
                      help="listen address (port 0: any free port; default 127.0.0.1:0)")
    link.add_argument("--count", type=int, default=1, metavar="N",
                      help="N independent links (one per edge) on consecutive or free ports")
    link.add_argument("--ports-file", type=Path, metavar="FILE",
                      help="write {'ports': [...], 'start_wall': ...} here once listening")
    link.add_argument("--stats", metavar="FILE", help="per-second delivered bytes, JSON")
    link.epilog = "SIGUSR1 restarts the trace clock (at --start-offset); SIGTERM stops."
    _add_link_args(link)
    link.set_defaults(handler=_run_link)


def _add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate", help="bulk data through the userspace link vs its trace",
                         description="Per-second delivered throughput against the trace "
                                     "(target within 5%) and added one-way delay (target 1 ms).")
    _add_link_args(cal, trace_flag="--trace")
    cal.add_argument("--duration", type=float, default=10.0, metavar="S",
                     help="seconds of bulk transfer (default 10)")
    cal.add_argument("--probes", type=int, default=50, metavar="N",
                     help="delay probes (default 50)")
    cal.add_argument("--json", type=Path, metavar="FILE", help="write the full report here")
    cal.add_argument("--backend", choices=("userspace", "kernel"), default="userspace",
                     help="link to calibrate: userspace relay (default) or kernel "
                          "netns+veth+tbf (root)")
    cal.set_defaults(handler=_run_calibrate)


def _add_run_parsers(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("probe",
                        help="what this machine supports (root, netns, tbf, netem, cgroups)")
    pr.set_defaults(handler=_run_probe)

    run = sub.add_parser("run", help="run a scenario TOML: cloud, links and edges as processes",
                         description="Run each policy of SCENARIO on the same traces and seed; "
                                     "write requests.csv, summary.csv/.md, plots and meta.json.")
    run.add_argument("scenario", type=Path, metavar="SCENARIO.toml")
    run.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="results folder (required)")
    run.add_argument("--duration", type=float, metavar="S", help="override duration_s")
    run.add_argument("--assets", type=Path, metavar="DIR",
                     help="shared assets folder (CIFAR-10 images, pretrained weights, traces)")
    run.add_argument("--bundle", type=Path, metavar="DIR",
                     help="use this bundle instead of the scenario's model/bundle")
    run.add_argument("--no-progress", action="store_true", help="hide progress output")
    run.set_defaults(handler=_run_scenario)

    rep = sub.add_parser("report", help="rewrite CSV, summary and plots of a finished run",
                         description="Recompute requests.csv, summary.csv/.md and the plots of "
                                     "DIR from its raw_rows.json and meta.json.")
    rep.add_argument("out", type=Path, metavar="DIR")
    rep.set_defaults(handler=lambda args: _report(args.out))


def _add_link_args(p: argparse.ArgumentParser, trace_flag: str = "--up") -> None:
    p.add_argument(trace_flag, dest="up", default="constant:10", metavar="TRACE",
                   help="uplink trace: mahimahi/Pensieve file or spec like lte-like, "
                        "constant:MBPS, onoff:MBPS:ON_S:OFF_S (default constant:10)")
    if trace_flag == "--up":
        p.add_argument("--down", default=None, metavar="TRACE",
                       help="downlink trace (default: the uplink trace)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way propagation delay")
    p.add_argument("--loss", type=float, default=0.0, help="segment loss probability [0, 1)")
    p.add_argument("--rto-ms", type=float, default=200.0, help="delay charged per lost segment")
    p.add_argument("--queue-kb", type=int, default=256, help="queue bound per direction, KiB")
    p.add_argument("--start-offset", type=float, default=0.0, metavar="S",
                   help="start this many seconds into the trace")
    p.add_argument("--outage", action="append", default=[], metavar="START:DURATION",
                   help="extra outage window in trace seconds; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the loss process")


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None


def _link_config(args: argparse.Namespace):
    from tether.core.errors import ConfigError
    from tether.testbed.link import LinkConfig
    try:
        outages = tuple(tuple(float(v) for v in o.split(":")) for o in args.outage)
    except ValueError:
        raise ConfigError(f"--outage takes START:DURATION seconds, got {args.outage}") from None
    return LinkConfig(delay_ms=args.delay_ms, loss=args.loss, rto_ms=args.rto_ms,
                      queue_bytes=args.queue_kb * 1024, start_offset=args.start_offset,
                      outages=outages, seed=args.seed)  # type: ignore[arg-type]


def _run_link(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from tether.core.traces import from_spec
    from tether.core.types import write_json_atomic
    from tether.testbed.link import Link, new_event_loop, serve_links

    cfg = _link_config(args)
    up = from_spec(args.up)
    down = from_spec(args.down) if args.down else up
    host, port = args.listen
    links = [Link(up, down, args.target, cfg, (host, port + i if port else 0))
             for i in range(max(1, args.count))]
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: [link.reset_clock() for link in links])

    def ready(ports: list[int]) -> None:
        info = {"ports": ports, "start_wall": links[0].start_wall, "up": up.name,
                "down": down.name, "config": vars(args) | {"target": list(args.target)}}
        if args.ports_file:
            write_json_atomic(args.ports_file, json.loads(json.dumps(info, default=str)))
        print(f"tether link: listening on {host}:{ports} -> {args.target[0]}:{args.target[1]} "
              f"(up {up!r}, down {down!r}, delay {cfg.delay_ms:g} ms, loss {cfg.loss:g})",
              flush=True)

    start = time.time()
    loop.run_until_complete(serve_links(links, ready, stop, args.stats))
    print(f"tether link: stopped after {time.time() - start:.1f} s", flush=True)
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from tether.core.traces import from_spec
    from tether.core.types import write_json_atomic
    from tether.testbed.calibrate import calibrate
    from tether.testbed.platform import probe

    trace = from_spec(args.up)
    print(f"calibrating the {args.backend} link on {trace!r} for {args.duration:g} s", flush=True)
    report = calibrate(trace, _link_config(args), duration_s=args.duration, probes=args.probes,
                       backend=args.backend)
    print(f"{'second':>6} {'trace Mbit/s':>13} {'delivered':>10} {'error':>8}")
    for row in report.per_second:
        exp, got = row["expected"], row["delivered"]
        err = f"{got / exp - 1:+.2%}" if exp else "outage"
        print(f"{row['second']:>6} {exp * 8e-6:>13.3f} {got * 8e-6:>10.3f} {err:>8}")
    print(report.summary())
    if args.json:
        info = probe(network=False)
        write_json_atomic(args.json, report.to_dict() | {"kernel": info.kernel,
                                                          "trace_spec": args.up})
    return 0 if report.passed else 1


def _run_probe(args: argparse.Namespace) -> int:
    from tether.testbed.platform import probe
    info = probe()
    print(json.dumps(info.to_dict(), indent=2))
    return 0


def _report(out: Path) -> int:
    from tether.testbed.runner import reanalyze
    reanalyze(out)
    return 0


def _run_scenario(args: argparse.Namespace) -> int:
    from tether.testbed.runner import run_scenario_file
    run_scenario_file(args.scenario, args.out, duration=args.duration, assets=args.assets,
                      progress=not args.no_progress, bundle=args.bundle)
    return 0
