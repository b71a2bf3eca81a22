"""The README's commands work exactly as written.

Every ```bash block is extracted; every `tether ...` command in it must parse with the real
argument parser (so no README flag is ever rejected), and the fast ones run, in order, in a
scratch directory laid out like a checkout (``../shared/assets`` beside it), with `tether` on
PATH. Commands that need a running daemon, long runs, the internet or a fresh install are
skipped with the reason listed in :data:`SKIP`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tether.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

#: command prefix -> why it is not run here (it is still parsed)
SKIP = {
    "python3 -m venv": "installs into a fresh virtual environment (CI does this itself)",
    ".venv/bin/python -m pytest": "the whole test suite",
    ".venv/bin/tether demo": "a several-minute demo run (bundle build, then 15 s per policy)",
    "tether partition resnet18": "an ImageNet-size model: a long profile (or a download)",
    "tether partition mynet.py": "needs your own model file (tests/byo does this)",
    "tether partition mypkg.": "needs your own package (tests/byo does this)",
    "tether partition hf:": "needs a save_pretrained folder (tests/byo builds one)",
    "tether cloud": "a daemon (covered by tests/integration)",
    "tether edge": "a daemon (covered by tests/integration)",
    "tether infer": "needs a running edge daemon",
    "tether generate": "needs a running edge daemon",
    "tether codec": "trains/evaluates on CIFAR-10 for minutes",
    "tether testbed calibrate": "10 s of bulk transfer whose verdict depends on machine load",
    "tether testbed run": "a multi-minute experiment",
    "curl ": "needs a running edge with --http-port (tests/edge/test_http_front.py runs one)",
    "pip install": "installs packages (.ci/run installs every extra the tests need)",
}


def bash_commands(text: str) -> list[str]:
    """Commands of every ```bash block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = bash_commands(README)


def _skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if command.startswith(prefix)), None)


def _tether_argv(command: str) -> list[str] | None:
    words = shlex.split(command, comments=True)
    for i, word in enumerate(words):
        if word == "tether" or word.endswith("/tether"):
            rest = words[i + 1:]
            return rest[:rest.index("&&")] if "&&" in rest else rest
    return None


def test_readme_has_commands():
    assert len(COMMANDS) >= 10 and any(c.startswith("tether partition") for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if _tether_argv(c) is not None])
def test_every_readme_tether_command_parses(command):
    try:
        build_parser().parse_args(_tether_argv(command))
    except SystemExit as exc:
        pytest.fail(f"README command rejected by the parser ({exc.code}): {command}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, assets):
    """A scratch checkout with ../shared/assets beside it and `tether` on PATH."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").mkdir()
    (root / "shared" / "assets").symlink_to(assets)
    checkout = root / "checkout"
    checkout.mkdir()
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "tether"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tether "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return checkout, env


@pytest.mark.slow
def test_fast_readme_commands_run_as_written(workdir):
    checkout, env = workdir
    ran, skipped = [], []
    for command in COMMANDS:
        reason = _skip_reason(command)
        if reason is not None:
            skipped.append((command, reason))
            continue
        proc = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, text=True,
                              capture_output=True, timeout=240)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        ran.append(command)
    assert any(c.startswith("tether partition cifar_resnet20") for c in ran), ran
    assert (checkout / "bundles" / "r20" / "manifest.json").is_file()
    assert skipped and all(reason for _, reason in skipped)


#: the config files shown in the README and docs/runtime.md: ```toml blocks whose first line names one
SHOWN_CONFIGS = [(doc, block) for doc in ("README.md", "docs/runtime.md")
                 for block in re.findall(r"```toml\n(# (?:edge|cloud)\.toml.*?)```",
                                         (REPO / doc).read_text(), flags=re.S)]


def test_shown_config_files_load(tmp_path):
    from tether.cloud.config import load_cloud_config
    from tether.edge.config import load_edge_config
    assert len(SHOWN_CONFIGS) >= 4
    for doc, block in SHOWN_CONFIGS:
        path = tmp_path / block.split()[1].rstrip(":")
        path.write_text(block)
        config = (load_edge_config if path.name == "edge.toml" else load_cloud_config)(path)
        config.require_model()
        assert config.llm.enabled, (doc, block)
