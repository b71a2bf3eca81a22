"""The `tether` command: parses arguments and dispatches to ``tether.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tether import __version__
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="Split computing and cloud-edge offloading runtime.")
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES.values():
        importlib.import_module(module_name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
