"""Early exits: calibration maths, distillation, bundle storage, ONNX parity, costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tether.core.bundle import Manifest
from tether.core.errors import BundleError, CodecError
from tether.core.types import CostTable, ExitCost
from tether.codecs import load_exit
from tether.codecs.evaluate import exit_curve
from tether.codecs.exits import (
    ExitConfig, ExitHead, calibrate, confidence, takes, train_exit,
)
from tether.codecs.store import save_exit, update_costs
from tether.codecs.training import Teacher, TrainConfig

from codec_helpers import make_bundle, tiny_features


def _logits(conf_correct: list[tuple[float, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits with a given max-softmax and whether the argmax is right."""
    rows, labels = [], []
    for p, right in conf_correct:
        margin = math.log(p / (1 - p))
        rows.append([margin, 0.0])
        labels.append(0 if right else 1)
    return torch.tensor(rows), torch.tensor(labels)


def test_calibration_picks_the_loosest_threshold_meeting_the_target() -> None:
    # confidences 0.99..0.55; the 4th most confident is wrong
    spec = [(0.99, True), (0.95, True), (0.9, True), (0.85, False), (0.8, True),
            (0.7, True), (0.6, False), (0.55, False)]
    logits, labels = _logits(spec)
    cal = calibrate(logits, labels, target=0.8)
    # top-5 accuracy 4/5 = 0.8 meets it; top-6 5/6 = 0.833 also; top-7 5/7 < 0.8
    assert cal.exit_rate == pytest.approx(6 / 8)
    assert cal.threshold == pytest.approx(0.7, abs=1e-5)
    assert cal.accuracy == pytest.approx(5 / 6)
    strict = calibrate(logits, labels, target=1.0)
    assert strict.exit_rate == pytest.approx(3 / 8) and strict.accuracy == 1.0


def test_calibration_with_entropy_and_unreachable_target() -> None:
    logits, labels = _logits([(0.9, False), (0.8, True), (0.6, True)])
    cal = calibrate(logits, labels, target=1.0, metric="entropy")
    assert cal.exit_rate == 0.0 and cal.accuracy is None and cal.threshold == -math.inf
    assert not takes(confidence(logits, "entropy"), "entropy", cal.threshold).any()
    ok = calibrate(logits, labels, target=0.5, metric="entropy")
    assert ok.exit_rate == 1.0
    with pytest.raises(CodecError):
        calibrate(logits, labels, target=1.5)
    with pytest.raises(CodecError, match="metric"):
        confidence(logits, "margin")


def test_exit_curve_accounts_for_local_and_cloud_answers() -> None:
    logits, labels = _logits([(0.99, True), (0.9, False), (0.6, True), (0.55, True)])
    full = torch.tensor([0, 1, 0, 1])            # full model: right, right, right, wrong
    points = exit_curve("s", logits, full, labels, "max_softmax", [0.95, 0.5, 1.01])
    assert points[0].exit_rate == 0.25 and points[0].overall_accuracy == 0.75
    assert points[1].exit_rate == 1.0 and points[1].overall_accuracy == 0.75
    assert points[1].exit_accuracy == 0.75
    assert points[2].exit_rate == 0.0 and points[2].exit_accuracy is None


@pytest.fixture()
def trained_exit():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    feats, tail, logits = tiny_features(n=256)
    cfg = ExitConfig((8, 8, 8), 10, conv_channels=8)
    head, hist = train_exit(Teacher(feats.half(), logits), cfg,
                            TrainConfig(epochs=6, batch_size=32, lr=1e-2, temperature=2.0),
                            progress=False)
    torch.set_num_threads(before)
    return head, hist, feats, logits


def test_distillation_learns_the_teacher(trained_exit) -> None:
    head, hist, feats, logits = trained_exit
    assert hist[-1]["kd"] < 0.5 * hist[0]["kd"]
    with torch.no_grad():
        agree = (head(feats).argmax(1) == logits.argmax(1)).double().mean()
    assert agree > 0.6                                       # chance is 0.1


def test_exit_saved_in_bundle_runs_in_onnx_and_updates_costs(tmp_path, trained_exit) -> None:
    head, _, feats, logits = trained_exit
    bundle = make_bundle(tmp_path)
    with torch.no_grad():
        cal = calibrate(head(feats), logits.argmax(1), target=0.9)
    manifest = save_exit(bundle, "block1", head, cal, {"reference": "teacher"})
    entry = Manifest.load(bundle).exits[0]
    assert entry == manifest.exits[0] and entry.threshold == cal.threshold
    assert entry.params["onnx"] and (bundle / entry.params["onnx"]).is_file()
    ex = load_exit(bundle, split="block1")
    assert ex._session is not None
    decision = ex(feats[:16])
    with torch.no_grad():
        ref = head(feats[:16]).numpy()
    np.testing.assert_allclose(decision.logits, ref, rtol=1e-4, atol=1e-4)
    assert decision.take.dtype == bool and decision.prediction.shape == (16,)
    assert (decision.take == (decision.confidence >= cal.threshold)).all()
    table = update_costs(bundle, exits=[ExitCost("block1", 1e-4, cal.exit_rate, 0.9,
                                                 cal.threshold)])
    assert table is not None
    assert CostTable.load(bundle / "costs.json").exits[0].exit_rate == cal.exit_rate
    # `tether codec eval` records the full model's accuracy too (no silent "no floor")
    update_costs(bundle, full_accuracy=0.9164)
    kept = CostTable.load(bundle / "costs.json")
    assert kept.full_accuracy == 0.9164 and kept.exits[0].exit_rate == cal.exit_rate
    with pytest.raises(BundleError, match="exits at"):
        load_exit(bundle, split="nowhere")


def test_exit_head_shapes() -> None:
    plain = ExitHead(ExitConfig((16, 4, 4), 7))
    assert plain(torch.rand(2, 16, 4, 4)).shape == (2, 7)
    assert ExitConfig.from_dict(ExitConfig((16, 4, 4), 7, 3).to_dict()) == ExitConfig((16, 4, 4), 7, 3)
    with pytest.raises(BundleError):
        ExitConfig.from_dict({"feature_shape": [1]})
