"""`tether codec train` and `tether codec eval`: learned codecs and early exits for a bundle.

``train`` distils bottleneck codecs (one per beta) and optionally an early exit at one split
point on the CIFAR-10 JPEG images 1017..9999, and stores them in the bundle. ``eval`` measures
top-1 (lossless images 0..1016) against wire bytes per sample for every codec at the chosen
split points and for JPEG/WebP/PNG of the input, writes a CSV, a plot and the codec/exit
costs into the bundle's costs.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tether.commands._args import comma_list
#: Input codecs `codec eval` measures by default (full offload of the image).
INPUT_CODECS = ("png", "jpeg50", "jpeg75", "jpeg90", "jpeg95", "webp50", "webp75", "webp90")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``codec train`` and ``codec eval``."""
    p = subparsers.add_parser("codec", help="train and evaluate learned codecs and early exits")
    sub = p.add_subparsers(dest="codec_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="distil bottleneck codecs (and an exit) at a split point",
                       description="Train on CIFAR-10 JPEG images 1017..9999 by distillation.")
    t.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    t.add_argument("--split", required=True, metavar="NAME", help="split point name")
    t.add_argument("--betas", nargs="*", default=[0.001], metavar="B[,B...]",
                   action=comma_list(float),
                   help="rate weights (loss per estimated byte), comma or space separated; one "
                        "codec each; none = no codec")
    t.add_argument("--family", choices=("bottleneck", "student"), default="bottleneck",
                   help="bottleneck: codec on the head's features; student: an encoder from "
                   "the image that replaces the head (CIFAR ResNets), decoder feeds --split")
    t.add_argument("--epochs", type=int, default=8, metavar="N",
                   help="epochs (student: stage-2 epochs per beta)")
    t.add_argument("--minutes", type=float, help="time budget per stage: stop at an epoch "
                   "boundary after it (re-run the same command to resume)")
    t.add_argument("--latent", type=int, help="latent channels (default 12; student 32)")
    t.add_argument("--hidden", type=int, default=64, help="encoder/decoder width (default 64)")
    t.add_argument("--stride", type=int, default=2, choices=(1, 2, 4),
                   help="spatial downsampling of the codec's latent")
    t.add_argument("--tag", default="", help="suffix of the codec id (bottleneck-b<beta>-<tag>) "
                   "to keep several architectures per split")
    s = t.add_argument_group("student family")
    s.add_argument("--stage1-epochs", type=int, default=10, help="shared stage-1 epochs")
    s.add_argument("--stage1-beta", type=float, default=0.0, help="rate weight in stage 1")
    s.add_argument("--stage1-kd", type=float, default=0.0, help="KD weight in stage 1")
    s.add_argument("--stem-blocks", type=int, default=3, help="teacher layer1 blocks in the encoder")
    s.add_argument("--decoder-blocks", type=int, default=2,
                   help="split-width blocks closing the decoder (from the teacher)")
    s.add_argument("--stem-extra", type=int, nargs="*", default=[], metavar="N",
                   help="blocks of the teacher's layer2 (and layer3) the encoder also keeps, "
                   "e.g. 1 (layer2.0) or 3 1 (layer2, layer3.0)")
    s.add_argument("--freeze-stem", action="store_true",
                   help="keep the teacher's stem blocks frozen (train compressor and decoder)")
    s.add_argument("--latent-stride", type=int, default=4, choices=(2, 4, 8),
                   help="latent grid = input / stride")
    s.add_argument("--feature-weight", type=float, default=0.1, help="stage-2 feature MSE weight")
    s.add_argument("--temperature", type=float, default=1.0, help="stage-2 KD temperature")
    s.add_argument("--batch-size", type=int, default=64, help="training batch size")
    s.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    s.add_argument("--stage2-lr-scale", type=float, default=0.5,
                   help="stage-2 learning rate as a fraction of --lr")
    s.add_argument("--no-resume", action="store_true", help="start every stage afresh")
    t.add_argument("--exit", action="store_true", help="also train and calibrate an early exit")
    t.add_argument("--exit-target", type=float, default=0.95,
                   help="accuracy the exit's local answers must reach on the calibration slice")
    t.add_argument("--exit-metric", default="max_softmax", choices=("max_softmax", "entropy"),
                   help="confidence measure the exit threshold applies to")
    t.add_argument("--exit-conv", type=int, default=64, help="exit conv channels, 0 = none")
    t.add_argument("--exit-epochs", type=int, default=10, metavar="N",
                   help="exit head training epochs")
    _common(t)
    t.set_defaults(handler=_run_train)
    e = sub.add_parser("eval", help="rate-accuracy table and plot of every codec in a bundle")
    e.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    e.add_argument("--splits", nargs="*", metavar="NAME", action=comma_list(),
                   help="split points (default: exported heads plus those with codecs/exits)")
    e.add_argument("--input-codecs", nargs="*", default=list(INPUT_CODECS), metavar="ID",
                   action=comma_list(), help="image codecs measured for full offload")
    e.add_argument("--out", type=Path, help="output folder (default BUNDLE/eval)")
    _common(e)
    e.set_defaults(handler=_run_eval)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", "--data", type=Path, metavar="DIR",
                   help="shared assets folder (default: $TETHER_ASSETS)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="use only the first N images (quick runs) (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_train(args: argparse.Namespace) -> int:
    from tether.commands.codec_jobs import run_train
    return run_train(args)


def _run_eval(args: argparse.Namespace) -> int:
    from tether.commands.codec_jobs import run_eval
    return run_eval(args)
