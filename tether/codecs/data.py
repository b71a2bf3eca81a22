"""CIFAR-10 sets for the honest-evaluation protocol (paths come from the entry point).

Training and calibration use the JPEG-q75 test images with indices 1017..9999 only;
evaluation uses the lossless images 0..1016. Images are returned as uint8 NCHW tensors;
:func:`to_float` makes the models' float [0, 1] input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tether.core.errors import ConfigError

LOSSLESS = "cifar10/cifar10_test_first1017_lossless.npz"
JPEG = "cifar10/cifar10_test_jpegq75_ordered.npz"
TRAIN_START = 1017


@dataclass
class ImageSet:
    """uint8 NCHW images with int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int | None = None) -> "ImageSet":
        return ImageSet(self.images[start:stop], self.labels[start:stop])


def _load_npz(path: Path) -> ImageSet:
    if not path.is_file():
        raise ConfigError(f"missing {path}: pass --assets DIR pointing at the shared assets "
                          f"folder (or set TETHER_ASSETS)")
    with np.load(path) as d:
        x, y = d["x"], d["y"]
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or len(x) != len(y):
        raise ConfigError(f"{path}: expected x uint8 [N, H, W, 3] and y [N]")
    return ImageSet(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                    torch.from_numpy(y.astype(np.int64)))


def cifar_eval_set(assets: str | Path, limit: int | None = None) -> ImageSet:
    """Lossless test images 0..1016 (the only set accuracy is reported on)."""
    data = _load_npz(Path(assets) / LOSSLESS)
    return data.slice(0, limit)


def cifar_train_set(assets: str | Path, limit: int | None = None) -> ImageSet:
    """JPEG images with indices 1017..9999 (training and calibration only)."""
    data = _load_npz(Path(assets) / JPEG)
    stop = None if limit is None else TRAIN_START + limit
    return data.slice(TRAIN_START, stop)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1]."""
    return images.float().div_(255.0)
