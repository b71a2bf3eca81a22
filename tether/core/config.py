"""TOML config into frozen dataclasses, validated at start.

Components declare their config as frozen dataclasses (fields with defaults, validation
in ``__post_init__`` raising :class:`ConfigError`). :func:`from_mapping` builds one from
a parsed TOML table, rejecting unknown keys and wrong types with the dotted key path in
the message; :func:`load_config` does the same from a file, and :func:`load_daemon_config`
loads a daemon's file with nested tables (``[link]``, ``[llm]``, ...). Environment variables
and CLI flags are read only at entry points, which pass them as overrides.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from tether.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load_config(cls: type[T], path: str | Path, table: str | None = None) -> T:
    """Load ``cls`` from a TOML file (optionally from one top-level table of it)."""
    data = load_toml(path)
    if table is not None:
        data = data.get(table, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
    return from_mapping(cls, data, where=table or "")


def load_daemon_config(cls: type[T], path: str | Path | None, section: str,
                       overrides: dict[str, Any] | None = None,
                       moved: dict[str, str] | None = None,
                       aliases: dict[str, str] | None = None) -> T:
    """A daemon's config (``cls``) from its TOML file, then the entry point's overrides.

    The daemon's own keys sit at the top level of the file or in ``[section]``; each nested
    table of ``cls`` (a dataclass or dict field such as ``llm``) sits beside ``[section]``
    (``[llm]``) or inside it (``[section.llm]``), never both. Anything else in the file is
    refused. ``overrides`` are dotted field paths (``{"llm.checkpoint": path}``; ``None``
    values are skipped: the flag was not given). ``moved`` maps keys of an older flat layout
    to their dotted place now, so an old file is refused with the fix; ``aliases`` are
    accepted second spellings of a key (in any table; giving both is refused). Errors are one
    line naming the file and the dotted key.
    """
    raw = load_toml(path) if path is not None else {}
    tables = nested_tables(cls)
    try:
        data, where, places = _gather(raw, section, tables)
        _refuse_moved(data, where, moved or {})
        for name in (None, *tables):
            table = data if name is None else data.get(name)
            if isinstance(table, dict) and aliases:
                _unalias(table, aliases, where if name is None else places[name])
        for key, value in (overrides or {}).items():
            if value is not None:
                _set_dotted(data, key, value)
        for name, tp in tables.items():
            if name in data and dataclasses.is_dataclass(tp):
                data[name] = from_mapping(tp, data[name], places[name])
        return from_mapping(cls, data, where)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from exc


def refuse_settings_without(config: Any, key: str, table: str, flag: str) -> None:
    """A table whose ``key`` (say the model) is unset must not set anything else: its other
    settings would be silently ignored (a misspelt or forgotten ``checkpoint``)."""
    for f in dataclasses.fields(config):
        if f.name != key and f.default is not dataclasses.MISSING \
                and getattr(config, f.name) != f.default:
            raise ConfigError(f"{table}.{f.name} is set but {table}.{key} is missing: "
                              f"set {table}.{key} (or {flag}) or drop [{table}]")


def nested_tables(cls: type) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that are TOML tables (nested dataclasses, dicts)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name]) or typing.get_origin(hints[f.name]) is dict}


def _gather(raw: dict[str, Any], section: str,
            tables: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, str]]:
    """The daemon's table with its nested tables merged in, its dotted prefix, and where
    each nested table was written (for error messages)."""
    if section not in raw:
        return dict(raw), "", {name: name for name in tables}
    table = raw[section]
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    unknown = sorted(set(raw) - {section, *tables})
    if unknown:
        allowed = ", ".join(f"[{s}]" for s in (section, *tables))
        raise ConfigError(f"unknown config section or key {unknown[0]!r} beside "
                          f"[{section}]; this file may hold {allowed} only")
    data, places = dict(table), {}
    for name in tables:
        places[name] = f"{section}.{name}"
        if name in raw:
            if name in data:
                raise ConfigError(f"[{name}] and [{section}.{name}] both set; keep one")
            data[name], places[name] = raw[name], name
    return data, section, places


def _refuse_moved(data: dict[str, Any], where: str, moved: dict[str, str]) -> None:
    for key in data:
        if key in moved:
            table, _, name = moved[key].rpartition(".")
            raise ConfigError(f"{_join(where, key)!r} moved: write {name} = ... under "
                              f"[{table}] (or pass its flag)")


def _unalias(table: dict[str, Any], aliases: dict[str, str], where: str) -> None:
    for alias, name in aliases.items():
        if alias in table:
            if name in table:
                raise ConfigError(f"{_join(where, alias)} and {name} set the same value: "
                                  f"keep only {alias}")
            table[name] = table.pop(alias)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    head, dot, rest = key.partition(".")
    if not dot:
        data[head] = value
        return
    table = data.setdefault(head, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{head}: expected a table, got {table!r}")
    data[head] = table = dict(table)
    _set_dotted(table, rest, value)


def from_mapping(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; errors name the offending dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r}; "
                          f"valid keys: {sorted(known)}")
    missing = [name for name, f in known.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {_join(where, missing[0])!r}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def with_overrides(config: T, **overrides: Any) -> T:
    """Return ``config`` with the non-None overrides applied (CLI flags win over TOML)."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        return config
    data = {k: v for k, v in changes.items()}
    hints = typing.get_type_hints(type(config))
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r}")
        data[key] = _coerce(hints[key], value, key)
    return dataclasses.replace(config, **data)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_mapping(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {value!r} is not one of {[m.value for m in tp]}") from exc
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
