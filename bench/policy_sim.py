"""Policy benchmark: every policy on every real uplink trace, cifar_resnet20 on a weak edge.

    .venv/bin/python bench/policy_sim.py [--bundle /tmp/tether_bench_r20] [--edge-scale 36]
        [--rate 20] [--max-drop 0.03] [--ladder BUNDLE] [--out DIR]

Action space: the bundle's (one list for the simulator, the oracle and every policy):
exported heads at layer1.2, layer2.2, layer3.1 and flatten x tensor codecs, input codecs
at several qualities, the learned-codec ladder and calibrated exits. Codec costs of the
baseline codecs are measured here with tether.codecs on the first 500 lossless CIFAR-10
test images (cached beside the bundle). The learned ladder comes from ``--ladder BUNDLE``
(a bundle whose costs.json holds trained learned codecs and exits, e.g. from `tether codec
train` + `tether codec eval`) or, without it, from the measured points of
docs/benchmarks.md (issue 7: bottleneck codecs at layer3.1, exits at layer2.2 / layer3.1).

Weak edge: the profile is taken on this machine; the device is that profile with every edge
time x ``--edge-scale`` (36: a 0.05-core quota; 16-18x was measured behind 0.1 core).
Baselines are given the device's true costs; tether-adaptive starts from the unscaled
profile and must calibrate online. Traces: the mahimahi uplinks and the Norway HSDPA logs
of ../shared/assets/traces. Per trace every policy sees the same Poisson arrivals; ratios
to the planned hindsight oracle are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.core.bundle import CodecEntry, ExitEntry, Manifest  # noqa: E402
from tether.core.traces import Trace, constant, load_mahimahi, load_pensieve  # noqa: E402
from tether.core.types import CodecCost, CostTable, ExitCost  # noqa: E402
from tether.policies import PolicyConfig, build_cost_model, scale_edge  # noqa: E402
from tether.policies.evaluate import DEFAULT_POLICIES, run_policies, summarize  # noqa: E402
from tether.policies.simulator import SimConfig  # noqa: E402

SPLITS = "layer1.2,layer2.2,layer3.1,flatten"
INPUT_CODECS = ("png", "webp95", "webp90", "webp75", "jpeg95")
SPLIT_CODECS = {"layer1.2": ("int8", "int8+zlib"), "layer2.2": ("fp16", "int8", "int8+zlib"),
                "layer3.1": ("fp16", "int8", "int8+zlib"), "flatten": ("fp16",)}
#: docs/benchmarks.md, issue 7 (1017 lossless images): learned codecs at layer3.1
#: (payload B, header B, top-1, encode s, decode s) and calibrated exits
#: (exit rate, exit top-1; exit-head time from its FLOPs share of the whole model).
DOCS_LADDER = {"bottleneck-b0.003": (37.1, 50, 0.8387), "bottleneck-b0.001": (49.7, 50, 0.8771),
               "bottleneck-b0.0003": (69.1, 51, 0.8820), "bottleneck-b0.0001": (71.4, 51, 0.8918)}
DOCS_CODEC_SECONDS = (0.0008, 0.0014)
DOCS_EXITS = {"layer2.2": (0.163, 0.9458, 0.04), "layer3.1": (0.758, 0.9676, 0.06)}
BASELINES = ("local", "cloud", "static", "neurosurgeon")
#: "better" means a lower mean latency by more than this fraction (not a tie in the noise)
TIE = 0.001
SHOWN = ("adaptive", "causal", "oracle-x") + BASELINES + ("bound",)


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
                    str(weights), "--out", str(bundle), "--splits", SPLITS, "--no-progress"],
                   check=True, cwd=REPO)


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


def baseline_table(bundle: Path, assets: Path, n: int) -> CostTable:
    table = CostTable.load(bundle / "costs.json")
    cache = bundle.parent / (bundle.name + "_bench_codecs.json")
    if cache.is_file():
        saved = json.loads(cache.read_text())
        codecs, full_acc = [CodecCost(**c) for c in saved["codecs"]], saved["full_accuracy"]
    else:
        codecs, full_acc = measure_codecs(bundle, assets, n)
        cache.write_text(json.dumps({"codecs": [vars(c) for c in codecs],
                                     "full_accuracy": full_acc}, indent=1))
    return replace(table, codecs=tuple(codecs), full_accuracy=full_acc)


def with_ladder(table: CostTable, manifest: Manifest, ladder: Path | None) -> tuple[CostTable, Manifest, str]:
    """Add the learned codecs and exits: from a trained bundle, else the documented points."""
    if ladder is not None:
        lt, lm = CostTable.load(ladder / "costs.json"), Manifest.load(ladder)
        learned = {(c.split, c.codec) for c in lm.codecs}
        codecs = tuple(c for c in lt.codecs if (c.split, c.codec) in learned and c.accuracy is not None)
        for entry in lm.codecs:
            manifest = manifest.with_codec(entry)
        for entry in lm.exits:
            manifest = manifest.with_exit(entry)
        table = replace(table, codecs=table.codecs + codecs, exits=lt.exits)
        return table, manifest, f"trained ladder from {ladder} ({len(codecs)} learned codecs)"
    enc, dec = DOCS_CODEC_SECONDS
    codecs = tuple(CodecCost("layer3.1", cid, b, enc, dec, acc, h)
                   for cid, (b, h, acc) in DOCS_LADDER.items())
    exits = tuple(ExitCost(s, frac * table.edge_full_seconds, rate, acc)
                  for s, (rate, acc, frac) in DOCS_EXITS.items())
    for c in codecs:
        manifest = manifest.with_codec(CodecEntry(c.split, c.codec, "bottleneck"))
    for e in exits:
        manifest = manifest.with_exit(ExitEntry(e.split, f"exits/{e.split}.onnx", 0.97))
    return replace(table, codecs=table.codecs + codecs, exits=exits), manifest, \
        "documented ladder (docs/benchmarks.md, issue 7 measured points)"


def split_report(truth: CostTable, manifest: Manifest, max_drop: float) -> None:
    """Why (or whether) a split + codec can ever be chosen on this device: an action whose
    edge work is at least the whole model's is beaten by local on latency *and* on the
    load it puts on the edge, at any bandwidth and any queue, so no policy, the oracle
    included, picks it; the rest must also beat the best full offload somewhere."""
    cfg = PolicyConfig(max_accuracy_drop=max_drop)
    model = build_cost_model(cfg, truth, manifest)
    ok = model.allowed(cfg.floor_for(truth.full_accuracy))
    local = truth.edge_full_seconds
    offload = [c for c, a in zip(model.costs, ok) if a and c.action.kind.value == "offload"]
    print(f"split actions on this device (local {local * 1e3:.1f} ms of edge work):")
    for c, allowed in zip(model.costs, ok):
        if c.action.kind.value != "split":
            continue
        work = c.pre_seconds + c.encode_seconds
        # bandwidth below which its transfer saving pays for its extra edge time over an offload
        beats = [(o.up_bytes - c.up_bytes) * 8 / max(work + c.cloud_seconds - o.encode_seconds
                                                      - o.cloud_seconds, 1e-9) for o in offload]
        below = min(beats) / 1e3
        verdict = ("dominated by local (edge work >= local)" if work >= local else
                   f"beats every allowed offload below {below:.0f} kbit/s" if below > 0
                   else "never beats an offload")
        print(f"  {c.action.key:34s} edge {work * 1e3:6.1f} ms  {c.up_bytes:7.0f} B  "
              f"acc {c.accuracy if c.accuracy is not None else float('nan'):.3f}"
              f"{'' if allowed else ' (below the floor)'}  {verdict}")


def traces(assets: Path, norway_limit: int | None) -> list[tuple[str, Trace]]:
    mm = sorted((assets / "traces" / "mahimahi").glob("*.up"))
    nw = sorted((assets / "traces" / "norway-hsdpa").glob("*.log"))[:norway_limit]
    return [("mahimahi", load_mahimahi(p)) for p in mm] + [("norway", load_pensieve(p)) for p in nw]


def run_trace(truth: CostTable, profile: CostTable, manifest: Manifest, group: str, trace: Trace,
              args: argparse.Namespace) -> tuple[dict, dict]:
    cap = args.requests if group == "mahimahi" else args.norway_requests
    n = int(np.clip(trace.duration_s * args.rate, 300, cap))
    sim = SimConfig(n_requests=n, rate_hz=args.rate, rtt_seconds=args.rtt_ms / 1000,
                    deadline_seconds=args.deadline, seed=args.seed)
    cfg = PolicyConfig(max_accuracy_drop=args.max_drop)
    results = run_policies(truth, trace, DEFAULT_POLICIES + ("oracle-x",), policy_config=cfg, sim_config=sim, manifest=manifest,
                           profile=profile, beam=args.beam)
    rows = {r["policy"]: r for r in summarize(results)}
    shares = action_shares(results)
    rows["oracle"]["exact"] = results["oracle"].meta.get("exact")
    if args.decompose:
        rows.update(decompose(truth, manifest, trace, cfg, sim, args.beam, results["oracle"]))
    return rows, shares


def decompose(truth: CostTable, manifest: Manifest, trace: Trace, cfg: PolicyConfig,
              sim: SimConfig, beam: int, oracle) -> dict:
    """Where adaptive's gap to the oracle comes from, one piece of knowledge at a time:
    ``adaptive-true`` is adaptive given the device's true compute (no calibration to do);
    on a constant link at the trace's mean rate (nothing to estimate or foresee about the
    link), ``flat-causal`` (adaptive, true compute) against ``flat-oracle-x`` (knows the
    future arrivals) isolates what knowing the arrivals is worth."""
    ref = oracle.latencies
    true = run_policies(truth, trace, ("adaptive",), policy_config=cfg, sim_config=sim,
                        manifest=manifest)["adaptive"].latencies
    flat_trace = constant(trace.mean_bps() / 1e6, trace.duration_s)
    flat = run_policies(truth, flat_trace, ("causal", "oracle-x"), policy_config=cfg,
                        sim_config=sim, manifest=manifest, beam=beam)
    fc, fx = flat["causal"].latencies, flat["oracle-x"].latencies
    return {"adaptive-true": _ratio_row(true, ref), "flat-causal": _ratio_row(fc, fx),
            "flat-oracle-x": _ratio_row(fx, fx)}


def _ratio_row(lat: np.ndarray, base: np.ndarray) -> dict:
    p95 = float(np.percentile(lat, 95))
    return {"mean_s": float(lat.mean()), "p95_s": p95,
            "mean_vs_oracle": float(lat.mean() / base.mean()),
            "p95_vs_oracle": p95 / float(np.percentile(base, 95))}


def action_shares(results: dict) -> dict:
    """Share of requests per action kind (local, exit, split, offload) for adaptive and oracle."""
    out = {}
    for name in ("adaptive", "oracle"):
        acts = [r.action for r in results[name].requests]
        kinds = [a.split(":")[0] for a in acts]
        out[name] = {k: kinds.count(k) / len(kinds) for k in ("local", "exit", "split", "offload")}
        out[name]["learned"] = sum("bottleneck" in a for a in acts) / len(acts)
    return out


def verdict(rows: dict) -> dict:
    a = rows["adaptive"]
    best = min(rows[b]["mean_s"] for b in BASELINES)
    x = rows["oracle-x"]
    return {"mean_vs_oracle_x": a["mean_s"] / x["mean_s"], "p95_vs_oracle_x": a["p95_s"] / x["p95_s"],
            "mean_ok": a["mean_vs_oracle"] <= 1.10, "p95_ok": a["p95_vs_oracle"] <= 1.25,
            "beats_all": all(a["mean_s"] < (1 - TIE) * rows[b]["mean_s"] for b in BASELINES),
            "gain_vs_best": 1.0 - a["mean_s"] / best}


def print_row(group: str, name: str, rows: dict, shares: dict) -> None:
    cols = " ".join(f"{rows[p]['mean_vs_oracle']:5.2f}/{rows[p]['p95_vs_oracle']:4.2f}" for p in SHOWN)
    v = verdict(rows)
    flags = "".join("Y" if v[k] else "n" for k in ("mean_ok", "p95_ok", "beats_all"))
    sa, so = shares["adaptive"], shares["oracle"]
    mix = lambda s: "/".join(f"{100 * s[k]:.0f}" for k in ("local", "exit", "split", "offload"))  # noqa: E731
    print(f"{group:8s} {name[:28]:28s} {rows['oracle']['mean_s'] * 1e3:6.1f} {cols} "
          f"{100 * v['gain_vs_best']:5.1f}% {flags} {'E' if rows['oracle']['exact'] else '~'} "
          f"a:{mix(sa)} o:{mix(so)}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("/tmp/tether_bench_r20"))
    p.add_argument("--ladder", type=Path, default=None, help="bundle with trained learned codecs")
    p.add_argument("--edge-scale", type=float, default=36.0)
    p.add_argument("--rate", type=float, default=40.0, help="Poisson arrivals per second")
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--deadline", type=float, default=1.0)
    p.add_argument("--max-drop", type=float, default=0.03, help="accuracy budget (top-1, absolute)")
    p.add_argument("--requests", type=int, default=2000, help="max requests per mahimahi trace")
    p.add_argument("--norway-requests", type=int, default=1000, help="max per Norway log")
    p.add_argument("--images", type=int, default=500, help="images for codec accuracy")
    p.add_argument("--norway-limit", type=int, default=None)
    p.add_argument("--beam", type=int, default=64, help="planner's cap on kept queue states")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write per-trace rows as JSON here")
    p.add_argument("--decompose", action="store_true",
                   help="also run adaptive with the true compute, and causal vs oracle-x on a "
                        "constant link at each trace's mean rate (the gap's parts)")
    args = p.parse_args()
    torch.set_num_threads(1)
    assets = assets_dir()
    ensure_bundle(args.bundle, assets)
    table, manifest, source = with_ladder(baseline_table(args.bundle, assets, args.images),
                                          Manifest.load(args.bundle), args.ladder)
    truth = scale_edge(table, args.edge_scale)
    print(f"cifar_resnet20: profile local {table.edge_full_seconds * 1e3:.2f} ms, device x"
          f"{args.edge_scale:g} -> {truth.edge_full_seconds * 1e3:.1f} ms; cloud full "
          f"{table.cloud_full_seconds * 1e3:.2f} ms; full accuracy {table.full_accuracy:.4f}, "
          f"budget {args.max_drop:g}; RTT {args.rtt_ms:g} ms, Poisson {args.rate:g}/s, deadline "
          f"{args.deadline:g} s\nladder: {source}")
    split_report(truth, manifest, args.max_drop)
    print("ratios mean/p95 vs the planned oracle; gain = adaptive vs best of local/cloud/static/"
          "neurosurgeon; flags: mean<=1.10, p95<=1.25, beats all four (by > 0.1 %); E = plan exact; "
          "mix local/exit/split/offload %")
    print(f"{'set':8s} {'trace':28s} {'or ms':>6s} " + " ".join(f"{s[:10]:>10s}" for s in SHOWN))
    t0, all_rows = time.perf_counter(), []
    for group, trace in traces(assets, args.norway_limit):
        rows, shares = run_trace(truth, table, manifest, group, trace, args)
        print_row(group, trace.name, rows, shares)
        all_rows.append({"group": group, "trace": trace.name, "rows": rows, "shares": shares,
                         **verdict(rows)})
    report(all_rows, time.perf_counter() - t0)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "policy_sim.json").write_text(json.dumps(all_rows, indent=1, default=str))
    return 0


def report(all_rows: list[dict], seconds: float) -> None:
    print(f"\n{len(all_rows)} traces in {seconds:.0f} s")
    for group in ("mahimahi", "norway", "all"):
        sub = [r for r in all_rows if group in (r["group"], "all")]
        if not sub:
            continue
        ratio = lambda name, k: np.array([r["rows"][name][k] for r in sub])  # noqa: E731
        gain = np.array([r["gain_vs_best"] for r in sub])
        print(f"{group}: adaptive mean/oracle median {np.median(ratio('adaptive', 'mean_vs_oracle')):.3f}"
              f", p95/oracle median {np.median(ratio('adaptive', 'p95_vs_oracle')):.3f}; causal "
              f"{np.median(ratio('causal', 'mean_vs_oracle')):.3f}; oracle-x "
              f"{np.median(ratio('oracle-x', 'mean_vs_oracle')):.3f}; adaptive/oracle-x mean "
              f"{np.median([r['mean_vs_oracle_x'] for r in sub]):.3f} p95 "
              f"{np.median([r['p95_vs_oracle_x'] for r in sub]):.3f}; bound "
              f"{np.median(ratio('bound', 'mean_vs_oracle')):.3f}; beats all four on "
              f"{sum(r['beats_all'] for r in sub)}/{len(sub)}; gain vs best baseline median "
              f"{100 * np.median(gain):.1f}%; plan exact on {sum(bool(r['rows']['oracle']['exact']) for r in sub)}"
              f"/{len(sub)}")
        for name in ("adaptive", "causal", "oracle", "oracle-x") + BASELINES:
            m = np.mean(ratio(name, "mean_s")) * 1e3
            beaten = sum(r["rows"]["adaptive"]["mean_s"] < (1 - TIE) * r["rows"][name]["mean_s"]
                         for r in sub)
            print(f"  {name:13s} mean {m:7.1f} ms, accuracy {np.nanmean(ratio(name, 'accuracy')):.4f}, "
                  f"adaptive better on {beaten}/{len(sub)}")
        if "adaptive-true" in sub[0]["rows"]:
            med = lambda name: np.median(ratio(name, "mean_vs_oracle"))  # noqa: E731
            print(f"  decomposition (median mean ratio): adaptive {med('adaptive'):.3f}, with the "
                  f"true compute {med('adaptive-true'):.3f}, + true past bandwidth (causal) "
                  f"{med('causal'):.3f}, + future link and arrivals (oracle-x) "
                  f"{med('oracle-x'):.3f}, + exits' outcomes (oracle) 1; constant link: causal / "
                  f"oracle-x {med('flat-causal'):.3f} (knowing the arrivals)")
        learned = np.mean([[r["shares"][n]["learned"] for n in ("adaptive", "oracle")] for r in sub], 0)
        print(f"  learned-codec share: adaptive {100 * learned[0]:.1f}%, oracle {100 * learned[1]:.1f}%")


if __name__ == "__main__":
    sys.exit(main())
