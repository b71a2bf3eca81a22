"""Split points: discovery, naming, tail(head(x)) == model(x) at every point, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tether.core.errors import InputShapeError, NotTraceableError, SplitError
from tether.partitioner import SplitGraph, find_split_points, load_model, split_at

TORCHVISION_CASES = [
    ("resnet18", 64), ("resnet50", 64), ("mobilenet_v3_small", 32), ("efficientnet_b0", 32),
    pytest.param("vit_b_16", 224, marks=pytest.mark.slow),
]


def _check_every_split(module: nn.Module, x: torch.Tensor) -> tuple[SplitGraph, int]:
    """tail(head(x)) == module(x) at every point; a head named after a module returns exactly
    that module's output in the original model. Returns the graph and the named-module count."""
    graph = SplitGraph(module, x[:1])
    assert graph.points, "no split point found"
    modules = dict(module.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[p.name].register_forward_hook(
        lambda _m, _i, out, name=p.name: seen.__setitem__(name, out.clone()))
        for p in graph.points if p.name in modules]
    with torch.inference_mode():
        want = module(x)
        for hook in hooks:
            hook.remove()
        for point in graph.points:
            head, tail = graph.split(point.name)
            crossing = head(x)
            assert tuple(crossing.shape[1:]) == point.shape[1:], point.name
            if point.name in seen:
                torch.testing.assert_close(crossing, seen[point.name], msg=f"{point.name}: head")
            torch.testing.assert_close(tail(crossing), want, msg=f"{point.name}: tail(head(x))")
    return graph, len(seen)


@pytest.mark.parametrize("model_id,size", TORCHVISION_CASES)
def test_tail_of_head_equals_model_at_every_split_torchvision(model_id, size):
    module = load_model(model_id).module
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    graph, named = _check_every_split(module, x)
    assert named >= len(graph.points) // 3
    assert [p.index for p in graph.points] == list(range(len(graph.points)))


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_tail_of_head_equals_model_at_every_split_pretrained_cifar(depth, cifar_weights,
                                                                  cifar_lossless):
    module = load_model(f"cifar_resnet{depth}", cifar_weights[depth]).module
    x = cifar_lossless[0][:1]
    graph, _ = _check_every_split(module, x)
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range((depth - 2) // 6)]
    assert [n for n in graph.names() if n.startswith("layer")] == blocks


def test_resnet18_split_names_and_sizes():
    points = find_split_points(load_model("resnet18").module, torch.rand(1, 3, 224, 224))
    by_name = {p.name: p for p in points}
    for name in ["normalize", "conv1", "maxpool", "layer1.0", "layer2.1", "layer4.1", "avgpool",
                 "flatten"]:
        assert name in by_name
    assert by_name["layer2.1"].shape == (1, 128, 28, 28)
    assert by_name["layer2.1"].bytes == 128 * 28 * 28 * 4 and by_name["layer2.1"].dtype == "float32"
    names = [p.name for p in points]
    assert names.index("layer1.0") < names.index("layer2.1") < names.index("avgpool")
    assert not any(".conv" in n or ".bn" in n or "downsample" in n for n in names), names
    assert "fc" not in names  # the last module's output is the model output: no cut


def test_mobilenet_uses_feature_block_names():
    names = find_split_points(load_model("mobilenet_v3_small").module, torch.rand(1, 3, 64, 64))
    assert "features.7" in [p.name for p in names]


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.right = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.act(self.stem(x))
        z = torch.cat([self.left(y), self.right(y)], 1)
        z = self.act(z).mean((2, 3))
        return self.head(z)


def test_branches_are_never_cut_and_reused_module_gets_node_name():
    model = _Branchy().eval()
    x = torch.rand(2, 3, 8, 8)
    graph, _ = _check_every_split(model, x)
    names = graph.names()
    assert not any(n.startswith(("left", "right")) for n in names), names
    assert "stem" in names and "cat" in names and "mean" in names
    assert "act" not in names  # act is called twice: its calls are named by fx node
    assert {"act_0", "act_1"} <= set(names) and "act" in [p.node for p in graph.points]


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = _DataDependent()
        self.out = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.out(self.gate(self.conv(x)))


def test_untraceable_module_is_named_with_leaf_hint_and_leaf_works():
    model = _Untraceable().eval()
    x = torch.rand(1, 3, 4, 4)
    hint = r"'gate' \(_DataDependent\).*leaf_modules=\['gate'\]"
    with pytest.raises(NotTraceableError, match=hint):
        find_split_points(model, x)
    graph = SplitGraph(model, x, leaf_modules=["gate"])
    assert graph.names() == ["conv", "gate"]
    head, tail = split_at(model, x, "gate", leaf_modules=["gate"])
    with torch.no_grad():
        torch.testing.assert_close(tail(head(x)), model(x))


def test_unknown_split_lists_valid_names():
    model = load_model("cifar_resnet20").module
    with pytest.raises(SplitError, match=r"unknown split point 'layer9'.*layer2\.1"):
        split_at(model, torch.rand(1, 3, 32, 32), "layer9")


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(InputShapeError, match=r"\(1, 3, 64, 64\).*--input-shape"):
        find_split_points(load_model("vit_b_16").module, torch.rand(1, 3, 64, 64))
    with pytest.raises(InputShapeError):
        find_split_points(load_model("cifar_resnet20").module, torch.rand(1, 1, 32, 32))


def test_tail_never_writes_into_its_input():
    module = load_model("resnet18").module  # torchvision ReLUs are in-place
    x = torch.rand(1, 3, 64, 64)
    graph = SplitGraph(module, x)
    head, tail = graph.split("bn1")  # the tail starts with relu(inplace=True)
    with torch.inference_mode():
        z = head(x)
        before = z.clone()
        torch.testing.assert_close(tail(z), module(x))
    assert torch.equal(z, before) and (z < 0).any()
