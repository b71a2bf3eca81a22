"""The `tether` command: parses arguments and dispatches to ``tether.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tether import __version__
from tether.commands._args import HelpFormatter
from tether.core.errors import TetherError

#: One literal mapping: area -> module whose ``add_parsers`` registers its sub-commands.
COMMAND_MODULES: dict[str, str] = {
    "partition": "tether.commands.partition",
    "testbed": "tether.commands.testbed",
    "demo": "tether.commands.demo",
    "edge": "tether.commands.edge",
    "cloud": "tether.commands.cloud",
    "simulate": "tether.commands.simulate",
    "llm": "tether.commands.llm",
    "codec": "tether.commands.codec",
}


#: One literal mapping: sub-command path -> usage examples shown under its --help (sub-commands
#: that show their own examples keep them; tests/test_cli_help.py parses every example).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "profile": ("tether profile bundles/r20 --repeats 30 --rounds 5",),
    "cloud": ("tether cloud --bundle bundles/r20 --bind tcp://0.0.0.0:5555 --metrics-port 9100",
              "tether cloud --bind tcp://0.0.0.0:5555 --llm-checkpoint stories260K.bin "
              "--llm-max-sessions 32",
              "tether cloud --config configs/cloud.example.toml"),
    "edge": ("tether edge --bundle bundles/r20 --connect tcp://CLOUD_HOST:5555 "
             "--listen tcp://127.0.0.1:5560 --action split:layer2.2:fp16",
             "tether edge --connect tcp://CLOUD_HOST:5555 --llm-checkpoint stories260K.bin "
             "--llm-split 2 --llm-codec int8",
             "tether edge --config configs/edge.example.toml"),
    "infer": ("tether infer --edge tcp://127.0.0.1:5560 cat.png ship.jpg",),
    "keys generate": ("tether keys generate --out keys --name server",),
    "keys": ("tether keys generate --out keys --name edge-1",),
    "demo": ("tether demo --assets ../shared/assets --duration 60",),
    "simulate": ("tether simulate --bundle bundles/r20 --trace lte-like --policies "
                 "local,cloud,adaptive --out sim/",),
    "testbed": ("tether testbed probe",),
    "testbed link": ("tether testbed link --target 127.0.0.1:5555 --listen 127.0.0.1:6555 "
                     "--up lte-like",),
    "testbed calibrate": ("tether testbed calibrate --trace lte-like --duration 5",),
    "testbed probe": ("tether testbed probe",),
    "testbed run": ("tether testbed run scenarios/lte-resnet20.toml --assets ../shared/assets "
                    "--out runs/lte",),
    "testbed report": ("tether testbed report runs/lte",),
    "generate": ("tether generate --edge tcp://127.0.0.1:5560 \"Once upon a time\"",),
    "llm-exit": ("tether llm-exit --split 2 --out exits/stories-k2.pt",),
    "codec": ("tether codec train bundles/r20 --split layer3.1 --betas 0.001,0.003 --exit",),
    "codec train": ("tether codec train bundles/r20 --split layer3.1 --betas 0.001,0.003 "
                    "--exit --assets ../shared/assets",),
    "codec eval": ("tether codec eval bundles/r20 --assets ../shared/assets",),
}


#: Sub-commands merged into others (one daemon per side, issue 13): name -> what to run now.
RETIRED: dict[str, str] = {
    "llm-edge": "tether edge --connect CLOUD --llm-checkpoint PATH [--llm-split K ...] "
                "(with --bundle DIR it serves images too)",
    "llm-serve": "tether cloud --bind ENDPOINT --llm-checkpoint PATH [--llm-max-sessions N ...] "
                 "(with --bundle DIR it serves images too)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="Split computing and cloud-edge offloading runtime.",
        formatter_class=HelpFormatter,
        epilog="examples:\n  tether partition cifar_resnet20 --out bundles/r20\n"
               "  tether demo\n\n`tether COMMAND --help` shows each command's options, "
               "defaults and examples.")
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES.values():
        importlib.import_module(module_name).add_parsers(sub)
    _decorate(parser, "")
    return parser


def _decorate(parser: argparse.ArgumentParser, path: str) -> None:
    """Every (sub-)parser: the shared formatter (defaults shown) and its examples."""
    parser.formatter_class = HelpFormatter
    examples = EXAMPLES.get(path)
    if examples and "example" not in (parser.epilog or ""):
        block = "example" + ("s" if len(examples) > 1 else "") + ":\n" + \
            "\n".join(f"  {e}" for e in examples)
        parser.epilog = f"{parser.epilog}\n\n{block}" if parser.epilog else block
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _decorate(child, f"{path} {name}".strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in RETIRED:
        print(f"tether: error: `tether {command}` is now part of one daemon per side: run "
              f"`{RETIRED[command]}`", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except TetherError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
