"""Training of student codecs: two stages, augmentation, cosine schedule, resumable.

Stage 1 distils the split tensor (``feature_weight * MSE / energy``) with a small rate term;
stage 2 (one run per beta, starting from stage 1) trains end to end through the frozen
teacher tail with Hinton KD on the logits, the feature term and ``beta * bytes``.
The teacher runs online on each augmented batch (random crop with 4-pixel zero padding
and horizontal flip of the JPEG images 1017..9999), so no labels are used.

Every epoch appends one JSON record (losses, estimated bytes, learning rate, seconds and,
for the curves only, top-1 and estimated bytes on the evaluation images) to a JSONL log
and writes a checkpoint; ``train_student(..., resume=True)`` continues from it. The
``minutes`` budget stops at an epoch boundary.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from tether.core.errors import CodecError
from tether.codecs.bottleneck import bits_per_sample
from tether.codecs.student import StudentModel
from tether.codecs.training import batches, freeze, kd_loss, optimise

Teacher = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]   # x -> (split, logits)


@dataclass(frozen=True)
class StudentTrainConfig:
    """Optimisation settings of one student training stage."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    pretrained_lr_scale: float = 0.2     # stem and decoder blocks start from the teacher
    freeze_stem: bool = False            # keep the teacher's stem (conv1, blocks) as it is
    aux_lr: float = 1e-3
    seed: int = 0
    beta: float = 0.0                    # loss per estimated byte
    feature_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 1.0
    minutes: float | None = None         # stop at an epoch boundary past this budget

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise CodecError(f"invalid training settings {self}")
        if self.beta < 0 or not math.isfinite(self.beta):
            raise CodecError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.minutes is not None and self.minutes <= 0:
            raise CodecError("minutes must be > 0")


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of uint8 NCHW images."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def _optimizers(model: StudentModel, cfg: StudentTrainConfig, steps: int) -> tuple[Any, ...]:
    stem = [p for m in (*model.stem_modules[:2], *model.stem_modules[2]) for p in m.parameters()]
    for p in stem:                       # frozen: no gradient, no backward through the stem
        p.requires_grad_(not cfg.freeze_stem)
    pretrained = {id(p) for m in model.decoder_block_modules for p in m.parameters()}
    pretrained |= {id(p) for p in stem}
    main = [p for n, p in model.named_parameters()
            if not n.endswith("quantiles") and p.requires_grad]
    groups = [{"params": [p for p in main if id(p) not in pretrained], "lr": cfg.lr},
              {"params": [p for p in main if id(p) in pretrained],
               "lr": cfg.lr * cfg.pretrained_lr_scale}]
    opt = torch.optim.Adam(groups)
    aux = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    aux_opt = torch.optim.Adam(aux, lr=cfg.aux_lr)
    warm = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, aux_opt, sched


def _loss(model: StudentModel, tail: nn.Module, x: torch.Tensor, target: torch.Tensor,
          logits: torch.Tensor, cfg: StudentTrainConfig, energy: float) -> dict[str, torch.Tensor]:
    out = model(x)
    mse = F.mse_loss(out["x_hat"], target) / energy
    bytes_ = bits_per_sample(out["likelihoods"]["y"]) / 8.0
    loss = cfg.feature_weight * mse + cfg.beta * bytes_
    kd = torch.zeros(())
    if cfg.kd_weight > 0:
        kd = kd_loss(tail(out["x_hat"]), logits, cfg.temperature)
        loss = loss + cfg.kd_weight * kd
    return {"loss": loss, "mse": mse, "kd": kd, "bytes": bytes_}


def _step(model: StudentModel, tail: nn.Module, opts: tuple[Any, ...], x: torch.Tensor,
          teacher: Teacher, cfg: StudentTrainConfig, energy: float) -> dict[str, float]:
    with torch.no_grad():
        target, logits = teacher(x)
    return optimise(model, opts, _loss(model, tail, x, target, logits, cfg, energy))


@torch.no_grad()
def quick_eval(model: StudentModel, tail: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Top-1 and estimated bytes (noise-free rounding) on float images: for curves only."""
    model.eval()
    correct, bits = 0, 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        y = model.encoder(x)
        y_hat, lik = model.entropy_bottleneck(y, training=False)
        correct += int((tail(model.decoder(y_hat)).argmax(1) == labels[i:i + batch_size]).sum())
        bits += float(-torch.log2(lik.clamp_min(1e-9)).sum())
    return {"eval_top1": correct / max(len(images), 1), "eval_bytes_est": bits / 8 / len(images)}


def _energy(teacher: Teacher, images: torch.Tensor) -> float:
    with torch.no_grad():
        target, _ = teacher(images[:512].float() / 255.0)
    return float(target.pow(2).mean().clamp_min(1e-12))


def train_student(model: StudentModel, teacher: Teacher, tail: nn.Module, images: torch.Tensor,
                  cfg: StudentTrainConfig, workdir: str | Path, name: str,
                  evalset: tuple[torch.Tensor, torch.Tensor] | None = None,
                  resume: bool = True, progress: bool = True) -> tuple[StudentModel, list[dict]]:
    """Train ``model`` in place on uint8 ``images``; checkpoint ``workdir/name.ckpt``, log
    ``workdir/name.log.jsonl``. Returns the model (``update()``-d) and the history."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = workdir / f"{name}.ckpt", workdir / f"{name}.log.jsonl"
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    freeze(tail)
    per_epoch = math.ceil(len(images) / cfg.batch_size)
    opts = _optimizers(model, cfg, per_epoch * cfg.epochs)
    history: list[dict] = []
    if resume and ckpt.is_file():
        history = _load_checkpoint(ckpt, model, opts, gen)
    elif log_path.exists():
        log_path.unlink()
    energy = _energy(teacher, images)
    started = time.time()
    for epoch in range(len(history), cfg.epochs):
        record = _epoch(model, teacher, tail, images, cfg, opts, gen, energy, epoch, progress)
        if evalset is not None:
            record.update(quick_eval(model, tail, *evalset))
        history.append(record)
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        _save_checkpoint(ckpt, model, opts, gen, history)
        spent = (time.time() - started) / 60
        if cfg.minutes is not None and spent + record["seconds"] / 60 > cfg.minutes \
                and epoch + 1 < cfg.epochs:
            break
    settle_quantiles(model)
    model.update(force=True)
    return model.eval(), history


def settle_quantiles(model: StudentModel, steps: int = 1000, lr: float = 1e-2) -> float:
    """Extra steps of CompressAI's aux loss alone (cheap: quantiles only) so the CDF
    tables ``update()`` builds cover the latent's range; returns the final aux loss."""
    quantiles = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    opt = torch.optim.Adam(quantiles, lr=lr)
    aux = torch.zeros(())
    for _ in range(steps):
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        aux.backward()
        opt.step()
    return float(aux.detach())


def _epoch(model: StudentModel, teacher: Teacher, tail: nn.Module, images: torch.Tensor,
           cfg: StudentTrainConfig, opts: tuple[Any, ...], gen: torch.Generator, energy: float,
           epoch: int, progress: bool) -> dict[str, Any]:
    model.train()
    n, t0 = len(images), time.time()
    sums = {"loss": 0.0, "mse": 0.0, "kd": 0.0, "bytes": 0.0, "aux": 0.0}
    bar = tqdm(total=math.ceil(n / cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not progress, leave=False)
    for idx in batches(n, cfg.batch_size, gen):
        x = augment(images[idx], gen).float().div_(255.0)
        parts = _step(model, tail, opts, x, teacher, cfg, energy)
        for k in sums:
            sums[k] += parts[k] * len(idx) / n
        bar.update(1)
        bar.set_postfix(bytes=f"{parts['bytes']:.0f}", kd=f"{parts['kd']:.3f}")
    bar.close()
    return {"epoch": epoch + 1, "beta": cfg.beta, **sums, "lr": opts[0].param_groups[0]["lr"],
            "seconds": time.time() - t0, "loadavg_1m": os.getloadavg()[0]}


def _save_checkpoint(path: Path, model: StudentModel, opts: tuple[Any, ...],
                     gen: torch.Generator, history: list[dict]) -> None:
    opt, aux_opt, sched = opts
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "aux": aux_opt.state_dict(),
             "sched": sched.state_dict(), "gen": gen.get_state(), "history": history}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, model: StudentModel, opts: tuple[Any, ...],
                     gen: torch.Generator) -> list[dict]:
    opt, aux_opt, sched = opts
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["opt"])
    aux_opt.load_state_dict(state["aux"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    return list(state["history"])


def describe(cfg: StudentTrainConfig) -> dict[str, Any]:
    return asdict(cfg)
