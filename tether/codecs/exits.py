"""Early exits: small classifier heads at a split point, distilled and calibrated.

An :class:`ExitHead` (optional conv-BN-ReLU, global average pooling, linear) reads the
split tensor and predicts the model's classes. It is trained by distillation from the
full model's logits (:func:`train_exit`), then :func:`calibrate` picks the confidence
threshold for a target accuracy on a held-apart slice: the loosest threshold whose
locally answered samples still reach the target. Confidence is the max softmax
(answer when ``>= threshold``) or the entropy (answer when ``<= threshold``).

At run time :func:`load_exit` returns an :class:`EarlyExit` that runs the head in ONNX
Runtime when the bundle has the export, else in torch.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from tether.core.bundle import ExitEntry, Manifest
from tether.core.errors import BundleError, CodecError, WeightsError
from tether.codecs.base import onnx_session
from tether.codecs.training import Teacher, TrainConfig, batches, kd_loss

METRICS = ("max_softmax", "entropy")


@dataclass(frozen=True)
class ExitConfig:
    feature_shape: tuple[int, int, int]   # C, H, W of the split tensor
    num_classes: int
    conv_channels: int = 0                # 0: pooling + linear only

    def to_dict(self) -> dict[str, Any]:
        return {"feature_shape": list(self.feature_shape), "num_classes": self.num_classes,
                "conv_channels": self.conv_channels}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExitConfig":
        try:
            return cls(tuple(int(v) for v in d["feature_shape"]), int(d["num_classes"]),
                       int(d.get("conv_channels", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid exit config {d!r}: {exc}") from exc


class ExitHead(nn.Module):
    """[conv3x3-BN-ReLU] -> global average pool -> linear."""

    def __init__(self, cfg: ExitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.feature_shape[0]
        if cfg.conv_channels:
            self.conv = nn.Sequential(nn.Conv2d(c, cfg.conv_channels, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(cfg.conv_channels), nn.ReLU())
            c = cfg.conv_channels
        else:
            self.conv = nn.Identity()
        self.fc = nn.Linear(c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def confidence(logits: torch.Tensor, metric: str) -> torch.Tensor:
    """Max softmax probability, or entropy (nats) of the softmax."""
    if metric not in METRICS:
        raise CodecError(f"unknown exit metric {metric!r}; use one of {METRICS}")
    p = F.softmax(logits.float(), dim=1)
    if metric == "max_softmax":
        return p.max(dim=1).values
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


def takes(conf: torch.Tensor, metric: str, threshold: float) -> torch.Tensor:
    """Which samples the exit answers at ``threshold``."""
    return conf >= threshold if metric == "max_softmax" else conf <= threshold


def train_exit(teacher: Teacher, cfg: ExitConfig, train: TrainConfig = TrainConfig(),
               progress: bool = True) -> tuple[ExitHead, list[dict]]:
    """Distil an exit head from the teacher's logits; returns head (eval) and history."""
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    head = ExitHead(cfg)
    opt = torch.optim.Adam(head.parameters(), lr=train.lr, weight_decay=1e-4)
    n = len(teacher.features)
    steps = math.ceil(n / train.batch_size) * train.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=steps)
    history: list[dict] = []
    for epoch in tqdm(range(train.epochs), desc="exit", disable=not progress):
        head.train()
        total, t0 = 0.0, time.time()
        for idx in batches(n, train.batch_size, gen):
            loss = kd_loss(head(teacher.features[idx].float()), teacher.logits[idx],
                           train.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx) / n
        history.append({"epoch": epoch + 1, "kd": total, "seconds": time.time() - t0})
    return head.eval(), history


@dataclass(frozen=True)
class Calibration:
    metric: str
    target: float
    threshold: float
    exit_rate: float          # fraction answered locally on the calibration slice
    accuracy: float | None    # accuracy of those answers on the calibration slice


def calibrate(logits: torch.Tensor, reference: torch.Tensor, target: float,
              metric: str = "max_softmax") -> Calibration:
    """Loosest threshold whose answered samples agree with ``reference`` at >= ``target``.

    ``reference`` holds labels (target = accuracy) or the full model's predictions (target
    = agreement). With no threshold reaching the target, nothing exits.
    """
    if not 0.0 < target <= 1.0:
        raise CodecError(f"exit target accuracy must be in (0, 1], got {target}")
    conf = confidence(logits, metric)
    order = torch.argsort(conf, descending=(metric == "max_softmax"))
    correct = (logits.argmax(1) == reference)[order].double()
    running = torch.cumsum(correct, 0) / torch.arange(1, len(correct) + 1)
    ok = torch.nonzero(running >= target - 1e-12).flatten()
    if len(ok) == 0:
        never = math.inf if metric == "max_softmax" else -math.inf
        return Calibration(metric, target, never, 0.0, None)
    k = int(ok.max()) + 1
    threshold = float(conf[order[k - 1]])
    taken = takes(conf, metric, threshold)
    acc = float((logits.argmax(1) == reference)[taken].double().mean())
    return Calibration(metric, target, threshold, float(taken.double().mean()), acc)


@dataclass(frozen=True)
class ExitDecision:
    prediction: np.ndarray    # int64 [N], the exit's class
    confidence: np.ndarray    # float32 [N], in the entry's metric
    take: np.ndarray          # bool [N], answer locally
    logits: np.ndarray


class EarlyExit:
    """A calibrated exit head ready for the edge: ``decision = exit(features)``."""

    def __init__(self, entry: ExitEntry, head: ExitHead, onnx_path: Path | None = None,
                 threads: int = 1) -> None:
        self.entry = entry
        self.split = entry.split
        self.metric = entry.metric
        self.threshold = entry.threshold
        self.head = head.eval()
        self._session = onnx_session(onnx_path, threads, "ONNX exit head") if onnx_path else None

    def logits(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        x = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) \
            else np.asarray(features, dtype=np.float32)
        if self._session is not None:
            return self._session.run(None, {"features": x})[0]
        with torch.no_grad():
            return self.head(torch.from_numpy(x)).numpy()

    def __call__(self, features: torch.Tensor | np.ndarray) -> ExitDecision:
        logits = self.logits(features)
        conf = confidence(torch.from_numpy(logits), self.metric)
        take = takes(conf, self.metric, self.threshold)
        return ExitDecision(logits.argmax(1).astype(np.int64), conf.numpy().astype(np.float32),
                            take.numpy(), logits)


def export_exit_onnx(head: ExitHead, path: str | Path) -> None:
    """Export the exit head (split tensor -> logits) with a dynamic batch dimension."""
    example = torch.zeros(1, *head.cfg.feature_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # legacy exporter is fine
            torch.onnx.export(head.eval(), (example,), str(path), input_names=["features"],
                              output_names=["logits"], opset_version=17, dynamo=False,
                              dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - exporter errors are many; map them all
        raise CodecError(f"ONNX export of the exit head failed: {exc}") from exc


def load_exit(bundle_dir: str | Path, manifest: Manifest | None = None,
              split: str | None = None) -> EarlyExit:
    """The exit stored in the bundle at ``split`` (the only one if ``split`` is None)."""
    manifest = manifest or Manifest.load(bundle_dir)
    found = [e for e in manifest.exits if split is None or e.split == split]
    if len(found) != 1:
        raise BundleError(f"no single early exit at split {split!r}; the bundle has exits at "
                          f"{[e.split for e in manifest.exits]} (train one with "
                          f"`tether codec train BUNDLE --split NAME --exit`)")
    entry = found[0]
    head = ExitHead(ExitConfig.from_dict(entry.params.get("config", {})))
    path = Path(bundle_dir) / entry.path
    try:
        head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except FileNotFoundError as exc:
        raise WeightsError(f"exit weights {path} missing: re-run `tether codec train`") from exc
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise WeightsError(f"exit weights {path} unreadable or mismatched: {exc}") from exc
    onnx_rel = entry.params.get("onnx")
    onnx = Path(bundle_dir) / onnx_rel if onnx_rel else None
    return EarlyExit(entry, head, onnx if onnx and onnx.is_file() else None)

