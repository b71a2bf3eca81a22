"""`tether codec train --family student`: a shared stage 1, then one stage-2 codec per beta.

Work files (checkpoints, JSONL logs) live in ``BUNDLE/codecs/<split>/student<-tag>/``;
re-running the same command resumes every stage from its last finished epoch.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tether.core.errors import ConfigError
from tether.codecs.data import cifar_eval_set, cifar_train_set, to_float
from tether.codecs.evaluate import measure_codec
from tether.codecs.store import codec_dir, safe_name, save_student, update_costs
from tether.codecs.student import StudentConfig, StudentModel, encoder_flops, init_from_teacher
from tether.codecs.student_codec import StudentCodec
from tether.codecs.student_training import StudentTrainConfig, describe, train_student


def student_id(beta: float, tag: str) -> str:
    return f"student-b{beta:g}" + (f"-{tag}" if tag else "")


def _teacher(head: nn.Module, tail: nn.Module) -> Any:
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = head(x)
        return f, tail(f)
    return run


def _teacher_blocks(full: nn.Module, stem_blocks: int, extra: tuple[int, ...]
                    ) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks the encoder copies, the blocks after them in the same stage): the teacher
    parts that initialise the student's stem and its decoder blocks."""
    stages = [list(getattr(full, f"layer{i}")) for i in (1, 2, 3) if hasattr(full, f"layer{i}")]
    counts = [stem_blocks, *extra]
    if len(counts) > len(stages) or any(c > len(s) for c, s in zip(counts, stages)):
        raise ConfigError(f"stem blocks {counts} exceed the teacher's stages "
                          f"{[len(s) for s in stages]}")
    stem = [b for c, s in zip(counts, stages) for b in s[:c]]
    return stem, stages[len(counts) - 1][counts[-1]:]


def build_student(bm: Any, split: str, args: argparse.Namespace) -> StudentModel:
    """A student for ``split`` of a CIFAR ResNet bundle, initialised from the teacher."""
    full = bm.full_model()
    if not all(hasattr(full, n) for n in ("conv1", "bn1", "layer1")):
        raise ConfigError(f"the student family needs a CIFAR ResNet teacher (conv1, bn1, "
                          f"layer1..3); {bm.manifest.model_id} is not one")
    with torch.no_grad():
        split_shape = tuple(bm.head(split)(bm.example()).shape[1:])
    cfg = StudentConfig(tuple(bm.manifest.input.shape[1:]), split_shape,
                        full.conv1.out_channels, args.stem_blocks, args.hidden,
                        args.latent or 32, args.decoder_blocks, args.latent_stride,
                        tuple(args.stem_extra))
    model = StudentModel(cfg)
    stem, after = _teacher_blocks(full, args.stem_blocks, cfg.stem_extra)
    init_from_teacher(model, full.conv1, full.bn1, stem, after[:args.decoder_blocks])
    spread_latent(model, bm.example().expand(16, -1, -1, -1).contiguous())
    return model


@torch.no_grad()
def spread_latent(model: StudentModel, images: torch.Tensor, target_std: float = 2.0) -> None:
    """Scale the last encoder conv (and the first decoder conv inversely) so the latent
    starts well above the quantization step: otherwise the uniform noise of the entropy
    bottleneck drowns the signal and training crawls."""
    model.eval()
    std = float(model.encoder(images).std().clamp_min(1e-6))
    gain = target_std / std
    last, first = model.encoder[-1], model.decoder[0]
    last.weight.mul_(gain)
    last.bias.mul_(gain)
    first.weight.div_(gain)


def run_train_student(args: argparse.Namespace, bm: Any, assets: Path) -> int:
    split = args.split
    head, tail = bm.head(split), bm.tail(split)
    teacher = _teacher(head, tail)
    data = cifar_train_set(assets, args.limit)
    evalset = cifar_eval_set(assets, args.limit)
    eval_x = to_float(evalset.images)
    work = codec_dir(args.bundle, split) / safe_name("student" + (f"-{args.tag}" if args.tag else ""))
    model = build_student(bm, split, args)
    common = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, minutes=args.minutes,
                  freeze_stem=args.freeze_stem)
    stage1 = StudentTrainConfig(epochs=args.stage1_epochs, beta=args.stage1_beta,
                                feature_weight=1.0, kd_weight=args.stage1_kd, **common)
    model, hist1 = train_student(model, teacher, tail, data.images, stage1, work, "stage1",
                                 (eval_x, evalset.labels), not args.no_resume,
                                 not args.no_progress)
    if len(hist1) < stage1.epochs:
        print(f"stage 1 stopped at epoch {len(hist1)}/{stage1.epochs} (budget): re-run to resume")
        return 3
    for beta in args.betas:
        student = copy.deepcopy(model)
        cfg2 = StudentTrainConfig(epochs=args.epochs, beta=beta, feature_weight=args.feature_weight,
                                  kd_weight=1.0, temperature=args.temperature,
                                  **{**common, "lr": args.lr * args.stage2_lr_scale})
        name = f"b{beta:g}"
        student, hist = train_student(student, teacher, tail, data.images, cfg2, work, name,
                                      (eval_x, evalset.labels), not args.no_resume,
                                      not args.no_progress)
        if len(hist) < cfg2.epochs:
            print(f"{name} stopped at epoch {len(hist)}/{cfg2.epochs} (budget): re-run to resume")
            return 3
        _store(args, split, student, beta, tail, eval_x, evalset.labels, work, name,
               {"stage1": describe(stage1), "stage2": describe(cfg2)}, hist1 + hist)
    return 0


def _store(args: argparse.Namespace, split: str, model: StudentModel, beta: float,
           tail: nn.Module, x: torch.Tensor, labels: torch.Tensor, work: Path, name: str,
           train: dict, history: list[dict]) -> None:
    codec_id = student_id(beta, args.tag)
    flops = encoder_flops(model.cfg)
    entry = save_student(args.bundle, split, codec_id, model, {
        "beta": beta, "train": train, "train_indices": "cifar10 jpeg 1017..9999",
        "log": str((work / f"{name}.log.jsonl").relative_to(args.bundle)),
        "stage1_log": str((work / "stage1.log.jsonl").relative_to(args.bundle)),
        "encoder_flops": flops, "train_seconds": sum(h["seconds"] for h in history)})
    codec = StudentCodec.from_entry(entry, args.bundle)
    result = measure_codec(codec, split, x, tail, labels)
    save_student(args.bundle, split, codec_id, model, {
        **entry.params, "rate_bytes": result.payload_bytes, "rate_bytes_p95": result.payload_p95,
        "accuracy": result.accuracy}, export=False)
    update_costs(args.bundle, codecs=[result.to_cost(encoder_flops=flops, replaces_head=True)])
    print(f"{split} {codec_id}: {result.payload_bytes:.1f} B/sample (p95 "
          f"{result.payload_p95:.0f}), top-1 {100 * result.accuracy:.2f} % on {result.samples} "
          f"lossless images, encoder {flops / 1e6:.1f} MFLOPs")
