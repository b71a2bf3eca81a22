"""The demo's own data and model: synthetic labelled images and a calibrated seeded ResNet-56.

`tether demo` needs no assets, yet its codecs, exits and accuracy floor must mean something.
A CIFAR ResNet with seeded random weights answers one class for almost every input, so the demo
makes its own ten-class task instead:

* :func:`synthetic_images`: each class is a seeded low-frequency colour pattern; a sample is
  its class pattern at a random contrast plus a random low-frequency field and pixel noise
  (seeded, so every run makes the same images);
* :func:`calibrate_model`: the seeded network's BatchNorm statistics are re-estimated on
  those images and its last (linear) layer is fitted to their labels by logistic regression;
  every other weight stays the seeded random one.

Accuracy is then top-1 against the generator's labels, on images never used for fitting.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

N_CLASSES = 10
#: The demo's model and input: a CIFAR ResNet-56 on 64x64 images, heavy enough (about 12x
#: ResNet-20 at 32x32) that edge compute, not the runtime's fixed per-request cost, sets the
#: price of running it on a weak edge.
MODEL = "cifar_resnet56"
IMAGE_SIZE = 64
TEXTURE, NOISE = 0.3, 0.04     # nuisance detail an image codec must spend bytes on
#: What every result of the demo says about its data.
DATA_NOTE = ("synthetic 10-class images (seeded low-frequency class patterns + random fields); "
             "CIFAR ResNet-56 (64x64 input) with seeded random weights, BatchNorm statistics and "
             "last layer fitted to them")


def _upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


def synthetic_images(n: int, seed: int, size: int = IMAGE_SIZE,
                     task_seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled images (uint8 NCHW, int64 labels), reproducible from ``seed``.

    ``task_seed`` fixes the class patterns (the task); ``seed`` draws the samples.
    """
    task = torch.Generator().manual_seed(task_seed)
    patterns = _upsample(torch.rand(N_CLASSES, 3, 4, 4, generator=task), size) - 0.5
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=gen)
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
    clutter = _upsample(torch.rand(n, 3, 8, 8, generator=gen) - 0.5, size)
    texture = _upsample(torch.rand(n, 3, 16, 16, generator=gen) - 0.5, size)
    noise = torch.randn(n, 3, size, size, generator=gen)
    x = 0.5 + contrast * patterns[labels] + 0.5 * clutter + TEXTURE * texture + NOISE * noise
    return (x.clamp(0.0, 1.0) * 255).round().to(torch.uint8), labels


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1] (the model's input contract)."""
    return images.float() / 255.0


@torch.no_grad()
def _recalibrate_batchnorm(net: nn.Module, x: torch.Tensor, batch: int = 256) -> None:
    """Re-estimate every BatchNorm's running mean/var on ``x`` (cumulative average)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    for i in range(0, len(x), batch):
        net(x[i:i + batch])
    net.eval()
    for bn in bns:
        bn.momentum = 0.1


def _last_linear(net: nn.Module) -> nn.Linear:
    found = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the model has no linear layer to fit")
    return found[-1]


def _penultimate(net: nn.Module, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The inputs of ``linear`` over ``x`` (captured with a forward hook)."""
    seen: list[torch.Tensor] = []
    hook = linear.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), 256):
                net(x[i:i + 256])
    finally:
        hook.remove()
    return torch.cat(seen)


def _fit_linear(linear: nn.Linear, feats: torch.Tensor, labels: torch.Tensor,
                steps: int = 100, weight_decay: float = 3e-3) -> None:
    """Multinomial logistic regression of ``labels`` on standardised ``feats`` (L-BFGS)."""
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    w = torch.zeros(linear.out_features, z.shape[1], requires_grad=True)
    b = torch.zeros(linear.out_features, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():             # fold the standardisation into the layer
        linear.weight.copy_(w / std)
        linear.bias.copy_(b - (w / std) @ mean)


def calibrate_model(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    bn_images: int = 256) -> float:
    """Fit ``net``'s BatchNorm statistics and last layer to the demo's task (in place);
    returns the training accuracy."""
    x = to_float(images)
    _recalibrate_batchnorm(net, x[:bn_images])
    linear = _last_linear(net)
    _fit_linear(linear, _penultimate(net, linear, x), labels)
    with torch.no_grad():
        preds = torch.cat([net(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((preds == labels).double().mean())
