"""Saving learned codecs and exits into a bundle (weights, ONNX, manifest entries, costs).

Layout inside the bundle::

    codecs/<split>/<codec_id>.pt            bottleneck weights (state dict, CDFs included)
    codecs/<split>/<codec_id>.encoder.onnx  the edge part
    codecs/<split>/<codec_id>.log.jsonl     training history, one JSON record per epoch
    exits/<split>.pt, exits/<split>.onnx    early-exit head

The manifest is re-read right before each update and written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from tether.core.bundle import CodecEntry, ExitEntry, Manifest
from tether.core.errors import CodecError
from tether.core.types import CodecCost, CostTable, ExitCost
from tether.codecs.bottleneck import BottleneckAutoencoder, export_encoder_onnx
from tether.codecs.exits import Calibration, ExitHead, export_exit_onnx

if TYPE_CHECKING:
    from tether.codecs.student import StudentModel

log = logging.getLogger(__name__)


@contextlib.contextmanager
def bundle_lock(bundle_dir: str | Path) -> Iterator[None]:
    """Serialise read-modify-write of manifest and costs between concurrent trainers."""
    with open(Path(bundle_dir) / ".codecs.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def safe_name(text: str) -> str:
    """A file-name-safe form of a split or codec id."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def codec_dir(bundle_dir: str | Path, split: str) -> Path:
    path = Path(bundle_dir) / "codecs" / safe_name(split)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_bottleneck(bundle_dir: str | Path, split: str, codec_id: str,
                    model: BottleneckAutoencoder, params: dict[str, Any]) -> Manifest:
    """Write weights and the ONNX encoder, then add the manifest entry (returned)."""
    if not model.ready:
        raise CodecError("Uninitialized CDFs. Run update() first: refusing to save the codec")
    bundle_dir = Path(bundle_dir)
    folder = codec_dir(bundle_dir, split)
    stem = safe_name(codec_id)
    torch.save(model.state_dict(), folder / f"{stem}.pt")
    onnx_rel: str | None = f"codecs/{safe_name(split)}/{stem}.encoder.onnx"
    try:
        export_encoder_onnx(model, bundle_dir / onnx_rel)
    except CodecError as exc:       # the torch encoder still works; say so and go on
        log.warning("%s: encoder stays in torch: %s", codec_id, exc)
        onnx_rel = None
    entry = CodecEntry(split=split, codec=codec_id, kind="bottleneck", params={
        **params, "config": model.cfg.to_dict(),
        "weights": f"codecs/{safe_name(split)}/{stem}.pt", "encoder_onnx": onnx_rel})
    with bundle_lock(bundle_dir):
        manifest = Manifest.load(bundle_dir).with_codec(entry)
        manifest.save(bundle_dir)
    return manifest


def save_student(bundle_dir: str | Path, split: str, codec_id: str, model: "StudentModel",
                 params: dict[str, Any], export: bool = True) -> CodecEntry:
    """Write a student codec (weights with its integer CDF tables, ONNX encoder) and its
    manifest entry (kind ``student``, ``replaces_head``); returns the entry."""
    from tether.codecs.student import export_student_onnx
    if not model.ready:
        raise CodecError("Uninitialized CDFs. Run update() first: refusing to save the codec")
    bundle_dir = Path(bundle_dir)
    folder = codec_dir(bundle_dir, split)
    stem = safe_name(codec_id)
    onnx_rel = f"codecs/{safe_name(split)}/{stem}.encoder.onnx"
    if export:
        torch.save(model.state_dict(), folder / f"{stem}.pt")
        export_student_onnx(model, bundle_dir / onnx_rel)   # the edge needs it: errors propagate
    entry = CodecEntry(split=split, codec=codec_id, kind="student", params={
        **params, "config": model.cfg.to_dict(), "replaces_head": True,
        "weights": f"codecs/{safe_name(split)}/{stem}.pt", "encoder_onnx": onnx_rel})
    with bundle_lock(bundle_dir):
        Manifest.load(bundle_dir).with_codec(entry).save(bundle_dir)
    return entry


def save_exit(bundle_dir: str | Path, split: str, head: ExitHead, calib: Calibration,
              params: dict[str, Any]) -> Manifest:
    """Write the exit head (torch + ONNX) and its calibrated manifest entry."""
    bundle_dir = Path(bundle_dir)
    (bundle_dir / "exits").mkdir(parents=True, exist_ok=True)
    stem = safe_name(split)
    torch.save(head.state_dict(), bundle_dir / "exits" / f"{stem}.pt")
    onnx_rel: str | None = f"exits/{stem}.onnx"
    try:
        export_exit_onnx(head, bundle_dir / onnx_rel)
    except CodecError as exc:
        log.warning("exit at %s stays in torch: %s", split, exc)
        onnx_rel = None
    entry = ExitEntry(split=split, path=f"exits/{stem}.pt", threshold=calib.threshold,
                      metric=calib.metric, params={
                          **params, "config": head.cfg.to_dict(), "onnx": onnx_rel,
                          "target": calib.target, "calibration_exit_rate": calib.exit_rate,
                          "calibration_accuracy": calib.accuracy})
    with bundle_lock(bundle_dir):
        manifest = Manifest.load(bundle_dir).with_exit(entry)
        manifest.save(bundle_dir)
    return manifest


def update_costs(bundle_dir: str | Path, codecs: Iterable[CodecCost] = (),
                 exits: Iterable[ExitCost] = (), full_accuracy: float | None = None) -> CostTable | None:
    """Replace/add codec and exit costs (and the full model's accuracy, when measured) in
    the bundle's cost table (skipped if it has none)."""
    with bundle_lock(bundle_dir):
        return _update_costs(Path(bundle_dir), list(codecs), list(exits), full_accuracy)


def _update_costs(bundle_dir: Path, codecs: list[CodecCost], exits: list[ExitCost],
                  full_accuracy: float | None = None) -> CostTable | None:
    manifest = Manifest.load(bundle_dir)
    if not manifest.cost_table or not (Path(bundle_dir) / manifest.cost_table).is_file():
        log.warning("bundle %s has no cost table; codec and exit costs not recorded", bundle_dir)
        return None
    path = Path(bundle_dir) / manifest.cost_table
    table = CostTable.load(path)
    new_codecs = {(c.split, c.codec): c for c in codecs}
    new_exits = {e.split: e for e in exits}
    kept_codecs = tuple(c for c in table.codecs if (c.split, c.codec) not in new_codecs)
    kept_exits = tuple(e for e in table.exits if e.split not in new_exits)
    table = dataclasses.replace(table, codecs=kept_codecs + tuple(new_codecs.values()),
                                exits=kept_exits + tuple(new_exits.values()),
                                full_accuracy=table.full_accuracy if full_accuracy is None
                                else full_accuracy)
    table.save(path)
    return table
