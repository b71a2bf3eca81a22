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
    ("[cloud]\ncurve_secret_key = 'k'\n", "go together"),
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
