"""The demo's bundle: a calibrated seeded ResNet-56 (64x64) with a trained codec ladder and an exit.

Built once into ``OUT/bundle`` (cached; ``demo.json`` records what was built) in about
three minutes on two cores, from data the demo makes itself (:mod:`tether.testbed.demo_model`):

1. the seeded ResNet-56 is fitted to the synthetic task (BatchNorm statistics, last layer);
2. ``tether partition`` exports ONNX heads at the ladder's split points and profiles them;
3. at each split a bottleneck codec per rate is distilled from the model's own features and
   logits on the training images, then stored with its ONNX encoder (``tether.codecs.store``);
4. an early exit is distilled and calibrated at :data:`EXIT_SPLIT`;
5. every codec (learned, tensor baselines, image codecs for full offload) is measured on
   held-out images: real wire bytes, encode/decode time and top-1 against the generator's
   labels, and written to the bundle's ``costs.json`` with the full model's accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tether.core.errors import PeerUnavailableError
from tether.testbed.demo_model import (
    DATA_NOTE, IMAGE_SIZE, MODEL, calibrate_model, synthetic_images, to_float,
)
from tether.testbed.procs import ProcessGroup, tether_command

#: Bumped whenever the recipe changes, so a cached bundle of an older recipe is rebuilt.
RECIPE = 3

@dataclass(frozen=True)
class Rung:
    """One learned codec of the ladder: its split point and latent size (sets the rate)."""

    split: str
    latent: int          # entropy-coded channels
    stride: int          # latent grid = split tensor / stride

    @property
    def codec_id(self) -> str:
        return f"bottleneck-l{self.latent}s{self.stride}"


#: The codec ladder: rates differ by latent size; the split points by head compute. One rung:
#: distilling through ResNet-56's deep tail takes most of the build, and a lower rate trained
#: as briefly misses the demo's accuracy budget.
LADDER = (Rung("layer1.0", 8, 4),)
SPLITS = tuple(dict.fromkeys(r.split for r in LADDER))
EXIT_SPLIT = "layer1.0"
EXIT_TARGET = 0.95
#: An exit that answers fewer images than this only adds its cost (and, as an exit+split
#: action, hides an offload in flight from the policy): left out.
MIN_EXIT_RATE = 0.1
INPUT_CODECS = ("png", "jpeg90", "webp75")
TENSOR_CODECS = ("fp32", "int8+zlib")
TRAIN_SEED, EVAL_SEED = 1, 2


@dataclass(frozen=True)
class Recipe:
    """How the demo trains its codecs (small on purpose: it runs on the user's machine)."""

    train_images: int = 512
    eval_images: int = 100
    epochs: int = 5
    batch_size: int = 16
    hidden: int = 24
    beta: float = 0.0003         # loss weight per estimated byte
    kd_weight: float = 1.0       # distillation through the frozen tail (0: features only)
    exit_epochs: int = 8
    exit_conv: int = 32          # exit head: conv channels before pooling


def ensure_demo_bundle(out: Path, progress: Callable[[str], None] | None = None,
                       recipe: Recipe = Recipe()) -> Path:
    """``OUT/bundle`` built as above, or the cached one when its recipe matches."""
    bundle = out / "bundle"
    marker = bundle / "demo.json"
    if marker.is_file():
        try:
            built = json.loads(marker.read_text())
            if built.get("recipe") == RECIPE and built.get("image_size") == IMAGE_SIZE and \
                    built.get("recipe_settings") == dataclasses.asdict(recipe):
                return bundle
        except ValueError:
            pass
    say = progress or (lambda _text: None)
    t0 = time.monotonic()
    train_x, train_y = synthetic_images(recipe.train_images, TRAIN_SEED)
    weights = out / "demo-model.pt"
    say(f"fitting the seeded {MODEL} to {recipe.train_images} synthetic images")
    train_acc = _fit_model(train_x, train_y, weights)
    say("exporting and profiling heads at " + ", ".join(SPLITS))
    _partition(weights, bundle, out / "logs")
    say("training the codec ladder and the exit on the model's own features")
    built = train_ladder(bundle, train_x, train_y, recipe, say)
    built |= {"recipe": RECIPE, "data": DATA_NOTE, "train_accuracy": train_acc,
              "recipe_settings": dataclasses.asdict(recipe), "image_size": IMAGE_SIZE,
              "build_seconds": round(time.monotonic() - t0, 1)}
    marker.write_text(json.dumps(built, indent=2))
    say(f"bundle ready in {built['build_seconds']:.0f} s")
    return bundle


def _fit_model(images: torch.Tensor, labels: torch.Tensor, weights: Path) -> float:
    from tether.partitioner.models import build_model
    net = build_model(MODEL)
    acc = calibrate_model(net, images, labels)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), weights)
    return acc


def _partition(weights: Path, bundle: Path, logs: Path) -> None:
    cmd = tether_command("partition", MODEL, "--weights", str(weights), "--out", str(bundle),
                         "--force", "--splits", ",".join(SPLITS), "--repeats", "5",
                         "--input-shape", f"1,3,{IMAGE_SIZE},{IMAGE_SIZE}",
                         "--warmup", "2", "--profile", "exported", "--no-progress")
    with ProcessGroup(logs) as group:
        if group.start("partition", cmd).wait() != 0:
            raise PeerUnavailableError(f"`tether partition` failed:\n{group.log_tail('partition')}")


def train_ladder(bundle: Path, train_x: torch.Tensor, train_y: torch.Tensor,
                 recipe: Recipe = Recipe(),
                 say: Callable[[str], None] = lambda _t: None) -> dict[str, Any]:
    """Train, store and measure every codec and the exit; write the bundle's costs."""
    from tether.codecs import make_codec
    from tether.codecs.evaluate import measure_codec, predict
    from tether.codecs.store import update_costs
    from tether.codecs.training import teacher_outputs
    from tether.partitioner import BundleModel
    bm = BundleModel.load(bundle)
    eval_x, eval_y = synthetic_images(recipe.eval_images, EVAL_SEED)
    xe, xt = to_float(eval_x), to_float(train_x)
    full = bm.full_model()
    full_acc = float((predict(full, xe) == eval_y).double().mean())
    results = [measure_codec(make_codec(c), "input", xe, full, eval_y) for c in INPUT_CODECS]
    exits, ladder = [], []
    for split in SPLITS:
        head, tail = bm.head(split), bm.tail(split)
        teacher = teacher_outputs(head, tail, xt)
        with torch.no_grad():
            feats = head(xe)
        results += [measure_codec(make_codec(c), split, feats, tail, eval_y) for c in TENSOR_CODECS]
        for rung in (r for r in LADDER if r.split == split):
            result = _train_codec(bundle, rung, teacher, tail, feats, eval_y, recipe)
            say(f"  {split} {result.codec}: {result.payload_bytes:.0f} B, "
                f"top-1 {100 * result.accuracy:.1f} % (full model {100 * full_acc:.1f} %)")
            results.append(result)
            ladder.append({"split": split, "codec": result.codec, "bytes": result.payload_bytes,
                           "accuracy": result.accuracy})
        if split == EXIT_SPLIT:
            found = _train_exit(bundle, split, teacher, train_y, feats, eval_y, tail, recipe)
            exits += [found] if found is not None else []
            say(f"  exit at {split}: " + (f"answers {100 * found.exit_rate:.0f} % of images, "
                                         f"top-1 {100 * (found.accuracy or 0):.1f} % on them"
                                         if found else "rarely confident enough, left out"))
    update_costs(bundle, codecs=[r.to_cost() for r in results], exits=exits,
                 full_accuracy=full_acc)
    return {"full_accuracy": full_acc, "ladder": ladder,
            "exits": [{"split": e.split, "exit_rate": e.exit_rate, "accuracy": e.accuracy}
                      for e in exits]}


def _train_codec(bundle: Path, rung: Rung, teacher: Any, tail: Any, feats: torch.Tensor,
                 labels: torch.Tensor, recipe: Recipe) -> Any:
    from tether.codecs.bottleneck import BottleneckCodec, BottleneckConfig
    from tether.codecs.evaluate import measure_codec
    from tether.codecs.store import save_bottleneck
    from tether.codecs.training import TrainConfig, describe, train_bottleneck
    codec_id, beta = rung.codec_id, recipe.beta
    cfg = BottleneckConfig(tuple(teacher.features.shape[1:]), rung.latent, recipe.hidden,
                           rung.stride)
    train = TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size,
                        kd_weight=recipe.kd_weight, seed=0)
    model, history = train_bottleneck(teacher, tail, cfg, beta, train, progress=False)
    result = measure_codec(BottleneckCodec(codec_id, model), rung.split, feats, tail, labels)
    save_bottleneck(bundle, rung.split, codec_id, model, {
        "beta": beta, "rate_bytes": result.payload_bytes, "accuracy": result.accuracy,
        "train": describe(train), "train_indices": f"demo synthetic images seed {TRAIN_SEED}",
        "final": history[-1]})
    return result


def _train_exit(bundle: Path, split: str, teacher: Any, labels: torch.Tensor,
                feats: torch.Tensor, eval_y: torch.Tensor, tail: Any, recipe: Recipe) -> Any:
    from tether.codecs.evaluate import exit_cost, exit_curve, predict
    from tether.codecs.exits import ExitConfig, calibrate, load_exit, train_exit
    from tether.codecs.store import save_exit
    from tether.codecs.training import Teacher, TrainConfig, describe
    n_cal = len(labels) // 4
    fit = slice(0, len(labels) - n_cal)
    cfg = ExitConfig(tuple(teacher.features.shape[1:]), teacher.logits.shape[1], recipe.exit_conv)
    train = TrainConfig(epochs=recipe.exit_epochs, seed=0, lr=3e-3, temperature=2.0)
    head, history = train_exit(Teacher(teacher.features[fit], teacher.logits[fit]), cfg, train,
                               progress=False)
    with torch.no_grad():
        cal_logits = head(teacher.features[-n_cal:].float())
    calib = calibrate(cal_logits, labels[-n_cal:], EXIT_TARGET)
    if calib.exit_rate < MIN_EXIT_RATE:
        return None                   # rarely confident enough: no exit rather than a dead one
    save_exit(bundle, split, head, calib, {
        "train": describe(train), "history": history, "reference": "labels",
        "calibration_indices": f"demo synthetic images seed {TRAIN_SEED}, last {n_cal}"})
    exit_ = load_exit(bundle, split=split)
    t0 = time.perf_counter()
    logits = torch.from_numpy(exit_.logits(feats))
    seconds = (time.perf_counter() - t0) / max(len(feats), 1)
    point = exit_curve(split, logits, predict(tail, feats), eval_y, calib.metric,
                       [calib.threshold])[0]
    if point.exit_accuracy is None:   # took none of the evaluation images
        point = dataclasses.replace(point, exit_accuracy=calib.accuracy)
    return exit_cost(point, seconds)
