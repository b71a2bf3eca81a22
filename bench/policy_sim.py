"""Policy benchmark: every policy on every real uplink trace, cifar_resnet20 on a throttled edge.

    .venv/bin/python bench/policy_sim.py [--bundle /tmp/r20] [--edge-scale 50] [--out DIR]

The cost table is the one `tether partition cifar_resnet20` measures (created in --bundle
if missing), extended with codec costs measured here with tether.codecs on the first 500
lossless CIFAR-10 test images (honest-evaluation protocol; cached next to the bundle).
Edge-side times are multiplied by --edge-scale to emulate a weak edge device. Traces: the
four mahimahi uplinks and the 68 Norway HSDPA logs of ../shared/assets/traces. For each
trace all policies see the same Poisson arrivals; ratios to the hindsight oracle are
measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.core.traces import Trace, load_mahimahi, load_pensieve  # noqa: E402
from tether.core.types import CodecCost, CostTable  # noqa: E402
from tether.policies import PolicyConfig, scale_edge  # noqa: E402
from tether.policies.evaluate import regret_flattening, run_policies, summarize  # noqa: E402
from tether.policies.simulator import SimConfig  # noqa: E402

INPUT_CODECS = ("png", "webp90", "jpeg90", "jpeg75")
SPLIT_CODECS = {"layer1.2": ("int8+zlib",), "layer2.2": ("fp16", "int8", "int8+zlib"),
                "layer3.2": ("fp16", "int8", "int8+zlib"), "flatten": ("fp16",)}
BASELINES = ("local", "cloud", "static", "neurosurgeon")


def assets_dir() -> Path:
    env = os.environ.get("TETHER_ASSETS")
    path = Path(env) if env else REPO.parent / "shared" / "assets"
    if not (path / "README.md").is_file():
        sys.exit(f"assets not found at {path}: set TETHER_ASSETS")
    return path


def ensure_bundle(bundle: Path, assets: Path) -> None:
    if (bundle / "manifest.json").is_file():
        return
    weights = next((assets / "resnet_cifar").glob("resnet20-*.th"))
    subprocess.run([sys.executable, "-m", "tether", "partition", "cifar_resnet20", "--weights",
                    str(weights), "--out", str(bundle), "--no-progress"], check=True, cwd=REPO)


def measure_codecs(bundle: Path, assets: Path, n: int) -> tuple[list[CodecCost], float]:
    """Codec sizes/times/accuracy on the first ``n`` lossless images, and full accuracy."""
    from tether.codecs import make_codec
    from tether.codecs.evaluate import measure_codec, predict
    from tether.partitioner import BundleModel

    data = np.load(assets / "cifar10" / "cifar10_test_first1017_lossless.npz")
    x = torch.from_numpy(data["x"][:n]).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(data["y"][:n])
    bm = BundleModel.load(bundle)
    full = bm.full_model()
    full_acc = float((predict(full, x) == y).double().mean())
    costs = [measure_codec(make_codec(c), "input", x, full, y).to_cost() for c in INPUT_CODECS]
    for split, codecs in SPLIT_CODECS.items():
        head, tail = bm.head(split), bm.tail(split)
        with torch.no_grad():
            feats = head(x)
        costs += [measure_codec(make_codec(c), split, feats, tail, y).to_cost() for c in codecs]
    return costs, full_acc


def cost_table(bundle: Path, assets: Path, n: int) -> CostTable:
    table = CostTable.load(bundle / "costs.json")
    if table.codecs:
        return table
    cache = bundle.parent / (bundle.name + "_bench_codecs.json")
    if cache.is_file():
        saved = json.loads(cache.read_text())
        codecs, full_acc = [CodecCost(**c) for c in saved["codecs"]], saved["full_accuracy"]
    else:
        codecs, full_acc = measure_codecs(bundle, assets, n)
        cache.write_text(json.dumps({"codecs": [vars(c) for c in codecs],
                                     "full_accuracy": full_acc}, indent=1))
    from dataclasses import replace
    return replace(table, codecs=tuple(codecs), full_accuracy=full_acc)


def traces(assets: Path, norway_limit: int | None) -> list[tuple[str, Trace]]:
    mm = sorted((assets / "traces" / "mahimahi").glob("*.up"))
    nw = sorted((assets / "traces" / "norway-hsdpa").glob("*.log"))[:norway_limit]
    return [("mahimahi", load_mahimahi(p)) for p in mm] + [("norway", load_pensieve(p)) for p in nw]


def run_trace(table: CostTable, group: str, trace: Trace, args: argparse.Namespace) -> dict:
    cap = args.requests if group == "mahimahi" else args.norway_requests
    n = int(np.clip(trace.duration_s * args.rate, 300, cap))
    sim = SimConfig(n_requests=n, rate_hz=args.rate, rtt_seconds=args.rtt_ms / 1000,
                    deadline_seconds=args.deadline, seed=args.seed)
    results = run_policies(table, trace, policy_config=PolicyConfig(), sim_config=sim)
    rows = {r["policy"]: r for r in summarize(results)}
    rows["bandit"]["flattening"] = regret_flattening(results["bandit"], results["oracle"])
    return rows


def verdict(rows: dict) -> dict:
    a = rows["adaptive"]
    return {"mean_ok": a["mean_vs_oracle"] <= 1.05, "p95_ok": a["p95_vs_oracle"] <= 1.10,
            "beats_all": all(a["mean_s"] < rows[b]["mean_s"] for b in BASELINES)}


def print_row(group: str, name: str, rows: dict) -> None:
    cols = " ".join(f"{rows[p]['mean_vs_oracle']:5.2f}/{rows[p]['p95_vs_oracle']:4.2f}"
                    for p in ("adaptive",) + BASELINES + ("bandit",))
    v = verdict(rows)
    flags = "".join("Y" if v[k] else "n" for k in ("mean_ok", "p95_ok", "beats_all"))
    print(f"{group:8s} {name[:34]:34s} {rows['oracle']['mean_s'] * 1e3:6.1f} {cols} "
          f"{rows['bandit']['flattening']:5.2f} {flags}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("/tmp/tether_bench_r20"))
    p.add_argument("--edge-scale", type=float, default=200.0)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--deadline", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=2000, help="max requests per mahimahi trace")
    p.add_argument("--norway-requests", type=int, default=1000, help="max per Norway log")
    p.add_argument("--images", type=int, default=500, help="images for codec accuracy")
    p.add_argument("--norway-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write per-trace rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    assets = assets_dir()
    ensure_bundle(args.bundle, assets)
    table = scale_edge(cost_table(args.bundle, assets, args.images), args.edge_scale)
    print(f"cifar_resnet20: edge x{args.edge_scale:g} -> local {table.edge_full_seconds * 1e3:.1f} ms, "
          f"cloud full {table.cloud_full_seconds * 1e3:.2f} ms, full accuracy {table.full_accuracy:.4f}; "
          f"RTT {args.rtt_ms:g} ms, Poisson {args.rate:g}/s, deadline {args.deadline:g} s")
    print("ratios are mean/p95 vs the hindsight oracle; flags: adaptive mean<=1.05, p95<=1.10, "
          "beats local+cloud+static+neurosurgeon on mean")
    print(f"{'set':8s} {'trace':34s} {'or ms':>6s} {'adaptive':>10s} {'local':>10s} {'cloud':>10s} "
          f"{'static':>10s} {'neurosurg':>10s} {'bandit':>10s} {'flat':>5s} flags")
    t0, all_rows = time.perf_counter(), []
    for group, trace in traces(assets, args.norway_limit):
        rows = run_trace(table, group, trace, args)
        print_row(group, trace.name, rows)
        all_rows.append({"group": group, "trace": trace.name, "rows": rows, **verdict(rows)})
    report(all_rows, time.perf_counter() - t0)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "policy_sim.json").write_text(json.dumps(all_rows, indent=1, default=str))
    return 0


def report(all_rows: list[dict], seconds: float) -> None:
    print(f"\n{len(all_rows)} traces in {seconds:.0f} s")
    for group in ("mahimahi", "norway"):
        sub = [r for r in all_rows if r["group"] == group]
        if not sub:
            continue
        ad = np.array([[r["rows"]["adaptive"]["mean_vs_oracle"], r["rows"]["adaptive"]["p95_vs_oracle"]]
                       for r in sub])
        print(f"{group}: adaptive mean/oracle median {np.median(ad[:, 0]):.3f} (max {ad[:, 0].max():.3f}), "
              f"p95/oracle median {np.median(ad[:, 1]):.3f} (max {ad[:, 1].max():.3f}); "
              f"mean<=1.05 on {sum(r['mean_ok'] for r in sub)}/{len(sub)}, "
              f"p95<=1.10 on {sum(r['p95_ok'] for r in sub)}/{len(sub)}, "
              f"beats every baseline on {sum(r['beats_all'] for r in sub)}/{len(sub)}")
        for name in ("adaptive",) + BASELINES + ("bandit",):
            m = np.mean([r["rows"][name]["mean_s"] for r in sub]) * 1e3
            print(f"  {name:13s} mean latency averaged over traces {m:7.1f} ms, accuracy "
                  f"{np.mean([r['rows'][name]['accuracy'] for r in sub]):.4f}")
        flat = np.array([r["rows"]["bandit"]["flattening"] for r in sub])
        print(f"  bandit regret flattening (last third / first third per-request regret): median "
              f"{np.nanmedian(flat):.2f}, < 1 on {int(np.sum(flat < 1))}/{len(sub)}")


if __name__ == "__main__":
    sys.exit(main())
