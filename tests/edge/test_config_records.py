"""EdgeConfig loading/validation and the record sinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.core.errors import ConfigError
from tether.core.types import RequestRecord
from tether.edge.config import EdgeConfig, load_edge_config
from tether.edge.records import CsvSink, JsonlSink, ListSink, open_sink, read_records

REPO = Path(__file__).resolve().parents[2]


def test_toml_edge_table_and_flag_overrides(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('[edge]\nbundle = "b"\nconnect = "tcp://10.0.0.2:5555"\n'
                    'deadline_seconds = 0.25\naction = "split:layer2:int8"\n'
                    '[policy]\nname = "adaptive"\n')
    config = load_edge_config(path, deadline_seconds=0.5, connect=None)
    assert config.bundle == Path("b")
    assert config.connect == "tcp://10.0.0.2:5555"        # None override keeps the TOML value
    assert config.deadline_seconds == 0.5                 # flags win
    assert config.action == "split:layer2:int8"
    assert config.policy == {"name": "adaptive"}


def test_example_config_in_repository_is_valid():
    config = load_edge_config(REPO / "configs" / "edge.example.toml")
    assert config.connect.startswith("tcp://") and config.bundle is not None


@pytest.mark.parametrize("text, key", [
    ("deadline_seconds = -1", "deadline_seconds"),
    ("connect = \"10.0.0.2:5555\"", "connect"),
    ("action = \"teleport:x\"", "action"),
    ("fallback = \"cloud\"", "fallback"),
    ("records = \"out.txt\"", "records"),
    ("bogus_key = 1", "bogus_key"),
    ("queue_size = \"many\"", "queue_size"),
    ("curve_server_key = \"abc\"", "curve"),
    ("llm_checkpoint = \"s.bin\"\nllm_codec = \"zip\"", "llm_codec"),
    ("llm_checkpoint = \"s.bin\"\nllm_split = 0", "llm_split"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "edge.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key):
        load_edge_config(path)


def test_llm_over_curve_is_a_valid_config(tmp_path):
    """The LLM's session steps ride the one (CURVE) link: no refusal any more."""
    path = tmp_path / "edge.toml"
    path.write_text('connect = "tcp://10.0.0.2:5555"\nllm_checkpoint = "s.bin"\n'
                    'curve_server_key = "k"\ncurve_client_cert = "c"\n')
    config = load_edge_config(path)
    assert config.llm_checkpoint is not None and config.curve_client_cert is not None


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_edge_config(tmp_path / "nope.toml")


def _record(i: int, prediction: int | None = 3) -> RequestRecord:
    return RequestRecord(request_id=i, edge_id="e1", start_time=1.5, action="split:layer1:fp32",
                         outcome="fallback", fallback_reason="timeout", head_seconds=0.001,
                         total_seconds=0.01, bytes_sent=4096, prediction=prediction)


@pytest.mark.parametrize("suffix, cls", [(".jsonl", JsonlSink), (".csv", CsvSink)])
def test_file_sinks_round_trip(tmp_path, suffix, cls):
    path = tmp_path / f"records{suffix}"
    sink = open_sink(path)
    assert isinstance(sink, cls)
    records = [_record(1), _record(2, None)]
    for r in records:
        sink.write(r)
    sink.close()
    again = open_sink(path)              # appending keeps one header
    again.write(_record(3))
    again.close()
    assert read_records(path) == records + [_record(3)]


def test_list_sink_and_bad_suffix(tmp_path):
    sink = ListSink()
    sink.write(_record(1))
    assert sink.records == [_record(1)]
    with pytest.raises(ConfigError, match=".jsonl or .csv"):
        open_sink(tmp_path / "x.txt")
    assert EdgeConfig().listen.startswith("tcp://127.0.0.1")
