"""`tether --help` everywhere: every option has help and shows its default, every sub-command
shows an example that the parser accepts, list options take commas."""

from __future__ import annotations

import argparse
import shlex

import pytest

from tether.cli import EXAMPLES, build_parser


def _parsers(parser=None, path=""):
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            hidden = {a.dest for a in action._choices_actions if a.help == argparse.SUPPRESS}
            for name, child in action.choices.items():
                if name not in hidden:      # internal entry points (help=SUPPRESS)
                    yield from _parsers(child, f"{path} {name}".strip())


PARSERS = dict(_parsers())


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_every_option_has_help_and_a_visible_default(path):
    parser = PARSERS[path]
    text = parser.format_help()
    assert "%%" not in text and "%(" not in text, text
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        assert action.help, f"tether {path} {action.option_strings[-1]} has no help"
        informative = action.default not in (None, argparse.SUPPRESS) \
            and action.default is not False and not action.required
        if informative:
            shown = parser._get_formatter()._get_help_string(action)
            assert "default" in shown.lower(), f"tether {path} {action.option_strings[-1]}"


@pytest.mark.parametrize("path", sorted(p for p in PARSERS if p))
def test_every_subcommand_shows_an_example_the_parser_accepts(path):
    epilog = PARSERS[path].epilog or ""
    assert "example" in epilog, f"tether {path} --help shows no example"
    lines = [ln.strip() for ln in epilog.splitlines() if ln.strip().startswith("tether ")]
    assert lines, epilog
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])


def test_example_mapping_names_real_subcommands():
    assert set(EXAMPLES) <= set(PARSERS)


def test_comma_and_space_lists_both_work():
    parse = build_parser().parse_args
    base = ["codec", "train", "b", "--split", "layer3.1"]
    assert parse(base + ["--betas", "0.001,0.003"]).betas == [0.001, 0.003]
    assert parse(base + ["--betas", "0.001", "0.003"]).betas == [0.001, 0.003]
    assert parse(base + ["--betas"]).betas == []
    assert parse(["codec", "eval", "b", "--input-codecs", "png,jpeg90"]).input_codecs == \
        ["png", "jpeg90"]
    with pytest.raises(SystemExit):
        parse(base + ["--betas", "0.001,abc"])


def test_calibrate_help_prints_a_plain_percent(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["testbed", "calibrate", "--help"])
    out = capsys.readouterr().out
    assert "5%" in out and "%%" not in out
