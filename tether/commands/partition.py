"""`tether partition` and `tether profile`: cut a model into a bundle, re-profile a bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tether.core.errors import ConfigError


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``partition`` and ``profile`` sub-commands."""
    p = subparsers.add_parser(
        "partition", help="find every split point of a DNN, profile it, export a bundle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trace MODEL, find every point where exactly one tensor crosses, profile "
                    "head (ONNX Runtime) and tail (torch) latency per point, and write a bundle "
                    "directory (manifest.json, costs.json, model.pt or model.pt2, heads/*.onnx).",
        epilog="examples:\n"
               "  tether partition cifar_resnet20 --weights resnet20.th --out bundles/r20\n"
               "  tether partition mynet.py:MyNet --input-shape 1,3,64,64 --out bundles/mynet\n"
               "  tether partition mypkg.models:build --out bundles/mine\n"
               "  tether partition hf:./vit_tiny --splits all --out bundles/vit\n"
               "  tether partition resnet18 --normalize none --out bundles/r18")
    p.add_argument("model", metavar="MODEL",
                   help="cifar_resnet20|32|44|56, a torchvision classification model name, "
                        "pkg.module:attr or path/to/file.py:attr (an nn.Module instance, class or "
                        "factory), or a Hugging Face folder (hf:DIR, or DIR with config.json)")
    p.add_argument("--weights", metavar="PATH|ENUM",
                   help="local state-dict file, or a torchvision weights enum name (e.g. DEFAULT, "
                        "IMAGENET1K_V1) (default: deterministic random weights; HF folders "
                        "carry their own)")
    p.add_argument("--input-shape", metavar="N,C,H,W", type=_shape,
                   help="example input shape (batch is dynamic in the ONNX heads) (default: "
                        "1,3,32,32 for CIFAR models, the config's size for HF models, "
                        "1,16 token ids for HF text models, 1,3,224,224 otherwise)")
    p.add_argument("--normalize", metavar="imagenet|none|MEAN,STD", default=None,
                   help="input normalisation built into the model: imagenet, none (you "
                        "normalise before calling), or MEAN,STD / M1,M2,M3,S1,S2,S3 (default: "
                        "imagenet for zoo models, the image processor's for HF folders, none "
                        "for your own modules); the input contract is written to the manifest")
    p.add_argument("--method", choices=("auto", "fx", "export"), default="auto",
                   help="graph capture: torch.fx (the cloud rebuilds the model from code), "
                        "torch.export (self-contained model.pt2), or auto: fx when it traces, "
                        "else export (default: %(default)s)")
    p.add_argument("--splits", metavar="A,B,C", type=_names,
                   help="split points to export ONNX heads for, or 'all'; "
                        "default: the Pareto front of head FLOPs vs bytes crossing")
    p.add_argument("--leaf", metavar="MODULE", action="append", default=[],
                   help="qualified module name to treat as one opaque step when tracing "
                        "(for modules fx cannot trace); repeatable")
    _add_profile_args(p)
    p.add_argument("--out", metavar="DIR", required=True, type=Path,
                   help="bundle directory (required)")
    p.add_argument("--force", action="store_true",
                   help="replace DIR even if it holds a bundle or other files (default: off)")
    p.set_defaults(handler=_run_partition)

    q = subparsers.add_parser(
        "profile", help="re-profile a bundle's split points and rewrite its costs.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure head (ONNX Runtime) and tail (torch) latency of every split point "
                    "of the bundle in DIR, rewrite DIR/costs.json and print the table. Each "
                    "time is a median over interleaved rounds; p10/p90 are kept and a warning "
                    "says when the spread shows the machine was busy.",
        epilog="example:\n  tether profile bundles/r20 --repeats 30 --rounds 5")
    q.add_argument("bundle", metavar="DIR", type=Path, help="bundle directory")
    _add_profile_args(q)
    q.set_defaults(handler=_run_profile)


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="ONNX Runtime intra-op threads for the edge head (default 1)")
    p.add_argument("--cloud-threads", type=int, default=None, metavar="N",
                   help="torch threads for the cloud tail (default: same as --threads)")
    p.add_argument("--repeats", type=int, default=20, metavar="N",
                   help="timed runs per measurement; the median is kept (default 20)")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="the repeats are taken in N interleaved rounds over all points, so a "
                        "burst of load spoils one round, not one point (default 3)")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed runs before timing (default 3)")
    p.add_argument("--profile", choices=("all", "exported"), default="all",
                   help="profile every split point or only those with an ONNX head "
                        "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (default: shown)")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: write N,C,H,W, e.g. 1,3,224,224")
    if not 1 <= len(shape) <= 6 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: need positive sizes, batch "
                                         f"first (N,C,H,W for images, N,L for token ids)")
    return shape


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--splits needs at least one split point name or 'all'")
    return names


def _check_profile_args(args: argparse.Namespace) -> None:
    bad = args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.rounds < 1
    if bad or (args.cloud_threads is not None and args.cloud_threads < 1):
        raise ConfigError("--threads, --cloud-threads, --repeats and --rounds must be >= 1, "
                          "--warmup >= 0")


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so a killed run still removes its partial bundle."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _run_partition(args: argparse.Namespace) -> int:
    from tether.partitioner import export_bundle, format_cost_table
    from tether.partitioner.sources import parse_normalize

    _check_profile_args(args)
    _exit_on_sigterm()
    manifest = export_bundle(
        args.model, args.out, weights=args.weights, splits=args.splits,
        input_shape=args.input_shape, leaf_modules=args.leaf, method=args.method,
        normalize=parse_normalize(args.normalize), threads=args.threads,
        cloud_threads=args.cloud_threads, repeats=args.repeats, warmup=args.warmup,
        rounds=args.rounds, progress=not args.no_progress,
        overwrite=args.force, profile_all=args.profile == "all")
    from tether.partitioner import BundleModel
    bundle = BundleModel.load(args.out)
    print(format_cost_table(bundle.cost_table(exported_only=False), exported=_exported(manifest)))
    _warn_busy(bundle.cost_table(exported_only=False).meta)
    print(f"bundle written to {args.out} ({len(_exported(manifest))} ONNX heads, "
          f"fingerprint {manifest.fingerprint[:12]})")
    sys.stdout.flush()
    return 0


def _run_profile(args: argparse.Namespace) -> int:
    from tether.partitioner import BundleModel, format_cost_table, profile_bundle

    _check_profile_args(args)
    table = profile_bundle(args.bundle, threads=args.threads, cloud_threads=args.cloud_threads,
                           repeats=args.repeats, warmup=args.warmup, rounds=args.rounds,
                           progress=not args.no_progress, profile_all=args.profile == "all")
    manifest = BundleModel.load(args.bundle).manifest
    print(format_cost_table(table, exported=_exported(manifest)))
    _warn_busy(table.meta)
    print(f"costs written to {args.bundle / (manifest.cost_table or 'costs.json')}")
    return 0


def _warn_busy(meta: dict) -> None:
    if meta.get("busy"):
        print("warning: the timings spread widely (see meta.spread in costs.json): the machine "
              "was busy; re-run `tether profile DIR` on an idle machine for trustworthy costs",
              file=sys.stderr)


def _exported(manifest) -> set[str]:
    return {e.name for e in manifest.split_points if e.head}
