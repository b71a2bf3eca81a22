"""The work behind `tether codec train|eval` (imported only when one of them runs)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from tether.core.errors import ConfigError
from tether.codecs import make_codec
from tether.codecs.bottleneck import BottleneckConfig, BottleneckCodec
from tether.codecs.data import cifar_eval_set, cifar_train_set, to_float
from tether.codecs.evaluate import (
    CodecResult, exit_cost, exit_curve, format_table, measure_codec, pareto_front,
    plot_rate_accuracy, predict, write_csv,
)
from tether.codecs.exits import ExitConfig, calibrate, load_exit, train_exit
from tether.codecs.store import codec_dir, safe_name, save_bottleneck, save_exit, update_costs
from tether.codecs.training import (
    Teacher, TrainConfig, describe, teacher_outputs, train_bottleneck,
)

log = logging.getLogger("tether.codec")
TENSOR_BASELINES = ("fp16", "int8-channel", "fp16+zlib", "int8-channel+zlib", "fp16+zstd",
                    "int8-channel+zstd")
CALIBRATION_SIZE = 1000


def _assets(args: argparse.Namespace) -> Path:
    found = args.assets or (Path(os.environ["TETHER_ASSETS"]) if "TETHER_ASSETS" in os.environ
                            else None)
    if found is None:
        raise ConfigError("no data: pass --assets DIR (the shared assets folder with cifar10/) "
                          "or set TETHER_ASSETS")
    return found


def _load_bundle(path: Path) -> Any:
    from tether.partitioner import BundleModel
    return BundleModel.load(path)


def run_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    if args.epochs < 1 or args.exit_epochs < 1:
        raise ConfigError("--epochs and --exit-epochs must be >= 1")
    bm = _load_bundle(args.bundle)
    bm.manifest.split(args.split)
    if args.family == "student":
        from tether.commands.codec_student import run_train_student
        return run_train_student(args, bm, _assets(args))
    if args.latent is None:
        args.latent = 12
    head, tail = bm.head(args.split), bm.tail(args.split)
    data = cifar_train_set(_assets(args), args.limit)
    evalset = cifar_eval_set(_assets(args), args.limit)
    teacher = teacher_outputs(head, tail, to_float(data.images), progress=not args.no_progress)
    with torch.no_grad():
        eval_feats = head(to_float(evalset.images))
    for beta in args.betas:
        _train_one_codec(args, bm, tail, teacher, beta, eval_feats, evalset.labels)
    if args.exit:
        _train_exit(args, bm, teacher, data.labels, eval_feats, evalset.labels)
    return 0


def _train_one_codec(args: argparse.Namespace, bm: Any, tail: Any, teacher: Any, beta: float,
                     eval_feats: torch.Tensor, labels: torch.Tensor) -> None:
    codec_id = f"bottleneck-b{beta:g}" + (f"-{args.tag}" if args.tag else "")
    cfg = BottleneckConfig(tuple(teacher.features.shape[1:]), args.latent, args.hidden,
                           args.stride)
    train = TrainConfig(epochs=args.epochs, seed=args.seed)
    log_path = codec_dir(args.bundle, args.split) / f"{safe_name(codec_id)}.log.jsonl"
    log_path.unlink(missing_ok=True)
    model, history = train_bottleneck(teacher, tail, cfg, beta, train,
                                      progress=not args.no_progress, log_path=log_path)
    result = measure_codec(BottleneckCodec(codec_id, model), args.split, eval_feats, tail, labels)
    save_bottleneck(args.bundle, args.split, codec_id, model, {
        "beta": beta, "rate_bytes": result.payload_bytes, "accuracy": result.accuracy,
        "train": describe(train), "train_indices": "cifar10 jpeg 1017..9999",
        "log": str(log_path.relative_to(args.bundle)), "final": history[-1]})
    update_costs(args.bundle, codecs=[result.to_cost()])
    print(f"{args.split} {codec_id}: {result.payload_bytes:.1f} B/sample, "
          f"top-1 {100 * result.accuracy:.2f} % on {result.samples} lossless images")


def _train_exit(args: argparse.Namespace, bm: Any, teacher: Any, labels: torch.Tensor,
                eval_feats: torch.Tensor, eval_labels: torch.Tensor) -> None:
    n_cal = min(CALIBRATION_SIZE, len(labels) // 5)
    fit, cal = slice(0, len(labels) - n_cal), slice(len(labels) - n_cal, None)
    cfg = ExitConfig(tuple(teacher.features.shape[1:]), teacher.logits.shape[1], args.exit_conv)
    train = TrainConfig(epochs=args.exit_epochs, seed=args.seed, lr=3e-3, temperature=2.0)
    head, history = train_exit(Teacher(teacher.features[fit], teacher.logits[fit]), cfg, train,
                               progress=not args.no_progress)
    with torch.no_grad():
        cal_logits = head(teacher.features[cal].float())
    calib = calibrate(cal_logits, labels[cal], args.exit_target, args.exit_metric)
    save_exit(args.bundle, args.split, head, calib, {
        "train": describe(train), "history": history, "reference": "labels",
        "calibration_indices": f"cifar10 jpeg last {n_cal} of 1017..9999"})
    exit_ = load_exit(args.bundle, split=args.split)
    t0 = time.perf_counter()
    logits = torch.from_numpy(exit_.logits(eval_feats))
    seconds = (time.perf_counter() - t0) / max(len(eval_feats), 1)
    full = predict(bm.tail(args.split), eval_feats)
    point = exit_curve(args.split, logits, full, eval_labels, calib.metric, [calib.threshold])[0]
    update_costs(args.bundle, exits=[exit_cost(point, seconds)])
    print(f"{args.split} exit: threshold {calib.threshold:.4f} ({calib.metric}), calibration "
          f"exit rate {calib.exit_rate:.3f}; lossless eval: exit rate {point.exit_rate:.3f}, "
          f"exit top-1 {_pct(point.exit_accuracy)}, overall top-1 {_pct(point.overall_accuracy)}")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _eval_splits(args: argparse.Namespace, bm: Any) -> list[str]:
    if args.splits:
        for name in args.splits:
            bm.manifest.split(name)
        return list(args.splits)
    wanted = set(bm.exported_splits) | {c.split for c in bm.manifest.codecs} | \
        {e.split for e in bm.manifest.exits}
    return [n for n in bm.manifest.split_names if n in wanted and n != "input"]


def run_eval(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    bm = _load_bundle(args.bundle)
    data = cifar_eval_set(_assets(args), args.limit)
    x, labels = to_float(data.images), data.labels
    full = bm.full_model()
    full_preds = predict(full, x)
    full_acc = float((full_preds == labels).double().mean())
    results = [measure_codec(make_codec(cid), "input", x, full, labels)
               for cid in args.input_codecs]
    exit_rows = []
    for split in _eval_splits(args, bm):
        results += _eval_split(args, bm, split, x, labels)
        if any(e.split == split for e in bm.manifest.exits):
            exit_rows += _eval_exit(args, bm, split, x, labels, full_preds)
    out = args.out or (args.bundle / "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "codecs.csv", results)
    write_csv(out / "exits.csv", exit_rows)
    plot_rate_accuracy(results, out / "codecs.png", full_acc,
                       f"{bm.manifest.model_id}: top-1 vs wire bytes ({len(labels)} lossless)")
    update_costs(args.bundle, codecs=[_cost(bm, r) for r in results], full_accuracy=full_acc)
    print(format_table(results, full_acc))
    print("\nPareto front (top-1 vs payload bytes; every codec above is a candidate):")
    for r in pareto_front(results):
        print(f"  {r.payload_bytes:9.1f} B  {100 * r.accuracy:6.2f} %  {r.split}:{r.codec}")
    for p in exit_rows:
        print(f"exit {p.split} {p.metric}>={p.threshold:.3f}: rate {p.exit_rate:.3f} "
              f"exit top-1 {_pct(p.exit_accuracy)} overall {_pct(p.overall_accuracy)}")
    print(f"wrote {out / 'codecs.csv'}, {out / 'exits.csv'}, {out / 'codecs.png'}")
    return 0


def _eval_split(args: argparse.Namespace, bm: Any, split: str, x: torch.Tensor,
                labels: torch.Tensor) -> list[CodecResult]:
    """Every codec at ``split``: tensor baselines and bottlenecks on the head's output,
    student codecs (which replace the head) on the images themselves."""
    head, tail = bm.head(split), bm.tail(split)
    with torch.no_grad():
        feats = torch.cat([head(x[i:i + 256]) for i in range(0, len(x), 256)])
    ids = [(cid, feats) for cid in ("fp32", *TENSOR_BASELINES)]
    ids += [(c.codec, x if c.kind == "student" else feats) for c in bm.manifest.codecs
            if c.split == split and c.kind in ("bottleneck", "student")]
    out = []
    for cid, inputs in ids:
        codec = make_codec(cid, args.bundle, bm.manifest, split=split)
        result = measure_codec(codec, split, inputs, tail, labels)
        out.append(result)
        log.info("%s %s: %.1f B, %.2f %%", split, cid, result.payload_bytes,
                 100 * result.accuracy)
    return out


def _cost(bm: Any, result: CodecResult) -> Any:
    entry = next((c for c in bm.manifest.codecs
                  if c.split == result.split and c.codec == result.codec), None)
    if entry is None or entry.kind != "student":
        return result.to_cost()
    return result.to_cost(encoder_flops=entry.params.get("encoder_flops"), replaces_head=True)


def _eval_exit(args: argparse.Namespace, bm: Any, split: str, x: torch.Tensor,
               labels: torch.Tensor, full_preds: torch.Tensor) -> list[Any]:
    exit_ = load_exit(args.bundle, bm.manifest, split)
    with torch.no_grad():
        feats = bm.head(split)(x)
    logits = torch.from_numpy(exit_.logits(feats))
    grid = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99] if exit_.metric == "max_softmax" else \
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.2]
    return exit_curve(split, logits, full_preds, labels, exit_.metric,
                      sorted({*grid, exit_.threshold}))
