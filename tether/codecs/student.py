"""Student-encoder codecs (Entropic Student / BottleFit style) for CIFAR ResNets.

The student **replaces the head**: the edge runs only a small encoder from the image
(``[N, 3, H, W]`` floats in [0, 1]) to a latent; a CompressAI ``EntropyBottleneck`` turns
the quantized latent into real rANS bytes; on the cloud a decoder restores the tensor the
teacher's tail expects at ``split`` (e.g. ``layer2.2`` of a CIFAR ResNet) and the bundle's
unchanged tail finishes the job.

Layout (CIFAR ResNet names, so the stem and decoder blocks start from the teacher)::

    encoder: normalize -> conv1 -> bn1 -> relu -> stem blocks (teacher layer1[:k], then
             optionally the first blocks of layer2, layer3: ``stem_extra``)
             -> conv (5x5/2 or 3x3/1) -> GDN -> conv -> latent (input / latent_stride)
    decoder: conv3x3 -> IGDN -> conv3x3 -> relu -> (conv + pixel shuffle) to split H x W
             -> decoder blocks (teacher blocks of the split's stage, fine-tuned: BottleFit)

BatchNorm layers keep the teacher's statistics (frozen; their affine parameters train).
Contract as :class:`~tether.codecs.bottleneck.BottleneckAutoencoder`: ``forward`` for
training, ``update()`` once, then ``compress``/``decompress``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from torch import nn
from torch.nn import functional as F

from tether.core.errors import BundleError, CodecError
from tether.codecs.bottleneck import EntropyCodedModel, _PlainGDN, export_onnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StudentConfig:
    """Shape of a student codec: its input, the split tensor it restores, its latent."""

    input_shape: tuple[int, int, int] = (3, 32, 32)
    split_shape: tuple[int, int, int] = (32, 16, 16)
    stem_width: int = 16          # conv1 / stem block channels (teacher layer1 width)
    stem_blocks: int = 3          # BasicBlocks after conv1 (initialised from teacher layer1)
    hidden: int = 64              # channels inside the compressor and decoder
    latent: int = 32              # entropy-coded channels (latent is input H/4 x W/4)
    decoder_blocks: int = 2       # BasicBlocks at the split width closing the decoder
    latent_stride: int = 4        # latent grid = input H/stride x W/stride (2, 4 or 8)
    stem_extra: tuple[int, ...] = ()  # blocks of the teacher's next stages in the encoder
                                      # (each opens with its stride-2 block): (1,) = layer2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stem_extra", tuple(int(b) for b in self.stem_extra))
        if any(b < 1 for b in self.stem_extra) or \
                2 ** len(self.stem_extra) > self.latent_stride:
            raise CodecError(f"stem_extra {self.stem_extra}: counts >= 1, and at most "
                             f"log2(latent_stride) stages")
        for name in ("input_shape", "split_shape"):
            shape = tuple(int(d) for d in getattr(self, name))
            object.__setattr__(self, name, shape)
            if len(shape) != 3 or min(shape) <= 0:
                raise CodecError(f"{name} must be (C, H, W), got {shape}")
        h, w = self.input_shape[1:]
        st = self.latent_stride
        if st not in (2, 4, 8) or h % st or w % st or st > 4 * 2 ** len(self.stem_extra):
            raise CodecError(f"latent_stride must be 2, 4 or 8 (8 needs stem_extra), divide "
                             f"the input {h}x{w}")
        up = self.split_shape[1] // (h // st)
        if up < 1 or self.split_shape[1] != up * (h // st) or up & (up - 1) or \
                self.split_shape[2] != up * (w // st):
            raise CodecError(f"split {self.split_shape} must be a power-of-two multiple of "
                             f"the latent grid {h // st}x{w // st}")
        if min(self.stem_width, self.hidden, self.latent) <= 0 or \
                min(self.stem_blocks, self.decoder_blocks) < 0:
            raise CodecError(f"invalid student widths/blocks: {self}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.input_shape[1] // self.latent_stride,
                self.input_shape[2] // self.latent_stride)

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "split_shape": list(self.split_shape),
                "stem_width": self.stem_width, "stem_blocks": self.stem_blocks,
                "hidden": self.hidden, "latent": self.latent,
                "decoder_blocks": self.decoder_blocks, "latent_stride": self.latent_stride,
                "stem_extra": list(self.stem_extra)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentConfig":
        try:
            return cls(tuple(d["input_shape"]), tuple(d["split_shape"]), int(d["stem_width"]),
                       int(d["stem_blocks"]), int(d["hidden"]), int(d["latent"]),
                       int(d["decoder_blocks"]), int(d.get("latent_stride", 4)),
                       tuple(d.get("stem_extra", [1] if d.get("stem_transition") else [])))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid student codec config {d!r}: {exc}") from exc


class Normalize(nn.Module):
    """``(x - mean) / std`` with constant buffers (the teacher's preprocessing)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Block(nn.Module):
    """CIFAR ResNet BasicBlock (same parameter names as the teacher's); ``transition``:
    stride 2 and twice the width, with the option-A shortcut."""

    def __init__(self, planes: int, transition: bool = False) -> None:
        super().__init__()
        out = 2 * planes if transition else planes
        self.transition = transition
        self.conv1 = nn.Conv2d(planes, out, 3, 2 if transition else 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        short = x
        if self.transition:
            pad = x.shape[1] // 2
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))
        return F.relu(self.bn2(self.conv2(out)) + short)


def _encoder(cfg: StudentConfig) -> nn.Sequential:
    c, n = cfg.stem_width, cfg.hidden
    layers: list[nn.Module] = [Normalize(), nn.Conv2d(cfg.input_shape[0], c, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(c), nn.ReLU()]
    layers += [Block(c) for _ in range(cfg.stem_blocks)]
    downs = int(math.log2(cfg.latent_stride))
    for blocks in cfg.stem_extra:
        layers.append(Block(c, transition=True))
        c, downs = 2 * c, downs - 1
        layers += [Block(c) for _ in range(blocks - 1)]
    first = nn.Conv2d(c, n, 5, 2, 2) if downs >= 1 else nn.Conv2d(c, n, 3, 1, 1)
    last = nn.Conv2d(n, cfg.latent, 5, 2, 2) if downs == 2 else nn.Conv2d(n, cfg.latent, 3, 1, 1)
    layers += [first, GDN(n), last]
    return nn.Sequential(*layers)


def _decoder(cfg: StudentConfig) -> nn.Sequential:
    c, n = cfg.split_shape[0], cfg.hidden
    up = cfg.split_shape[1] // cfg.latent_hw[0]
    layers: list[nn.Module] = [nn.Conv2d(cfg.latent, n, 3, 1, 1), GDN(n, inverse=True),
                               nn.Conv2d(n, n, 3, 1, 1), nn.ReLU()]
    width = n
    for _ in range(int(math.log2(up))):
        layers += [nn.Conv2d(width, 2 * width, 3, 1, 1), nn.PixelShuffle(2), nn.ReLU()]
        width //= 2
    layers.append(nn.Conv2d(width, c, 3, 1, 1))
    layers += [Block(c) for _ in range(cfg.decoder_blocks)]
    return nn.Sequential(*layers)


class StudentModel(EntropyCodedModel):
    """Image -> student encoder -> EntropyBottleneck -> decoder -> split tensor."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _encoder(cfg)
        self.entropy_bottleneck = EntropyBottleneck(cfg.latent)
        self.decoder = _decoder(cfg)

    def train(self, mode: bool = True) -> "StudentModel":
        super().train(mode)
        for m in self.modules():             # teacher BN statistics stay frozen
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    @property
    def stem_modules(self) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        """(conv1, bn1, stem blocks): the parts initialised from the teacher's head."""
        enc = self.encoder
        return enc[1], enc[2], list(enc[4:4 + self.cfg.stem_blocks + sum(self.cfg.stem_extra)])

    @property
    def decoder_block_modules(self) -> list[nn.Module]:
        return [m for m in self.decoder if isinstance(m, Block)]


def init_from_teacher(model: StudentModel, conv1: nn.Module, bn1: nn.Module,
                      stem_blocks: Sequence[nn.Module], decoder_blocks: Sequence[nn.Module]) -> None:
    """Copy teacher weights into the stem (conv1, bn1, first blocks) and decoder blocks."""
    conv, bn, blocks = model.stem_modules
    pairs = [(conv, conv1), (bn, bn1), *zip(blocks, stem_blocks),
             *zip(model.decoder_block_modules, decoder_blocks)]
    for mine, theirs in pairs:
        try:
            mine.load_state_dict(theirs.state_dict(), strict=False)
        except RuntimeError as exc:
            raise CodecError(f"teacher part does not fit the student: {exc}") from exc


def encoder_flops(cfg: StudentConfig) -> int:
    """Multiply-accumulates x 2 of the student encoder for one image (convs and GDN)."""
    model = StudentModel(cfg).eval()
    total, hooks = 0, []

    def count(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels
            total += 2 * k * out[0].numel() // module.groups
        elif isinstance(module, GDN):
            total += 2 * module.beta.numel() * out[0].numel()

    for m in model.encoder:
        hooks.append(m.register_forward_hook(count))
    for block in model.stem_modules[2]:
        for conv in (block.conv1, block.conv2):
            hooks.append(conv.register_forward_hook(count))
    with torch.no_grad():
        model.encoder(torch.zeros(1, *cfg.input_shape))
    for h in hooks:
        h.remove()
    return int(total)


def plain_encoder(model: StudentModel) -> nn.Sequential:
    """The encoder without CompressAI's custom autograd ops (ONNX-exportable)."""
    layers = [_PlainGDN(m) if isinstance(m, GDN) else m for m in model.encoder]
    return nn.Sequential(*layers).eval()


def export_student_onnx(model: StudentModel, path: str | Path) -> None:
    """Export the edge part (image -> latent) to ONNX with a dynamic batch dimension."""
    export_onnx(plain_encoder(model), torch.zeros(1, *model.cfg.input_shape), path, "image",
                "student encoder")
