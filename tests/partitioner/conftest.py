"""Fixtures for the partitioner tests: small inputs, pretrained CIFAR weights from assets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def cifar_weights(assets: Path):
    """depth -> path of the pretrained CIFAR ResNet weights file."""
    found = {int(p.name[6:8]): p for p in (assets / "resnet_cifar").glob("resnet*-*.th")}
    if sorted(found) != [20, 32, 44, 56]:
        pytest.skip(f"resnet_cifar weights incomplete in {assets}")
    return found


@pytest.fixture(scope="session")
def cifar_lossless(assets: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1017 lossless CIFAR-10 test images as float NCHW in [0, 1], and labels."""
    data = np.load(assets / "cifar10" / "cifar10_test_first1017_lossless.npz")
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255.0
    return x.contiguous(), torch.from_numpy(data["y"])


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: these tests run many small forwards, where a second thread on a
    busy 2-core machine costs far more than it gains."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
