"""The public API of ``import tether``: every listed name resolves, importing stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tether

REPO = Path(__file__).resolve().parents[1]

EXPECTED = {"__version__", "partition", "Bundle", "find_split_points", "split_at", "SplitPoint",
            "load_model", "export_bundle", "profile_bundle", "Manifest", "CostTable",
            "TensorSpec", "TetherError", "make_codec", "EdgeClient", "EdgeAgent", "CloudServer"}


def test_all_lists_the_public_names_and_each_resolves():
    assert set(tether.__all__) == EXPECTED
    for name in tether.__all__:
        assert getattr(tether, name) is not None, name
    assert callable(tether.partition) and tether.Bundle.__name__ == "BundleModel"
    assert set(dir(tether)) >= EXPECTED


def test_unknown_attribute_is_an_attribute_error():
    try:
        tether.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("tether.no_such_thing resolved")


def test_import_tether_does_not_import_torch():
    code = "import sys, tether; print('torch' in sys.modules, tether.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["False", tether.__version__]


def test_package_is_typed():
    assert (REPO / "tether" / "py.typed").is_file()
    assert "py.typed" in (REPO / "pyproject.toml").read_text()
