"""Tiny models and bundles for fast codec/exit tests (no assets, no partitioner)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tether.core.bundle import Manifest, SplitEntry
from tether.core.types import CostTable, SplitCost, TensorSpec


def tiny_tail(channels: int = 8, classes: int = 10) -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes)).eval()


def tiny_features(n: int = 256, channels: int = 8, side: int = 8,
                  classes: int = 10) -> tuple[torch.Tensor, nn.Module, torch.Tensor]:
    """Smooth non-negative 'split tensors', a frozen tail and its logits (the teacher)."""
    g = torch.Generator().manual_seed(7)
    low = torch.randn(n, channels, side // 4, side // 4, generator=g)
    feats = nn.functional.interpolate(low, size=(side, side), mode="bilinear",
                                      align_corners=False).relu()
    tail = tiny_tail(channels, classes)
    with torch.no_grad():
        logits = tail(feats) * 4
    return feats, tail, logits


def make_bundle(root: Path, feature_shape: tuple[int, int, int] = (8, 8, 8),
                split: str = "block1") -> Path:
    """A minimal bundle directory: manifest (one split point) and a cost table."""
    bundle = Path(root) / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    shape = (1, *feature_shape)
    nbytes = 4 * feature_shape[0] * feature_shape[1] * feature_shape[2]
    manifest = Manifest(model_id="tiny", fingerprint="0" * 64,
                        input=TensorSpec((1, 3, 16, 16)),
                        split_points=(SplitEntry(split, 1, shape, "float32", nbytes),))
    manifest.save(bundle)
    CostTable(model_id="tiny", input=TensorSpec((1, 3, 16, 16)), edge_full_seconds=0.01,
              cloud_full_seconds=0.001,
              splits=(SplitCost(split, 1, shape, "float32", nbytes, 0.005, 0.001),)).save(
        bundle / "costs.json")
    return bundle
