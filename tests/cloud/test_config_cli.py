"""CloudConfig from TOML and flags, the example config, `tether keys generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.auth

import argparse

from tether.cloud.config import CloudConfig, load_cloud_config
from tether.commands import cloud as cloud_command
from tether.commands.cloud import build_config
from tether.core.errors import ConfigError


def parse(argv):
    """Our sub-commands alone (the full `tether` parser imports every area's command)."""
    parser = argparse.ArgumentParser(prog="tether")
    cloud_command.add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)

REPO = Path(__file__).resolve().parents[2]


def test_example_config_loads_and_matches_the_documented_defaults():
    config = load_cloud_config(REPO / "configs" / "cloud.example.toml")
    assert config.bind == "tcp://0.0.0.0:5555" and config.metrics_port == 9100
    assert config.bundles == (Path("bundles/cifar_resnet20"),)
    defaults = CloudConfig()
    assert (config.max_batch_size, config.max_queue, config.max_queue_delay_s) == \
        (defaults.max_batch_size, defaults.max_queue, defaults.max_queue_delay_s)


@pytest.mark.parametrize("toml, match", [
    ("[cloud]\nmax_batch = 4\n", "cloud.max_batch"),
    ("[cloud]\nmax_batch_size = 0\n", "max_batch_size"),
    ("[cloud]\nmax_batch_size = 'x'\n", "max_batch_size"),
    ("[cloud]\nbind = 'localhost:5'\n", "ZeroMQ endpoint"),
    ("[curve]\nsecret_key = 'k'\n", "curve.secret_key and curve.allowed_keys go together"),
    ("[cloud]\ncurve_secret_key = 'k'\n", "moved: write secret_key = ... under \\[curve\\]"),
    ("[llm]\nmax_sessions = 8\n", "llm.checkpoint is missing"),
    ("[llm]\ncheckpoint = 's.bin'\nmax_sessions = 0\n", "max_sessions"),
    ("[llm]\ncheckpoint = 's.bin'\ncodecs = ['zip']\n", "unknown LLM codecs"),
    ("[llm]\ncheckpoint = 's.bin'\nmax_session = 8\n", "llm.max_session"),
    ("[cloud]\n[llm]\ncheckpoint = 's'\n[cloud.llm]\ncheckpoint = 's'\n", "both set"),
    ("[cloud\n", "not valid TOML"),
])
def test_bad_configs_name_the_key(tmp_path, toml, match):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_cloud_config(path)


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("bind = 'tcp://127.0.0.1:7000'\nmax_batch_size = 4\nworkers = 2\n")
    args = parse(["cloud", "--config", str(path), "--bundle", "a",
                                      "--bundle", "b", "--max-batch-size", "8",
                                      "--max-queue-delay-ms", "3"])
    config = build_config(args)
    assert config.bind == "tcp://127.0.0.1:7000" and config.workers == 2
    assert config.max_batch_size == 8 and config.max_queue_delay_s == pytest.approx(0.003)
    assert config.bundles == (Path("a"), Path("b"))


def test_llm_section_sets_every_engine_knob_and_flags_override_it(tmp_path):
    from tether.cloud.llm import LLMEngineConfig
    path = tmp_path / "c.toml"
    path.write_text("[cloud]\nbind = 'tcp://127.0.0.1:7000'\n"
                    "[llm]\ncheckpoint = 'm/stories260K.bin'\nmax_sessions = 8\n"
                    "max_kv_bytes = 1048576\nmax_session_tokens = 128\n"
                    "idle_timeout_seconds = 30.0\nmax_batch = 4\nsplits = [2, 3]\n"
                    "codecs = ['fp16', 'int8']\n")
    config = load_cloud_config(path)
    assert config.llm.engine_config() == LLMEngineConfig(
        max_sessions=8, max_kv_bytes=1 << 20, max_session_tokens=128, idle_timeout_s=30.0,
        max_batch=4, splits=(2, 3), codecs=("fp16", "int8"))
    assert config.llm.name == "stories260K"
    args = parse(["cloud", "--config", str(path), "--llm-max-sessions", "2", "--llm-max-kv-mib",
                  "3", "--llm-idle-timeout", "5", "--llm-max-batch", "2", "--llm-splits", "1,2",
                  "--llm-codecs", "fp32", "--llm-max-session-tokens", "64"])
    engine = build_config(args).llm.engine_config()
    assert (engine.max_sessions, engine.max_kv_bytes, engine.idle_timeout_s, engine.max_batch,
            engine.splits, engine.codecs, engine.max_session_tokens) == \
        (2, 3 << 20, 5.0, 2, (1, 2), ("fp32",), 64)


def test_every_engine_knob_is_a_key_of_the_llm_section():
    """Whoever adds a knob to LLMEngineConfig adds it to [llm] (CloudLLMConfig) too."""
    import dataclasses
    from tether.cloud.config import CloudLLMConfig
    from tether.cloud.llm import LLMEngineConfig
    section = {f.name: f.default for f in dataclasses.fields(CloudLLMConfig)}
    for f in dataclasses.fields(LLMEngineConfig):
        assert f.name in section, f"[llm] lacks the engine knob {f.name}"
        assert section[f.name] == f.default, f"[llm] {f.name} default differs from the engine's"


def test_curve_and_llm_flags_and_tables_beside_or_inside_cloud(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[cloud]\n[cloud.curve]\nsecret_key = 'k/server.key_secret'\n"
                    "allowed_keys = 'k/allowed'\n[ray]\naddress = 'auto'\n")
    config = load_cloud_config(path)
    assert config.curve.enabled and config.curve.allowed_keys == Path("k/allowed")
    assert config.ray.address == "auto"
    args = parse(["cloud", "--curve-secret-key", "a.key_secret", "--curve-allowed-keys", "d",
                  "--llm-checkpoint", "s.bin", "--llm-tokenizer", "t.bin"])
    config = build_config(args)
    assert (config.curve.secret_key, config.curve.allowed_keys) == (Path("a.key_secret"), Path("d"))
    assert (config.llm.checkpoint, config.llm.tokenizer) == (Path("s.bin"), Path("t.bin"))
    config.require_model()                  # an LLM-only cloud is a valid cloud


def test_cloud_without_bundle_fails_with_a_fix():
    args = parse(["cloud", "--bind", "tcp://127.0.0.1:0"])
    with pytest.raises(ConfigError, match="--bundle DIR"):
        args.handler(args)


def test_cloud_is_registered_in_the_cli():
    from tether.cli import COMMAND_MODULES
    assert COMMAND_MODULES["cloud"] == "tether.commands.cloud"


def test_keys_generate_writes_a_loadable_pair(tmp_path, capsys):
    args = parse(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "edge-1"])
    assert args.handler(args) == 0
    public, secret = zmq.auth.load_certificate(str(tmp_path / "k" / "edge-1.key_secret"))
    assert len(public) == 40 and len(secret) == 40
    assert (tmp_path / "k" / "edge-1.key_secret").stat().st_mode & 0o077 == 0
    assert "edge-1.key" in capsys.readouterr().out
