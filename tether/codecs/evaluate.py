"""Rate-accuracy evaluation of codecs and early exits, in real wire bytes.

Every sample is encoded on its own (batch 1, as one request on the wire): payload bytes
are the lengths of the encoded frames, header bytes the msgpack-encoded header length,
each in its own column. Accuracy is top-1 of the tail (or the full model, for input
codecs) on the decoded tensors.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from tether.core.types import CodecCost, ExitCost
from tether.codecs.base import Codec
from tether.codecs.exits import confidence, takes


@dataclass(frozen=True)
class CodecResult:
    split: str                  # split point, or "input" for input codecs
    codec: str
    accuracy: float
    payload_bytes: float        # mean per sample
    header_bytes: float         # mean per sample (msgpack)
    encode_seconds: float       # mean per sample
    decode_seconds: float
    samples: int
    payload_p95: float = 0.0    # 95th percentile per sample

    def to_cost(self, encoder_flops: int | None = None, replaces_head: bool = False) -> CodecCost:
        return CodecCost(split=self.split, codec=self.codec, bytes=self.payload_bytes,
                         encode_seconds=self.encode_seconds, decode_seconds=self.decode_seconds,
                         accuracy=self.accuracy, header_bytes=round(self.header_bytes),
                         bytes_p95=self.payload_p95, encoder_flops=encoder_flops,
                         replaces_head=replaces_head)


@torch.no_grad()
def predict(module: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class predictions of ``module`` over ``x`` in batches."""
    out = [module(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def measure_codec(codec: Codec, split: str, inputs: torch.Tensor, tail: nn.Module,
                  labels: torch.Tensor) -> CodecResult:
    """Encode/decode each sample alone, then classify the decoded tensors with ``tail``."""
    payload = header = 0
    t_enc = t_dec = 0.0
    decoded: list[torch.Tensor] = []
    sizes: list[int] = []
    for i in range(len(inputs)):
        t0 = time.perf_counter()
        enc = codec.encode(inputs[i:i + 1])
        t1 = time.perf_counter()
        decoded.append(codec.decode(enc.header, enc.payload))
        t_dec += time.perf_counter() - t1
        t_enc += t1 - t0
        payload += enc.payload_bytes
        sizes.append(enc.payload_bytes)
        header += enc.header_bytes
    n = max(len(inputs), 1)
    preds = predict(tail, torch.cat(decoded).float())
    acc = float((preds == labels).double().mean())
    p95 = float(torch.tensor(sizes, dtype=torch.float64).quantile(0.95)) if sizes else 0.0
    return CodecResult(split, codec.codec_id, acc, payload / n, header / n, t_enc / n,
                       t_dec / n, len(inputs), p95)


@dataclass(frozen=True)
class ExitPoint:
    split: str
    metric: str
    threshold: float
    exit_rate: float            # fraction answered by the exit
    exit_accuracy: float | None  # accuracy of those answers
    overall_accuracy: float     # exits answer theirs, the full model the rest


def exit_curve(split: str, exit_logits: torch.Tensor, full_preds: torch.Tensor,
               labels: torch.Tensor, metric: str, thresholds: Sequence[float]) -> list[ExitPoint]:
    """Exit rate and accuracy at each threshold (evaluation set, not calibration)."""
    conf = confidence(exit_logits, metric)
    exit_preds = exit_logits.argmax(1)
    points = []
    for th in thresholds:
        take = takes(conf, metric, th)
        final = torch.where(take, exit_preds, full_preds)
        acc_exit = float((exit_preds[take] == labels[take]).double().mean()) if take.any() else None
        points.append(ExitPoint(split, metric, float(th), float(take.double().mean()), acc_exit,
                                float((final == labels).double().mean())))
    return points


def exit_cost(point: ExitPoint, exit_seconds: float) -> ExitCost:
    return ExitCost(split=point.split, exit_seconds=exit_seconds, exit_rate=point.exit_rate,
                    accuracy=point.exit_accuracy, threshold=point.threshold)


def write_csv(path: str | Path, rows: Iterable[object]) -> None:
    """Dataclass rows to CSV (header from the first row's fields)."""
    rows = list(rows)
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(rows[0])])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def format_table(results: Sequence[CodecResult], full_accuracy: float | None = None) -> str:
    """A fixed-width text table sorted by split and bytes."""
    lines = [f"{'split':<14} {'codec':<22} {'top-1 %':>8} {'payload B':>10} {'header B':>9} "
             f"{'enc ms':>7} {'dec ms':>7}"]
    if full_accuracy is not None:
        lines.append(f"{'(none)':<14} {'uncompressed model':<22} {100 * full_accuracy:8.2f}")
    for r in sorted(results, key=lambda r: (r.split != "input", r.split, r.payload_bytes)):
        lines.append(f"{r.split:<14} {r.codec:<22} {100 * r.accuracy:8.2f} {r.payload_bytes:10.1f}"
                     f" {r.header_bytes:9.1f} {1e3 * r.encode_seconds:7.2f} "
                     f"{1e3 * r.decode_seconds:7.2f}")
    return "\n".join(lines)


def pareto_front(results: Sequence[CodecResult]) -> list[CodecResult]:
    """Codecs no other codec beats on both payload bytes and top-1, by increasing bytes."""
    front: list[CodecResult] = []
    for r in sorted(results, key=lambda r: (r.payload_bytes, -r.accuracy)):
        if not front or r.accuracy > front[-1].accuracy:
            front.append(r)
    return front


def plot_rate_accuracy(results: Sequence[CodecResult], path: str | Path,
                       full_accuracy: float | None = None, title: str = "") -> None:
    """Top-1 vs payload bytes per sample (log x), one series per split point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for split in sorted({r.split for r in results}):
        rows = sorted((r for r in results if r.split == split), key=lambda r: r.payload_bytes)
        ax.plot([r.payload_bytes for r in rows], [100 * r.accuracy for r in rows], "o-",
                label=split, alpha=0.8)
        for r in rows:
            ax.annotate(r.codec, (r.payload_bytes, 100 * r.accuracy), fontsize=6)
    front = pareto_front(results)
    ax.step([r.payload_bytes for r in front], [100 * r.accuracy for r in front], "k-",
            where="post", lw=1.5, alpha=0.6, label="Pareto front")
    if full_accuracy is not None:
        ax.axhline(100 * full_accuracy, color="grey", ls="--", lw=1, label="uncompressed")
    ax.set_xscale("log")
    ax.set_xlabel("payload bytes per sample (wire)")
    ax.set_ylabel("top-1 accuracy %")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
