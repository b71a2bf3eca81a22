"""--normalize: the input contract in the manifest, and heads that equal the bare torchvision
module's output under it (no hidden double normalisation)."""

from __future__ import annotations

import pytest
import torch

from tether.core.bundle import Manifest
from tether.core.errors import ModelError
from tether.partitioner import BundleModel, export_bundle, load_model
from tether.partitioner.models import IMAGENET_MEAN, IMAGENET_STD
from tether.partitioner.sources import parse_normalize

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _bare(name):
    import torchvision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None).eval()


def test_parse_normalize():
    assert parse_normalize("imagenet") == (IMAGENET_MEAN, IMAGENET_STD)
    assert parse_normalize("none") is None and parse_normalize(None) == "default"
    assert parse_normalize("0.5,0.25") == ((0.5,) * 3, (0.25,) * 3)
    assert parse_normalize("1,2,3,4,5,6") == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    for bad in ("0.5", "a,b", "0.5,0", "1,2,3"):
        with pytest.raises(ModelError, match="imagenet, none"):
            parse_normalize(bad)


def test_models_follow_the_stated_normalization():
    bare = _bare("resnet18")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        default = load_model("resnet18")
        assert default.preprocess["normalization"] == "inside_model"
        torch.testing.assert_close(default.module(X), bare((X - mean) / std))
        none = load_model("resnet18", normalize=None)
        assert none.preprocess["normalization"] == "none"
        torch.testing.assert_close(none.module(X), bare(X))
        custom = load_model("resnet18", normalize=((0.5,) * 3, (0.5,) * 3))
        torch.testing.assert_close(custom.module(X), bare((X - 0.5) / 0.5))
        assert default.fingerprint == none.fingerprint    # same weights, only the contract differs


def test_bundle_with_normalize_none_equals_the_bare_module(tmp_path):
    out = tmp_path / "r18"
    export_bundle("resnet18", out, splits=["layer2.1"], input_shape=(1, 3, 32, 32),
                  normalize=None, repeats=2, warmup=0, rounds=1, progress=False,
                  profile_all=False)
    m = Manifest.load(out)
    assert m.preprocess["normalization"] == "none" and "mean" not in m.preprocess
    assert m.source["normalize"] is None
    bundle = BundleModel.load(out)          # rebuilt by the cloud the same way
    head = torch.from_numpy(bundle.onnx_head("layer2.1")(X.numpy()))
    with torch.no_grad():
        torch.testing.assert_close(bundle.tail("layer2.1")(head), _bare("resnet18")(X),
                                   rtol=1e-4, atol=1e-4)
