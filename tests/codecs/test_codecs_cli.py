"""`tether codec train|eval` argument handling (the heavy paths run in bench/)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tether.core.errors import ConfigError
from tether.commands import codec as codec_cmd
from tether.commands import codec_jobs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether")
    codec_cmd.add_parsers(parser.add_subparsers(dest="command"))
    return parser


def test_train_and_eval_arguments_parse() -> None:
    args = _parser().parse_args(["codec", "train", "B", "--split", "layer3.1", "--betas",
                                 "0.001", "0.0003", "--epochs", "2", "--exit", "--tag", "s1"])
    assert args.handler is codec_cmd._run_train and args.betas == [0.001, 0.0003]
    assert args.exit and args.tag == "s1" and args.bundle == Path("B")
    args = _parser().parse_args(["codec", "train", "B", "--split", "x", "--betas", "--exit"])
    assert args.betas == []
    args = _parser().parse_args(["codec", "eval", "B", "--splits", "a", "b", "--data", "D"])
    assert args.handler is codec_cmd._run_eval and args.assets == Path("D")
    with pytest.raises(SystemExit):
        _parser().parse_args(["codec", "train", "B"])          # --split is required


def test_missing_assets_names_the_fix(monkeypatch) -> None:
    monkeypatch.delenv("TETHER_ASSETS", raising=False)
    args = _parser().parse_args(["codec", "eval", "B"])
    with pytest.raises(ConfigError, match="--assets"):
        codec_jobs._assets(args)
    monkeypatch.setenv("TETHER_ASSETS", "/somewhere")
    assert codec_jobs._assets(args) == Path("/somewhere")


def test_parser_does_not_import_torch_or_compressai() -> None:
    """`tether --help` must stay fast: heavy imports happen only inside the handlers."""
    import subprocess
    import sys
    code = ("import sys, tether.cli; tether.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'compressai', 'zmq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_student_family_arguments_parse() -> None:
    args = _parser().parse_args(["codec", "train", "B", "--split", "layer3.2", "--family",
                                 "student", "--stem-extra", "3", "2", "--freeze-stem",
                                 "--minutes", "5", "--betas", "0.001", "0.01"])
    assert args.family == "student" and args.stem_extra == [3, 2] and args.freeze_stem
    assert args.minutes == 5.0 and args.latent is None and args.stage1_epochs == 10
    assert _parser().parse_args(["codec", "train", "B", "--split", "x"]).family == "bottleneck"
    with pytest.raises(SystemExit):
        _parser().parse_args(["codec", "train", "B", "--split", "x", "--family", "nope"])
