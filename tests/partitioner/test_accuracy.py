"""Through the split path (ONNX head, torch tail) pretrained resnet20 keeps its accuracy."""

from __future__ import annotations

import pytest
import torch

from tether.partitioner import BundleModel, OnnxModule, export_bundle


@pytest.fixture(scope="module")
def resnet20_bundle(tmp_path_factory, cifar_weights):
    out = tmp_path_factory.mktemp("acc") / "r20"
    export_bundle("cifar_resnet20", out, weights=cifar_weights[20], splits=["layer2.0", "layer3.1"],
                  repeats=1, warmup=0, progress=False, profile_all=False)
    return BundleModel.load(out)


@pytest.mark.parametrize("split", ["layer2.0", "layer3.1"])
def test_resnet20_split_path_reproduces_91_64_percent(resnet20_bundle, cifar_lossless, split):
    x, y = cifar_lossless
    head = OnnxModule(resnet20_bundle.head_onnx_path(split), threads=1)
    with torch.inference_mode():
        logits = resnet20_bundle.tail(split)(torch.from_numpy(head(x.numpy())))
    correct = int((logits.argmax(1) == y).sum())
    assert len(y) == 1017 and correct == 932, f"{correct / 1017:.4%}"  # 91.64 %


def test_resnet20_full_onnx_model_reproduces_91_64_percent(resnet20_bundle, cifar_lossless):
    x, y = cifar_lossless
    logits = OnnxModule(resnet20_bundle.full_onnx_path())(x.numpy())
    assert int((torch.from_numpy(logits).argmax(1) == y).sum()) == 932

