"""Calibration of tether's emulated links against their traces, side by side.

    .venv/bin/python bench/testbed_calibrate.py [--seconds 8] [--assets ../shared/assets]

For each trace (synthetic ones always; the shared mahimahi and Norway HSDPA uplinks when
the assets are there) and each backend (the userspace relay always; the kernel netns + veth
+ tbf backend when root, namespaces and tbf are available), a bulk sender saturates the
link for ``--seconds`` and a sink bins what arrives per second. Printed per row: delivered /
trace bytes over the run, the mean and max per-second |error|, the share of seconds within
5 %, and the added one-way delay error of idle-link probes (mean, median, p95).
Targets: per-second throughput within 5 %, added delay within 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (only to pin threads: the bench itself does not use it)

from tether.core import traces  # noqa: E402
from tether.testbed.calibrate import calibrate  # noqa: E402
from tether.testbed.link import LinkConfig  # noqa: E402
from tether.testbed.platform import probe  # noqa: E402

torch.set_num_threads(1)

ASSET_TRACES = (
    ("mahimahi Verizon-LTE-short.up", "traces/mahimahi/Verizon-LTE-short.up"),
    ("mahimahi TMobile-LTE-short.up", "traces/mahimahi/TMobile-LTE-short.up"),
    ("mahimahi TMobile-UMTS-driving.up", "traces/mahimahi/TMobile-UMTS-driving.up"),
    ("norway bus 2010-09-28",
     "traces/norway-hsdpa/bus.ljansbakken-oslo-report.2010-09-28_1407CEST.log"),
)


def _traces(assets: Path | None) -> list[tuple[str, traces.Trace]]:
    out = [("constant 8 Mbit/s", traces.constant(8.0, 60)),
           ("steps 10/2/6 Mbit/s", traces.steps([(3, 10.0), (3, 2.0), (3, 6.0)])),
           ("lte-like (demo)", traces.lte_like(120))]
    if assets is not None:
        out += [(name, traces.load_trace(assets / rel)) for name, rel in ASSET_TRACES
                if (assets / rel).is_file()]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--assets", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write all reports here")
    args = parser.parse_args()
    assets = args.assets or (Path(os.environ["TETHER_ASSETS"]) if "TETHER_ASSETS" in os.environ
                             else Path(__file__).resolve().parents[2] / "shared" / "assets")
    assets = assets if (assets / "README.md").is_file() else None
    info = probe()
    backends = ["userspace"] + (["kernel"] if info.root and info.netns and info.tc_tbf else [])
    print(f"machine: {platform.node()} kernel {info.kernel}, {info.cpus} CPUs, root={info.root}, "
          f"tbf={info.tc_tbf}, netem={info.netem}; load {os.getloadavg()[0]:.1f}")
    print(f"{'trace':34} {'backend':9} {'Mbit/s':>7} {'deliv/trace':>11} {'mean|err|':>9} "
          f"{'max|err|':>8} {'<=5%':>5} {'dly mean':>8} {'median':>7} {'p95':>6}")
    reports = []
    for name, trace in _traces(assets):
        for backend in backends:
            delay = args.delay_ms if backend == "userspace" or info.netem else 0.0
            start = time.monotonic()
            r = calibrate(trace, LinkConfig(delay_ms=delay), duration_s=args.seconds,
                          probes=args.probes, probe_gap_s=0.03, backend=backend)
            mbps = sum(p["expected"] for p in r.per_second) * 8e-6 / max(1, len(r.per_second))
            print(f"{name:34} {backend:9} {mbps:7.2f} {r.total_ratio:11.4f} "
                  f"{r.throughput_error_mean:9.2%} {r.throughput_error_max:8.2%} "
                  f"{r.within_5pct:5.0%} {r.delay_error_ms_mean:+7.2f}ms "
                  f"{r.delay_error_ms_median:+6.2f} {r.delay_error_ms_p95:6.2f}"
                  f"  ({time.monotonic() - start:.0f} s)", flush=True)
            reports.append({"trace": name, **r.to_dict()})
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    print("delay columns: measured - (configured delay + trace transfer time), ms; the kernel "
          "backend adds no delay here when netem is missing (configured 0 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
