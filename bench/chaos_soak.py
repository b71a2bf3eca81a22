"""Chaos soak: the chaos ledger (tether.testbed.chaos) for many minutes, with its numbers.

    .venv/bin/python bench/chaos_soak.py [--minutes 20] [--edges 2] [--rate 6] [--seed 0]
                                         [--bundle DIR] [--out DIR]

Real ``tether cloud``, ``tether testbed link`` and ``tether edge`` processes; a seeded Poisson
stream per edge; every few seconds a seeded fault (cloud SIGKILL + restart, cloud SIGSTOP
2 s, link SIGSTOP 3 s, a burst to an edge + heavy batches straight to the cloud, fuzzed
frames to the cloud and an edge). Prints requests, outcomes, faults by kind, lost /
duplicated / mismatched answers, refusals while healthy, RSS start/warm/peak/end per process
and the load average, then the rule check. Without ``--bundle`` it exports cifar_resnet20
(pretrained weights from the assets when present) into ``--out``.
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

from tether.testbed.chaos import ChaosConfig, check, run_chaos  # noqa: E402


def _bundle(out: Path) -> Path:
    from tether.partitioner import export_bundle
    path = out / "bundle-resnet20"
    if not (path / "manifest.json").is_file():
        assets = Path(os.environ.get("TETHER_ASSETS", Path(__file__).resolve().parents[2]
                                     / "shared" / "assets"))
        weights = sorted((assets / "resnet_cifar").glob("resnet20-*.th"))
        export_bundle("cifar_resnet20", path, weights=weights[0] if weights else None,
                      splits=["layer1.2", "layer2.2"], repeats=1, warmup=0, progress=False)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--edges", type=int, default=2)
    ap.add_argument("--rate", type=float, default=6.0, help="requests/s per edge")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--out", type=Path, default=Path("chaos-soak"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or _bundle(args.out)
    cfg = ChaosConfig(bundle=bundle, out=args.out / "run", duration_s=args.minutes * 60,
                      edges=args.edges, rate_hz=args.rate, seed=args.seed)
    t0 = time.time()
    summary = run_chaos(cfg)
    broken = check(summary)
    print(f"# chaos soak: {summary['seconds'] / 60:.1f} min of stream (+ start/drain), "
          f"{platform.node()}, {os.cpu_count()} cores, started {time.ctime(t0)}")
    print(f"requests {summary['requests']}  outcomes {summary['outcomes']}")
    print(f"faults injected {summary['faults']} (total {sum(summary['faults'].values())})")
    print(f"lost {summary['lost']}  duplicates {summary['duplicates']}  mismatches "
          f"{summary['mismatches']}  errors {summary['errors']}  refusals {summary['refusals']} "
          f"(while healthy {summary['healthy_refusals']})")
    print("| process | life s | RSS start MB | warm | peak | end | peak 1st half | "
          "peak last quarter |")
    print("|---|---|---|---|---|---|---|---|")
    for proc, rss in summary["rss_kb"].items():
        mb = [f"{rss[k] / 1024:.0f}" for k in ("start", "warm", "peak", "end",
                                                 "first_half_peak", "last_quarter_peak")]
        print(f"| {proc} | {rss['seconds']} | " + " | ".join(mb) + " |")
    print(f"load average start {summary['loadavg_start']} end {summary['loadavg_end']}")
    print("rules:", "all kept" if not broken else broken)
    (args.out / "soak-summary.json").write_text(json.dumps(summary | {"broken": broken}, indent=2))
    return 0 if not broken else 1


if __name__ == "__main__":
    sys.exit(main())
