"""Partitioner benchmark: edge backend (ONNX Runtime) vs torch for heads, and split-path overhead.

Run: .venv/bin/python bench/partitioner.py [--repeats 30] [--threads 1]
For each model and split point, measured side by side in one run (batch 1, medians):
  ort/torch   = ONNX Runtime head latency / torch head latency (edge backend speed-up < 1)
  split/full  = (ORT head + torch tail) / torch full model (cost of cutting, compute only)
and the CIFAR ResNets' top-1 through an ONNX-head + torch-tail split (assets, if present).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tether.partitioner import OnnxModule, SplitGraph, export_onnx, load_model  # noqa: E402
from tether.partitioner.profile import example_input, median_seconds  # noqa: E402

CASES = {"cifar_resnet20": (32, ["layer1.2", "layer2.2", "layer3.2"]),
         "resnet18": (224, ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
         "mobilenet_v3_small": (224, ["features.3", "features.8", "features.12"])}


def bench_model(model_id: str, size: int, splits: list[str], args, tmp: Path) -> None:
    module = load_model(model_id).module
    from tether.core.types import TensorSpec
    x = example_input(TensorSpec((1, 3, size, size)))
    graph = SplitGraph(module, x)
    with torch.inference_mode():
        full = median_seconds(lambda: module(x), args.repeats, 3)
    print(f"\n{model_id} @ {size}px  torch full {full * 1e3:.2f} ms")
    print(f"{'split':<12}{'ort head ms':>12}{'torch head ms':>14}{'ort/torch':>10}"
          f"{'tail ms':>10}{'split/full':>11}")
    for name in splits:
        head, tail = graph.split(name)
        path = export_onnx(head, x, tmp / f"{model_id}-{name}.onnx")
        ort = OnnxModule(path, threads=args.threads)
        xn = x.numpy()
        with torch.inference_mode():
            z = head(x)
            t_ort = median_seconds(lambda: ort(xn), args.repeats, 3)
            t_torch = median_seconds(lambda: head(x), args.repeats, 3)
            t_tail = median_seconds(lambda: tail(z), args.repeats, 3)
        print(f"{name:<12}{t_ort * 1e3:>12.2f}{t_torch * 1e3:>14.2f}{t_ort / t_torch:>10.2f}"
              f"{t_tail * 1e3:>10.2f}{(t_ort + t_tail) / full:>11.2f}")


def bench_accuracy(assets: Path, tmp: Path) -> None:
    data = np.load(assets / "cifar10" / "cifar10_test_first1017_lossless.npz")
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(data["y"])
    print("\nCIFAR-10 lossless 0..1016, ONNX head + torch tail at layer2.0 vs torch full model")
    for depth in (20, 32, 44, 56):
        weights = next((assets / "resnet_cifar").glob(f"resnet{depth}-*.th"))
        module = load_model(f"cifar_resnet{depth}", weights).module
        head, tail = SplitGraph(module, x[:1]).split("layer2.0")
        ort = OnnxModule(export_onnx(head, x[:1], tmp / f"acc{depth}.onnx"))
        with torch.inference_mode():
            split_acc = (tail(torch.from_numpy(ort(x.numpy()))).argmax(1) == y).float().mean()
            full_acc = (module(x).argmax(1) == y).float().mean()
        print(f"cifar_resnet{depth}: split {split_acc:.2%}  full {full_acc:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for model_id in args.models.split(","):
            bench_model(model_id, *CASES[model_id], args, Path(tmp))
        default = Path(__file__).resolve().parents[2] / "shared" / "assets"
        assets = Path(os.environ.get("TETHER_ASSETS", default))
        if (assets / "resnet_cifar").is_dir():
            bench_accuracy(assets, Path(tmp))


if __name__ == "__main__":
    main()
