"""Shared argparse pieces: comma-or-space separated lists, flags -> config overrides, the help
formatter."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def comma_list(convert: Callable[[str], Any] = str) -> type[argparse.Action]:
    """An action for ``nargs="*"`` options accepting ``a,b,c``, ``a b c`` or a mix."""

    class CommaList(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: Any, option_string: str | None = None) -> None:
            items = []
            for value in values or []:
                for part in str(value).split(","):
                    if part.strip():
                        try:
                            items.append(convert(part.strip()))
                        except ValueError:
                            parser.error(f"{option_string}: bad value {part!r}")
            setattr(namespace, self.dest, items)

    return CommaList


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions/epilogs (examples) and shows every option's
    default unless its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or "%(default)" in text or not action.option_strings:
            return text
        if action.default is None or action.default is False or action.required \
                or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(str(v) for v in default) or "none"
        return f"{text} (default: {str(default).replace('%', '%%')})".lstrip()


def flag_overrides(args: argparse.Namespace, flags: dict[str, str],
                   units: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """The config overrides that ``flags`` (argparse dest -> dotted config field) make; a flag
    not given is None (the file's value stays). ``units`` converts flags given in other units
    than their field (``--max-queue-delay-ms`` -> seconds)."""
    overrides = {}
    for dest, field in flags.items():
        value = getattr(args, dest)
        if value is not None and units and dest in units:
            value = units[dest](value)
        overrides[field] = value
    return overrides
