"""Model sources: CIFAR-10 ResNets (He et al. 2016, option-A shortcuts) and torchvision classifiers.

Every model returned here takes float RGB NCHW input in [0, 1]: the per-channel
normalisation is the first step inside the module (a ``normalize`` child with
non-persistent buffers, so state dicts stay exactly the upstream ones).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tether.core.errors import InputShapeError, UnknownModelError, WeightsError
from tether.core.types import TensorSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR_DEPTHS = {"cifar_resnet20": 3, "cifar_resnet32": 5, "cifar_resnet44": 7, "cifar_resnet56": 9}
RANDOM_SEED = 0


@dataclass
class LoadedModel:
    """A model ready to partition: eval module, example input spec, how to rebuild it."""

    module: nn.Module
    input: TensorSpec
    source: dict[str, Any]
    fingerprint: str
    preprocess: dict[str, Any] = field(default_factory=dict)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; buffers are not part of the state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise InputShapeError(f"expected float NCHW input with {self.mean.shape[1]} channels, "
                                  f"got shape {tuple(x.shape)}")
        return (x - self.mean) / self.std


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``planes // 4`` channels each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, add shortcut, relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-10 ResNet-(6n+2) with widths 16/32/64; state-dict keys match Idelbayev's weights."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def torchvision_names() -> list[str]:
    """Names of the torchvision image classification models."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_model_ids() -> list[str]:
    return list(CIFAR_DEPTHS) + torchvision_names()


def build_model(model_id: str, normalize: Any = "default") -> nn.Module:
    """The architecture of ``model_id`` with deterministic random weights, in eval mode.

    ``normalize``: ``"default"`` (ImageNet mean/std inside the model), ``None`` (the model
    takes its input as is) or ``(mean, std)``.
    """
    norm = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "default" else normalize
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        if model_id in CIFAR_DEPTHS:
            net = CifarResNet(CIFAR_DEPTHS[model_id]).eval()
            net.normalize = nn.Identity() if norm is None else Normalize(*norm)
            return net
        if model_id in torchvision_names():
            import torchvision

            net = torchvision.models.get_model(model_id, weights=None)
            return (net if norm is None else apply_normalization(net, *norm)).eval()
    sample = ", ".join(list(CIFAR_DEPTHS) + ["resnet18", "resnet50", "mobilenet_v3_small",
                                             "efficientnet_b0", "vit_b_16"])
    raise UnknownModelError(
        f"unknown model {model_id!r}; valid ids include {sample}, or any of the "
        f"{len(torchvision_names())} torchvision classification models "
        f"(torchvision.models.list_models(module=torchvision.models))")


def apply_normalization(net: nn.Module, mean: tuple[float, ...] = IMAGENET_MEAN,
                        std: tuple[float, ...] = IMAGENET_STD) -> nn.Module:
    """Make ``net`` normalise its [0, 1] input first, keeping its module names and state dict."""
    base = type(net)

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        return base.forward(self, self.normalize(x))

    namespace = {"forward": forward, "__module__": base.__module__}
    net.__class__ = type(base.__name__, (base,), namespace)
    net.add_module("normalize", Normalize(tuple(mean), tuple(std)))
    return net


def default_input(model_id: str) -> TensorSpec:
    if model_id in CIFAR_DEPTHS:
        return TensorSpec((1, 3, 32, 32))
    return TensorSpec((1, 3, 224, 224))


def load_model(model_id: str, weights: str | Path | None = None,
               normalize: Any = "default") -> LoadedModel:
    """Build ``model_id`` and load ``weights``: a state-dict path, a torchvision weights enum
    name (``DEFAULT``, ``IMAGENET1K_V1``, ...), or None for deterministic random weights.
    ``normalize``: see :func:`build_model`."""
    module = build_model(model_id, normalize)
    source: dict[str, Any] = {"model_id": model_id, "weights": None,
                              "kind": "cifar_resnet" if model_id in CIFAR_DEPTHS else "torchvision"}
    if normalize != "default":
        source["normalize"] = None if normalize is None else {
            "mean": list(normalize[0]), "std": list(normalize[1])}
    if weights is not None:
        if _looks_like_path(weights):
            state = read_state_dict(weights)
            source["weights"] = str(Path(weights).resolve())
        else:
            state = _torchvision_weights(model_id, str(weights))
            source["weights"] = str(weights)
        load_state(module, state, origin=str(weights))
    return LoadedModel(module=module, input=default_input(model_id), source=source,
                       fingerprint=fingerprint(module),
                       preprocess=preprocess_info(model_id, normalize))


def preprocess_info(model_id: str, normalize: Any = "default") -> dict[str, Any]:
    """The input contract stated in the manifest (``preprocess``)."""
    norm = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "default" else normalize
    info: dict[str, Any] = {"layout": "NCHW", "range": [0.0, 1.0], "channels": "RGB",
                            "dtype": "float32"}
    if norm is None:
        info.update(normalization="none", contract="float NCHW fed to the model as is "
                    "(normalise it yourself if the model expects it)")
    else:
        info.update(normalization="inside_model", mean=list(norm[0]), std=list(norm[1]),
                    contract="float RGB NCHW in [0, 1]; the model normalises (x - mean) / std")
    if model_id in CIFAR_DEPTHS:
        info["labels"] = list(CIFAR10_CLASSES)
    return info


def _looks_like_path(weights: str | Path) -> bool:
    text = str(weights)
    return (isinstance(weights, Path) or "/" in text or "\\" in text or Path(text).exists()
            or bool(re.search(r"\.(pt|pth|th|bin|ckpt|tar)$", text)))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (plain or under ``state_dict``/``model``); strip ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: pass the path of a state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise WeightsError(f"cannot read weights file {path}: {exc}. It must be a torch.save'd "
                           f"state dict loadable with weights_only=True") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state(module: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` strictly (old BatchNorm files without ``num_batches_tracked`` are fine)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"weights {origin} do not match the model {type(module).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong[:3]}; pass weights saved from the same architecture")
    module.load_state_dict({**own, **state}, strict=True)
    module.eval()


def _torchvision_weights(model_id: str, name: str) -> dict[str, torch.Tensor]:
    if model_id in CIFAR_DEPTHS:
        raise WeightsError(f"{model_id} has no downloadable weights: pass --weights PATH to a "
                           f"resnet{model_id[12:]}-*.th file")
    import torchvision

    enum_cls = torchvision.models.get_model_weights(model_id)
    key = name.split(".")[-1]
    try:
        weights = enum_cls[key]
    except KeyError:
        raise WeightsError(f"{model_id} has no weights {name!r}; valid: "
                           f"{['DEFAULT'] + [w.name for w in enum_cls]}, or a state-dict path")
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, ...
        raise WeightsError(f"cannot fetch {model_id} weights {weights.name} ({exc}); download them "
                           f"on a machine with internet and pass --weights PATH") from exc


def fingerprint(module: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtypes, shapes and raw bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
