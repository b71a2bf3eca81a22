"""One cifar_resnet20 bundle per test session, shared by the edge and integration tests.

Pretrained weights when the real assets are present, seeded random weights otherwise (the
equality-with-the-whole-model checks hold either way).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("layer1.2", "layer2.2")


def assets_dir() -> Path | None:
    env = os.environ.get("TETHER_ASSETS")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "assets"]:
        if (candidate / "README.md").is_file():
            return candidate
    return None


def pretrained_weights() -> Path | None:
    found = assets_dir()
    if found is None:
        return None
    weights = sorted((found / "resnet_cifar").glob("resnet20-*.th"))
    return weights[0] if weights else None


def shared_bundle(tmp_path_factory) -> Path:
    """Export (once per session) cifar_resnet20 with ONNX heads at :data:`SPLITS`."""
    from tether.partitioner import export_bundle

    out = tmp_path_factory.getbasetemp() / "edge_bundle_resnet20"
    if not (out / "manifest.json").is_file():
        torch.set_num_threads(1)
        export_bundle("cifar_resnet20", out, weights=pretrained_weights(), splits=list(SPLITS),
                      repeats=2, warmup=1, progress=False)
    return out


def sample_images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 HWC images: real CIFAR-10 test images when the assets exist, else noise."""
    found = assets_dir()
    if found is not None:
        path = found / "cifar10" / "cifar10_test_first1017_lossless.npz"
        if path.is_file():
            return np.load(path)["x"][:n]
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def reference_logits(bundle: Path, images: np.ndarray) -> np.ndarray:
    """The whole model in torch on the same images: the ground truth for every action."""
    from tether.partitioner import BundleModel

    model = BundleModel.load(bundle).full_model()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.inference_mode():
        return model(x).numpy()
