"""Rate-accuracy benchmark of tether's codecs and early exits on cifar_resnet20 (pretrained).

Steps (each a normal `tether` command, so the numbers are what users get):
  1. `tether partition cifar_resnet20 --weights <assets>/resnet_cifar/resnet20-*.th` (unless --bundle)
  2. `tether codec train` at --codec-split for each beta, with an early exit at each --exit-splits
     (training/calibration on CIFAR-10 JPEG images 1017..9999 only); skipped with --no-train
  3. `tether codec eval` at --eval-splits plus JPEG/WebP/PNG of the input (lossless images 0..1016)
  4. prints, from that one eval run: each learned codec's bytes and top-1 loss against the best
     input codec of at least its accuracy (ratio), fp16/int8 against fp32 at each split, and
     the exits' accuracy-vs-exit-rate curve.

With ``--family student`` (issue 11) step 2 trains the student-encoder ladder instead (one
shared stage 1, then one stage-2 codec per beta, `tether codec train --family student`), and
step 4 checks the targets: >= full-1.0 pt at <= 200 B/sample, <= 0.5 pt loss at <= 400 B,
>= 3x fewer bytes than WebP at every accuracy WebP reaches, and the edge cost (student encoder
FLOPs and ONNX ms against the original head at the same split).

Run: .venv/bin/python bench/codecs_rate_accuracy.py [--assets DIR] [--bundle DIR] [--no-train]
     .venv/bin/python bench/codecs_rate_accuracy.py --family student --codec-split layer3.2 \
         --eval-splits layer3.2 --betas 0.0003 0.001 0.003 0.01 [--model cifar_resnet56 ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tether.cli import main as tether  # noqa: E402

INPUT_CODECS = ["png", "jpeg10", "jpeg25", "jpeg50", "jpeg75", "jpeg90", "jpeg95", "webp5",
                "webp10", "webp25", "webp50", "webp75", "webp90", "webp95"]


def _args() -> argparse.Namespace:
    default_assets = os.environ.get("TETHER_ASSETS", str(REPO.parent / "shared" / "assets"))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", type=Path, default=Path(default_assets))
    p.add_argument("--bundle", type=Path, help="existing bundle (else partition --model)")
    p.add_argument("--model", default="cifar_resnet20", help="cifar_resnet20|32|44|56")
    p.add_argument("--family", choices=("bottleneck", "student"), default="bottleneck")
    p.add_argument("--student-args", default="--stem-extra 3 2 --decoder-blocks 1 --freeze-stem --stage1-epochs 6 "
                   "--epochs 5 --batch-size 32 --stage2-lr-scale 1.0",
                   help="extra `codec train --family student` arguments (one string)")
    p.add_argument("--no-train", action="store_true", help="evaluate what the bundle holds")
    p.add_argument("--codec-split", default="layer3.1")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0003, 0.001, 0.003])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--exit-splits", nargs="*", default=["layer2.2", "layer3.1"])
    p.add_argument("--eval-splits", nargs="+", default=["layer1.2", "layer2.2", "layer3.1"])
    p.add_argument("--limit", type=int, help="first N images only (smoke runs)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def _run(argv: list[str]) -> None:
    t0 = time.time()
    rc = tether(argv)
    print(f"[{time.time() - t0:7.1f} s] tether {' '.join(argv[:3])} ... -> {rc}", flush=True)
    if rc:
        raise SystemExit(rc)


def _bundle(args: argparse.Namespace) -> Path:
    if args.bundle:
        return args.bundle
    depth = args.model.removeprefix("cifar_resnet")
    weights = sorted((args.assets / "resnet_cifar").glob(f"resnet{depth}-*.th"))
    if not weights:
        raise SystemExit(f"no resnet{depth} weights under {args.assets}/resnet_cifar")
    out = Path(tempfile.mkdtemp(prefix="tether-codec-bench-")) / "bundle"
    splits = ",".join(dict.fromkeys([*args.eval_splits, args.codec_split]))
    _run(["partition", args.model, "--weights", str(weights[0]), "--out", str(out),
          "--repeats", "5", "--no-progress", "--splits", splits])
    return out


def _train(args: argparse.Namespace, bundle: Path) -> None:
    common = ["--assets", str(args.assets), "--threads", str(args.threads), "--no-progress"]
    common += ["--limit", str(args.limit)] if args.limit else []
    if args.family == "student":
        _run(["codec", "train", str(bundle), "--family", "student", "--split", args.codec_split,
              "--betas", *map(str, args.betas), *args.student_args.split(), *common])
        return
    exit_here = args.codec_split in args.exit_splits
    _run(["codec", "train", str(bundle), "--split", args.codec_split, "--epochs",
          str(args.epochs), "--betas", *map(str, args.betas), *(["--exit"] if exit_here else []),
          *common])
    for split in args.exit_splits:
        if split != args.codec_split:
            _run(["codec", "train", str(bundle), "--split", split, "--betas", "--exit",
                  "--exit-conv", "32", "--exit-epochs", "6", *common])


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _report(bundle: Path) -> None:
    rows = _rows(bundle / "eval" / "codecs.csv")
    for r in rows:
        r["accuracy"], r["payload_bytes"] = float(r["accuracy"]), float(r["payload_bytes"])
    inputs = [r for r in rows if r["split"] == "input"]
    full = max(r["accuracy"] for r in rows if r["codec"] == "fp32")
    print(f"\nuncompressed top-1 {100 * full:.2f} %")
    print("\nlearned codecs vs the smallest input codec with at least the same accuracy:")
    for r in sorted((r for r in rows if r["codec"].startswith(("bottleneck", "student"))),
                    key=lambda r: r["payload_bytes"]):
        rivals = [i for i in inputs if i["accuracy"] >= r["accuracy"]]
        best = min(rivals, key=lambda i: i["payload_bytes"]) if rivals else None
        ratio = f"{r['payload_bytes'] / best['payload_bytes']:.3f} of {best['codec']} " \
                f"({best['payload_bytes']:.0f} B, {100 * best['accuracy']:.2f} %)" if best else "-"
        print(f"  {r['split']:<10} {r['codec']:<20} {r['payload_bytes']:7.1f} B "
              f"top-1 {100 * r['accuracy']:6.2f} % (loss {100 * (full - r['accuracy']):5.2f} pt)"
              f"  bytes = {ratio}")
    print("\ntensor baselines (bytes relative to fp32 at the same split):")
    for split in sorted({r["split"] for r in rows} - {"input"}):
        at = {r["codec"]: r for r in rows if r["split"] == split}
        base = at["fp32"]["payload_bytes"]
        print("  " + split.ljust(10) + "  ".join(
            f"{c} {at[c]['payload_bytes'] / base:.3f} ({100 * at[c]['accuracy']:.2f} %)"
            for c in ("fp16", "int8", "fp16+zlib", "int8+zlib", "fp16+zstd", "int8+zstd")
            if c in at))
    exits = bundle / "eval" / "exits.csv"
    if exits.is_file():
        print("\nearly exits (lossless eval): threshold, exit rate, exit top-1, overall top-1")
        for e in _rows(exits):
            acc = f"{100 * float(e['exit_accuracy']):.2f} %" if e["exit_accuracy"] else "n/a"
            print(f"  {e['split']:<10} {e['metric']} >= {float(e['threshold']):.3f}  rate "
                  f"{float(e['exit_rate']):.3f}  exit {acc}  overall "
                  f"{100 * float(e['overall_accuracy']):.2f} %")


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    bundle = _bundle(args)
    if not args.no_train:
        _train(args, bundle)
    extra = ["--limit", str(args.limit)] if args.limit else []
    _run(["codec", "eval", str(bundle), "--assets", str(args.assets), "--threads",
          str(args.threads), "--splits", *args.eval_splits, "--input-codecs", *INPUT_CODECS,
          *extra])
    _report(bundle)
    if args.family == "student":
        sys.path.insert(0, str(Path(__file__).parent))
        from student_report import report_student
        report_student(bundle)


if __name__ == "__main__":
    main()
