"""A small hand-made cost table with the shape of a CIFAR ResNet's (times in seconds)."""

from __future__ import annotations

import pytest

from tether.core.types import CodecCost, CostTable, ExitCost, SplitCost, TensorSpec


def make_table(exits: bool = True) -> CostTable:
    def split(name, index, nbytes, head, tail, shape):
        return SplitCost(name, index, shape, "float32", nbytes, head, tail)

    return CostTable(
        model_id="toy", input=TensorSpec((1, 3, 32, 32)),
        edge_full_seconds=0.100, cloud_full_seconds=0.002,
        splits=(split("conv1", 1, 65536, 0.010, 0.0018, (1, 16, 32, 32)),
                split("layer1", 2, 65536, 0.040, 0.0012, (1, 16, 32, 32)),
                split("layer2", 3, 32768, 0.070, 0.0006, (1, 32, 16, 16)),
                split("layer3", 4, 16384, 0.095, 0.0001, (1, 64, 8, 8))),
        codecs=(CodecCost("input", "jpeg75", 1100, 0.001, 0.0005, 0.88),
                CodecCost("input", "png", 2600, 0.002, 0.0005, 0.9164),
                CodecCost("layer2", "int8", 8192, 0.001, 0.0002, 0.915),
                CodecCost("layer3", "int8", 4096, 0.0005, 0.0001, 0.916)),
        exits=(ExitCost("layer1", 0.003, 0.5, 0.97),) if exits else (),
        full_accuracy=0.9164)


@pytest.fixture
def table() -> CostTable:
    return make_table()
