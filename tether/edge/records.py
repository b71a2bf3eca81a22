"""Per-request record sinks: in-memory list, JSON Lines or CSV file (what the testbed reads).

Every sink has ``write(record)`` and ``close()``; files are line-buffered so a killed daemon
loses at most the line being written.
"""

from __future__ import annotations

import csv
import json
import threading
from dataclasses import fields
from pathlib import Path
from typing import Protocol

from tether.core.errors import ConfigError
from tether.core.types import RequestRecord

RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RequestRecord))


class RecordSink(Protocol):
    def write(self, record: RequestRecord) -> None: ...

    def close(self) -> None: ...


class ListSink:
    """Keeps records in memory (tests, the testbed's in-process runs)."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def write(self, record: RequestRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        return None


class JsonlSink:
    """One JSON object per line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = _open_append(self.path)
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        line = json.dumps(record.to_dict(), separators=(",", ":"))
        with self._lock:
            self._fh.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class CsvSink:
    """CSV with a header row of :class:`RequestRecord` field names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = _open_append(self.path)
        self._writer = csv.writer(self._fh)
        self._lock = threading.Lock()
        if new:
            self._writer.writerow(RECORD_FIELDS)

    def write(self, record: RequestRecord) -> None:
        row = ["" if value is None else value for value in record.to_dict().values()]
        with self._lock:
            self._writer.writerow(row)

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def open_sink(path: str | Path) -> JsonlSink | CsvSink:
    """A file sink chosen by suffix: ``.jsonl`` or ``.csv``."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return JsonlSink(path)
    if path.suffix == ".csv":
        return CsvSink(path)
    raise ConfigError(f"records file must end in .jsonl or .csv, got {path}")


def read_records(path: str | Path) -> list[RequestRecord]:
    """Read back a JSONL or CSV records file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path) as fh:
            return [RequestRecord(**json.loads(line)) for line in fh if line.strip()]
    with open(path, newline="") as fh:
        return [_from_csv_row(row) for row in csv.DictReader(fh)]


def _from_csv_row(row: dict[str, str]) -> RequestRecord:
    kinds = {f.name: f.type for f in fields(RequestRecord)}
    out: dict[str, object] = {}
    for name, text in row.items():
        kind = str(kinds[name])
        if name == "prediction":
            out[name] = int(text) if text else None
        elif kind in ("int", "<class 'int'>"):
            out[name] = int(text)
        elif kind in ("float", "<class 'float'>"):
            out[name] = float(text)
        else:
            out[name] = text
    return RequestRecord(**out)


def _open_append(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1, newline="")
    except OSError as exc:
        raise ConfigError(f"cannot open records file {path}: {exc}") from exc
