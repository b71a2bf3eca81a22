"""Issue 15: validate at start, fail fast with one clear line (cloud config, CURVE keys, key
generation), checked through the API and through the real `tether` command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from tether.cloud import CloudConfig
from tether.cloud.config import CloudCurveConfig, load_cloud_config
from tether.cloud.curve import load_allowed_keys
from tether.commands import cloud as cloud_command
from tether.core.errors import ConfigError
from tether.edge.config import load_edge_config

from support.cloud import ServerThread, slow_bundle

REPO = Path(__file__).resolve().parents[2]


def _tether(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def _one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tether: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("toml, match", [
    ("[cloud]\nmax_batch_size = 4\n[policy]\nname = 'adaptive'\n", "'policy'"),
    ("[cloud]\nmax_batch_size = 4\n[clod]\nworkers = 2\n", "'clod'"),
    ("[cloud]\nmax_batch_size = 4\nworkers = 2\n[edge]\nbundle = 'b'\n", "'edge'"),
    ("max_batch_size = 4\n[policy]\nname = 'adaptive'\n", "'policy'"),
])
def test_unknown_sections_in_a_cloud_config_are_errors(tmp_path, toml, match):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_cloud_config(path)


def test_every_example_config_stays_valid_and_the_edge_keeps_its_policy_table(tmp_path):
    assert load_cloud_config(REPO / "configs" / "cloud.example.toml").max_batch_size == 16
    edge = load_edge_config(REPO / "configs" / "edge.example.toml")
    assert edge.bundle
    path = tmp_path / "e.toml"
    path.write_text("[edge]\nbundle = 'b'\n[policy]\nname = 'adaptive'\n")
    assert load_edge_config(path).policy == {"name": "adaptive"}
    path.write_text("[edge]\nbundle = 'b'\n[cloud]\nworkers = 2\n")
    with pytest.raises(ConfigError, match="'cloud'"):
        load_edge_config(path)


def test_the_cloud_command_refuses_a_policy_table_in_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[cloud]\nbind = 'tcp://127.0.0.1:0'\n[policy]\nname = 'adaptive'\n")
    _one_clear_line(_tether("cloud", "--config", str(path), "--bundle", str(tmp_path)),
                    str(path), "policy")


def _key_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "server")
    good_public, _ = zmq.auth.create_certificates(str(allowed), "good")
    Path(allowed / "good.key_secret").unlink()
    return Path(server_secret), allowed, Path(good_public)


@pytest.mark.parametrize("content, match", [
    ('curve\n    public-key = "tooshort"\n', r"broken\.key:2: 'tooshort'"),
    ('curve\n  public-key = "' + "~" * 40 + '"\n', r"broken\.key:2"),
    ("just some text\n", r"broken\.key holds no public-key"),
])
def test_one_unparsable_allowed_key_refuses_to_start_naming_file_and_line(tmp_path, content, match):
    server_secret, allowed, _ = _key_dirs(tmp_path)
    (allowed / "broken.key").write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_allowed_keys(allowed)
    bundle, _ = slow_bundle(0.0)
    config = CloudConfig(bind="tcp://127.0.0.1:*", curve=CloudCurveConfig(server_secret, allowed))
    srv = ServerThread(config, [bundle])
    try:
        with pytest.raises(ConfigError, match=match):
            srv.__enter__()
    finally:
        srv.stop()


def test_the_allow_list_admits_exactly_its_parsed_keys(tmp_path):
    _, allowed, good_public = _key_dirs(tmp_path)
    public, _ = zmq.auth.load_certificate(str(good_public))
    keys = load_allowed_keys(allowed)
    assert keys.callback("*", public) and not keys.callback("*", b"x" * 40)


def test_the_cloud_command_refuses_a_bad_allowed_key_before_loading_bundles(tmp_path):
    server_secret, allowed, _ = _key_dirs(tmp_path)
    (allowed / "broken.key").write_text('public-key = "nope"\n')
    proc = _tether("cloud", "--bundle", str(tmp_path / "no-such-bundle"), "--bind",
                   "tcp://127.0.0.1:0", "--curve-secret-key", str(server_secret),
                   "--curve-allowed-keys", str(allowed))
    _one_clear_line(proc, str(allowed / "broken.key") + ":1")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="tether")
    cloud_command.add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_keys_generate_refuses_to_overwrite_without_force(tmp_path):
    argv = ["keys", "generate", "--out", str(tmp_path), "--name", "edge-1"]
    args = _parse(argv)
    assert args.handler(args) == 0
    before = (tmp_path / "edge-1.key_secret").read_bytes()
    with pytest.raises(ConfigError, match="already exists.*--force"):
        args.handler(_parse(argv))
    assert (tmp_path / "edge-1.key_secret").read_bytes() == before
    forced = _parse(argv + ["--force"])
    assert forced.handler(forced) == 0
    assert (tmp_path / "edge-1.key_secret").read_bytes() != before
