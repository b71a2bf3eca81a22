"""Model sources: CIFAR ResNets, torchvision models, weights loading and fingerprints."""

from __future__ import annotations

import pytest
import torch
import torchvision

from tether.core.errors import UnknownModelError, WeightsError
from tether.partitioner import build_model, fingerprint, load_model
from tether.partitioner.models import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.parametrize("depth,params",
                         [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_cifar_resnet_parameter_counts_match_the_reference(depth, params):
    model = build_model(f"cifar_resnet{depth}")
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_pretrained_cifar_weights_load_with_module_prefix_stripped(cifar_weights):
    loaded = load_model("cifar_resnet20", cifar_weights[20])
    raw = torch.load(cifar_weights[20], map_location="cpu", weights_only=True)["state_dict"]
    assert len(raw) == 97 and all(k.startswith("module.") for k in raw)
    torch.testing.assert_close(loaded.module.conv1.weight, raw["module.conv1.weight"])
    assert loaded.source["weights"].endswith(cifar_weights[20].name)
    assert loaded.input.shape == (1, 3, 32, 32) and not loaded.module.training


def test_torchvision_model_normalises_inside_and_keeps_its_state_dict():
    loaded = load_model("resnet18")
    plain = torchvision.models.resnet18(weights=None).eval()
    assert list(loaded.module.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(loaded.module.state_dict())
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), plain((x - mean) / std))


def test_random_weights_are_deterministic_and_fingerprinted():
    a, b = load_model("cifar_resnet20"), load_model("cifar_resnet20")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    with torch.no_grad():
        b.module.linear.bias[0] += 1e-3
    assert fingerprint(b.module) != a.fingerprint


def test_local_state_dict_path_round_trips(tmp_path):
    src = load_model("mobilenet_v3_small")
    with torch.no_grad():
        for p in src.module.parameters():
            p.mul_(0.5)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.module.state_dict().items()}}, path)
    loaded = load_model("mobilenet_v3_small", path)
    assert loaded.fingerprint == fingerprint(src.module)
    assert loaded.fingerprint != load_model("mobilenet_v3_small").fingerprint


def test_unknown_model_lists_valid_ids():
    with pytest.raises(UnknownModelError, match="cifar_resnet20.*resnet18"):
        load_model("resnet19")


def test_missing_corrupt_and_mismatched_weights_raise_weights_error(tmp_path, cifar_weights):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("cifar_resnet20", tmp_path / "nope.th")
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(b"\x80\x02not a torch file at all" * 10)
    with pytest.raises(WeightsError, match="cannot read"):
        load_model("cifar_resnet20", corrupt)
    with pytest.raises(WeightsError, match="do not match.*unexpected"):
        load_model("cifar_resnet20", cifar_weights[32])
    shapes = tmp_path / "shapes.pt"
    state = build_model("cifar_resnet20").state_dict()
    state["linear.weight"] = torch.zeros(3, 64)
    torch.save(state, shapes)
    with pytest.raises(WeightsError, match="wrong shapes.*linear.weight"):
        load_model("cifar_resnet20", shapes)


def test_weights_enum_errors_name_the_fix():
    with pytest.raises(WeightsError, match="valid: .*IMAGENET1K_V1"):
        load_model("resnet18", "NO_SUCH_WEIGHTS")
    with pytest.raises(WeightsError, match="--weights PATH"):
        load_model("cifar_resnet20", "DEFAULT")
