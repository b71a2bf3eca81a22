"""EdgeConfig loading/validation and the record sinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.core.errors import ConfigError
from tether.core.types import RequestRecord
from tether.edge.config import EdgeConfig, EdgeLinkConfig, HttpConfig, load_edge_config
from tether.edge.records import CsvSink, JsonlSink, ListSink, open_sink, read_records

REPO = Path(__file__).resolve().parents[2]


def test_toml_edge_table_and_flag_overrides(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('[edge]\nbundle = "b"\ndeadline_seconds = 0.25\naction = "split:layer2:int8"\n'
                    '[link]\nconnect = "tcp://10.0.0.2:5555"\n'
                    '[policy]\nname = "adaptive"\n')
    config = load_edge_config(path, {"deadline_seconds": 0.5, "link.connect": None,
                                     "link.handshake_timeout_seconds": 0.25})
    assert config.bundle == Path("b")
    assert config.link.connect == "tcp://10.0.0.2:5555"   # None override keeps the TOML value
    assert config.link.handshake_timeout_seconds == 0.25  # flags reach nested tables
    assert config.deadline_seconds == 0.5                 # flags win
    assert config.action == "split:layer2:int8"
    assert config.policy == {"name": "adaptive"}


NESTED = """
bundle = "b"
[link]
connect = "tcp://10.0.0.2:5555"
reconnect_max_seconds = 4.0
[curve]
server_key = "keys/server.key"
client_cert = "keys/edge.key_secret"
[llm]
checkpoint = "stories260K.bin"
split = 3
codec = "int8"
exit_threshold = 0.8
max_new_tokens = 64
[http]
port = 0
max_body_bytes = 1024
"""


@pytest.mark.parametrize("layout", ["top", "beside", "inside"])
def test_every_table_loads_at_the_top_level_beside_or_inside_edge(tmp_path, layout):
    text = NESTED
    if layout == "beside":
        text = "[edge]\n" + NESTED.lstrip()
    elif layout == "inside":
        text = "[edge]\n" + NESTED.lstrip().replace("\n[", "\n[edge.")
    path = tmp_path / "edge.toml"
    path.write_text(text)
    config = load_edge_config(path)
    assert config.link == EdgeLinkConfig("tcp://10.0.0.2:5555", reconnect_max_seconds=4.0)
    assert config.curve.enabled and config.curve.client_cert == Path("keys/edge.key_secret")
    assert (config.llm.checkpoint, config.llm.split, config.llm.codec, config.llm.exit_threshold,
            config.llm.max_new_tokens) == (Path("stories260K.bin"), 3, "int8", 0.8, 64)
    assert config.llm.model_id == "stories260K" and config.http == HttpConfig(0, "127.0.0.1", 1024)


def test_example_config_in_repository_is_valid():
    config = load_edge_config(REPO / "configs" / "edge.example.toml")
    assert config.link.connect.startswith("tcp://") and config.bundle is not None


def test_an_llm_only_edge_needs_no_bundle_but_some_model(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('[llm]\ncheckpoint = "s.bin"\n')
    load_edge_config(path).require_model()
    with pytest.raises(ConfigError, match="nothing to serve"):
        EdgeConfig().require_model()


@pytest.mark.parametrize("text, key", [
    ("deadline_seconds = -1", "deadline_seconds"),
    ("compute_nice = 20", "compute_nice"),
    ("[link]\nconnect = \"10.0.0.2:5555\"", "link.connect"),
    ("[link]\nheartbeat_timeout_seconds = 0", "link.heartbeat_timeout_seconds"),
    ("action = \"teleport:x\"", "action"),
    ("fallback = \"cloud\"", "fallback"),
    ("records = \"out.txt\"", "records"),
    ("bogus_key = 1", "bogus_key"),
    ("[link]\nbogus = 1", "link.bogus"),
    ("[edge]\nbundle = 'b'\n[edge.llm]\nbogus = 1", "edge.llm.bogus"),
    ("[edge]\nbundle = 'b'\n[lnk]\nconnect = 'tcp://h:1'", "'lnk'"),
    ("[edge]\n[llm]\ncheckpoint = 's'\n[edge.llm]\ncheckpoint = 's'", "both set"),
    ("queue_size = \"many\"", "queue_size"),
    ("[curve]\nserver_key = \"abc\"", "curve"),
    ("[llm]\ncheckpoint = \"s.bin\"\ncodec = \"zip\"", "llm.codec"),
    ("[llm]\ncheckpoint = \"s.bin\"\nsplit = 0", "llm.split"),
    ("[llm]\ncheckpoint = \"s.bin\"\nmax_new_tokens = 0", "llm.max_new_tokens"),
    ("[llm]\nsplit = 3", "llm.checkpoint is missing"),
    ("[http]\nport = 70000", "http.port"),
    ("connect = \"tcp://h:1\"", "moved: write connect = ... under \\[link\\]"),
    ("llm_checkpoint = \"s.bin\"", "moved: write checkpoint = ... under \\[llm\\]"),
    ("[edge]\ncurve_server_key = \"k\"", "'edge.curve_server_key' moved"),
])
def test_bad_config_names_the_file_and_key(tmp_path, text, key):
    path = tmp_path / "edge.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key) as info:
        load_edge_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_llm_over_curve_is_accepted(tmp_path):
    """The LLM sessions ride the CURVE-capable link: the old refusal is gone."""
    path = tmp_path / "edge.toml"
    path.write_text('[llm]\ncheckpoint = "s.bin"\n[curve]\nserver_key = "k"\n'
                    'client_cert = "c.key_secret"\n')
    config = load_edge_config(path)
    assert config.llm.enabled and config.curve.enabled


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


def test_a_record_dict_is_every_field_in_order_and_a_copy():
    from dataclasses import asdict
    record = _record(4)
    row = record.to_dict()
    assert row == asdict(record) and list(row) == list(asdict(record))
    row["action"] = "local"                 # the caller's dict, not the record's state
    assert record.action == "split:layer1:fp32"


def test_list_sink_and_bad_suffix(tmp_path):
    sink = ListSink()
    sink.write(_record(1))
    assert sink.records == [_record(1)]
    with pytest.raises(ConfigError, match=".jsonl or .csv"):
        open_sink(tmp_path / "x.txt")
    assert EdgeConfig().listen.startswith("tcp://127.0.0.1")


@pytest.mark.parametrize("command", ["edge", "cloud"])
def test_every_mapped_flag_exists_and_sets_a_real_config_field(command):
    """The literal flag -> field mappings stay in step with the parsers and the dataclasses."""
    import argparse
    import dataclasses
    import typing

    from tether.cli import build_parser
    from tether.cloud.config import CloudConfig
    from tether.commands.cloud import CLOUD_FLAGS
    from tether.commands.edge import EDGE_FLAGS
    flags, cls = (EDGE_FLAGS, EdgeConfig) if command == "edge" else (CLOUD_FLAGS, CloudConfig)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices[command]._actions if a.option_strings}
    assert set(flags) <= dests, set(flags) - dests
    assert dests - set(flags) <= {"help", "config"}, dests - set(flags)     # every flag is mapped
    for path in flags.values():
        owner = cls
        for part in path.split("."):
            assert dataclasses.is_dataclass(owner), path
            assert part in {f.name for f in dataclasses.fields(owner)}, path
            owner = typing.get_type_hints(owner)[part]
