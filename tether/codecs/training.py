"""Distillation training of bottleneck codecs (and the shared teacher-feature cache).

Training is planned for small CPUs: the teacher's tensor at the split and its final
logits are computed once (:func:`teacher_outputs`), then each step runs only the small
encoder/decoder and the frozen tail. Loss per batch::

    feature_weight * MSE(x_hat, x) / mean(x^2)  +  kd_weight * T^2 * KL(teacher || tail(x_hat))
    + beta * bytes_per_sample  (estimated from the likelihoods)

CompressAI's auxiliary loss trains the entropy bottleneck's quantiles with its own
optimizer. Everything is seeded; each epoch appends one record to the history.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from tether.core.errors import CodecError
from tether.codecs.bottleneck import BottleneckAutoencoder, BottleneckConfig, bits_per_sample


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by codec and exit training."""

    epochs: int = 8
    batch_size: int = 16
    lr: float = 2e-3
    aux_lr: float = 1e-3
    seed: int = 0
    feature_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise CodecError(f"invalid training settings {self}: epochs and batch_size must be "
                             f">= 1, lr and temperature > 0")


@dataclass
class Teacher:
    """Teacher outputs for a training set: the split tensor (fp16 to save memory) and logits."""

    features: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def teacher_outputs(head: nn.Module, tail: nn.Module, images: torch.Tensor,
                    batch_size: int = 256, progress: bool = False) -> Teacher:
    """Run head and tail once over ``images`` (float NCHW in [0, 1])."""
    feats, logits = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="teacher", disable=not progress):
        f = head(images[i:i + batch_size].float())
        feats.append(f.to(torch.float16))
        logits.append(tail(f).float())
    return Teacher(torch.cat(feats), torch.cat(logits))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(softmax(teacher/T) || softmax(student/T))."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches (the last short batch is kept)."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients (gradients still flow through to its input)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _optimizers(model: BottleneckAutoencoder, cfg: TrainConfig, steps: int) -> tuple[Any, ...]:
    main = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    opt = torch.optim.Adam(main, lr=cfg.lr)
    aux_opt = torch.optim.Adam(aux, lr=cfg.aux_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1),
                                                pct_start=0.15)
    return opt, aux_opt, sched


def _bottleneck_step(model: BottleneckAutoencoder, tail: nn.Module, x: torch.Tensor,
                     teacher_logits: torch.Tensor, beta: float, cfg: TrainConfig,
                     energy: float) -> dict[str, torch.Tensor]:
    out = model(x)
    mse = F.mse_loss(out["x_hat"], x) / energy
    # kd_weight = 0: features only, the frozen tail is not run (much cheaper on small CPUs)
    kd = (kd_loss(tail(out["x_hat"]), teacher_logits, cfg.temperature) if cfg.kd_weight
          else mse.new_zeros(()))
    bits = bits_per_sample(out["likelihoods"]["y"])
    loss = cfg.feature_weight * mse + cfg.kd_weight * kd + beta * bits / 8.0
    return {"loss": loss, "mse": mse, "kd": kd, "bytes": bits / 8.0}


def _train_step(model: BottleneckAutoencoder, tail: nn.Module, opts: tuple[Any, ...],
                x: torch.Tensor, logits: torch.Tensor, beta: float, train: TrainConfig,
                energy: float) -> dict[str, float]:
    """One optimisation step of the main loss, then one of CompressAI's aux loss."""
    return optimise(model, opts, _bottleneck_step(model, tail, x, logits, beta, train, energy))


def optimise(model: nn.Module, opts: tuple[Any, ...],
             parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """One step on ``parts["loss"]``, then one on CompressAI's aux loss (the CDF quantiles);
    returns every part as a float."""
    opt, aux_opt, sched = opts
    opt.zero_grad(set_to_none=True)
    parts["loss"].backward()
    opt.step()
    sched.step()
    aux = model.aux_loss()
    aux_opt.zero_grad(set_to_none=True)
    aux.backward()
    aux_opt.step()
    parts["aux"] = aux
    return {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def _start_at_the_mean(model: BottleneckAutoencoder, features: torch.Tensor) -> None:
    """Bias the decoder's last conv to the per-channel mean, so training starts there."""
    last = [m for m in model.decoder if isinstance(m, nn.Conv2d)][-1]
    mean = features[:2048].float().mean(dim=(0, 2, 3)) / model.scale
    last.bias.copy_(mean)


def _check_inputs(teacher: Teacher, cfg: BottleneckConfig, beta: float) -> None:
    if beta < 0 or not math.isfinite(beta):
        raise CodecError(f"beta must be a finite number >= 0, got {beta}")
    if tuple(teacher.features.shape[1:]) != cfg.feature_shape:
        raise CodecError(f"teacher features {list(teacher.features.shape[1:])} do not match the "
                         f"codec's feature_shape {list(cfg.feature_shape)}")


def train_bottleneck(teacher: Teacher, tail: nn.Module, cfg: BottleneckConfig, beta: float,
                     train: TrainConfig = TrainConfig(), progress: bool = True,
                     log_path: str | Path | None = None
                     ) -> tuple[BottleneckAutoencoder, list[dict]]:
    """Distil a bottleneck codec for ``beta`` (loss weight per estimated byte); returns the
    model, already ``update()``-d, and the per-epoch history (also appended to ``log_path``)."""
    _check_inputs(teacher, cfg, beta)
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    model = BottleneckAutoencoder(cfg)
    freeze(tail)
    n = len(teacher.features)
    per_epoch = math.ceil(n / train.batch_size)
    opt, aux_opt, sched = _optimizers(model, train, per_epoch * train.epochs)
    energy = float(teacher.features[:2048].float().pow(2).mean().clamp_min(1e-12))
    model.scale.fill_(math.sqrt(energy))
    _start_at_the_mean(model, teacher.features)
    history: list[dict] = []
    bar = tqdm(total=per_epoch * train.epochs, desc=f"codec b{beta:g}", disable=not progress)
    warmup, step = max(1, per_epoch * train.epochs // 5), 0
    for epoch in range(train.epochs):
        model.train()
        sums, t0 = {"loss": 0.0, "mse": 0.0, "kd": 0.0, "bytes": 0.0, "aux": 0.0}, time.time()
        for idx in batches(n, train.batch_size, gen):
            ramp = min(1.0, step / warmup)          # rate term ramps in over the first 20 %
            step += 1
            parts = _train_step(model, tail, (opt, aux_opt, sched), teacher.features[idx].float(),
                                teacher.logits[idx], beta * ramp, train, energy)
            for k in sums:
                sums[k] += parts[k] * len(idx) / n
            bar.update(1)
            bar.set_postfix(bytes=f"{parts['bytes']:.0f}")
        record = {"epoch": epoch + 1, "beta": beta, **sums, "seconds": time.time() - t0}
        history.append(record)
        if log_path is not None:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
    bar.close()
    model.update(force=True)
    return model.eval(), history


def describe(train: TrainConfig) -> dict[str, Any]:
    """Training settings as a JSON-friendly dict (stored with the codec)."""
    return asdict(train)
