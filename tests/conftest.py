"""Shared fixtures. Tests are an entry point: this is where TETHER_ASSETS is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Two cores on the machines that run CI: keep each test's intra-op threads modest.
torch.set_num_threads(min(2, torch.get_num_threads()))


def _assets_dir() -> Path | None:
    env = os.environ.get("TETHER_ASSETS")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "assets"]:
        if (candidate / "README.md").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared real assets folder; tests needing it skip with a reason when absent."""
    found = _assets_dir()
    if found is None:
        pytest.skip("real assets not found: set TETHER_ASSETS or place ../shared/assets beside the repo")
    return found
