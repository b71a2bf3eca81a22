"""One daemon per side (issue 13): `tether cloud` and `tether edge` serve a split LLM alone (no
bundle) from nested TOML configs, flags override the tables, and the tokens equal the whole
model's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tether.core.errors import TetherError
from tether.edge.client import EdgeClient

from support.procs import REPO, Daemon, free_port

pytestmark = pytest.mark.slow
PROMPT = "Once upon a time"


def _tether(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tether", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=180)


def _tether_started(*args: str) -> subprocess.Popen:
    """`tether ARGS` started in the background (it imports torch while the daemons start)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tether", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_llm_only_cloud_and_edge_from_toml(assets, tmp_path):
    ckpt = assets / "tinyllm" / "stories260K.bin"
    whole = _tether_started("generate", "--checkpoint", str(ckpt), "--split", "5",
                            "--max-new-tokens", "6", PROMPT)   # every layer here: the whole model
    cloud_toml = tmp_path / "cloud.toml"
    cloud_toml.write_text(f'[cloud]\nbind = "tcp://127.0.0.1:{free_port()}"\n'
                          f'[llm]\ncheckpoint = "{ckpt}"\nmax_sessions = 4\nmax_batch = 2\n'
                          'splits = [2]\ncodecs = ["fp32"]\n')
    cloud = Daemon(["cloud", "--config", str(cloud_toml)], tmp_path / "cloud.log").start()
    try:
        edge_toml = tmp_path / "edge.toml"
        edge_toml.write_text(f'[edge]\nlisten = "tcp://127.0.0.1:{free_port()}"\n'
                             f'[link]\nconnect = "{cloud.endpoint}"\n'
                             f'[llm]\ncheckpoint = "{ckpt}"\nsplit = 2\ncodec = "fp32"\n'
                             'timeout_seconds = 30.0\nmax_new_tokens = 100\n')
        edge = Daemon(["edge", "--config", str(edge_toml), "--llm-max-new-tokens", "6"],
                      tmp_path / "edge.log").start()
        try:
            split = _tether("generate", "--edge", edge.endpoint, "--max-new-tokens", "12", PROMPT)
            with EdgeClient(edge.endpoint, timeout=30) as client:
                with pytest.raises(TetherError, match="no image model"):
                    client.infer(np.zeros((32, 32, 3), np.uint8))
        finally:
            edge.kill()
    finally:
        cloud.kill()
        whole_out, whole_err = whole.communicate(timeout=180)
    assert whole.returncode == 0, whole_err
    assert split.returncode == 0, split.stderr
    assert split.stdout == whole_out and len(split.stdout) > len(PROMPT) + 1
    assert "6 tokens" in split.stderr and "'cloud': 6" in split.stderr, split.stderr   # flag won


def test_an_edge_with_nothing_to_serve_and_an_old_config_fail_in_one_line(tmp_path):
    old = tmp_path / "edge.toml"
    old.write_text('bundle = "b"\nllm_checkpoint = "s.bin"\n')
    empty = _tether_started("edge", "--connect", "tcp://127.0.0.1:9")     # both at once
    moved = _tether_started("edge", "--config", str(old))
    for proc, needle in ((empty, "nothing to serve"), (moved, "under [llm]")):
        _, err = proc.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0], err
        if proc is moved:
            assert str(old) in err
