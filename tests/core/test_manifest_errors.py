"""Manifests of any bytes and any field types (issue 15, defect 5a): a BundleError naming the
file and the field, and through `tether cloud|edge|profile` one clear line and exit 1."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether.core.bundle import Manifest
from tether.core.errors import BundleError

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "format": "tether-bundle", "version": 1, "model_id": "m", "fingerprint": "f" * 64,
    "input": {"shape": [1, 3, 32, 32], "dtype": "float32"}, "source": {"kind": "x"},
    "split_points": [{"name": "layer1", "index": 3, "shape": [1, 16, 32, 32],
                      "dtype": "float32", "bytes": 65536, "head": "heads/layer1.onnx"}],
    "codecs": [{"split": "layer1", "codec": "int8", "kind": "int8", "params": {}}],
    "exits": [{"split": "layer1", "path": "exits/layer1.pt", "threshold": 0.9}],
}


def _set(path: str, value):
    def mutate(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if p.isdigit() else d[p]
        d[int(last) if last.isdigit() else last] = value
    return mutate


def test_a_good_manifest_round_trips():
    m = Manifest.from_dict(GOOD)
    assert Manifest.from_dict(m.to_dict()) == m
    assert m.split("layer1").shape == (1, 16, 32, 32) and m.full_onnx is None


@pytest.mark.parametrize("path, value, field", [
    ("input", "1x3x32x32", "input"),
    ("split_points", {"layer1": 1}, "split_points"),
    ("split_points.0.shape", "1x16", "split_points[0].shape"),
    ("split_points.0.shape", [1, "16"], "split_points[0].shape[1]"),
    ("split_points.0.index", True, "split_points[0].index"),
    ("codecs", "int8", "codecs"),
    ("codecs.0.params", ["a"], "codecs[0].params"),
    ("exits.0.threshold", "high", "exits[0].threshold"),
    ("source", "torchvision", "source"),
    ("model_id", 7, "model_id"),
    ("fingerprint", None, "fingerprint"),
])
def test_wrong_field_types_name_the_field(path, value, field):
    d = copy.deepcopy(GOOD)
    _set(path, value)(d)
    with pytest.raises(BundleError, match=rf"invalid bundle manifest: {_re(field)}:"):
        Manifest.from_dict(d)


def _re(field: str) -> str:
    return field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1, 2]", b'"manifest"', b"[" * 100000,
                                     b'{"format": "tether-bundle", "version": true}'])
def test_any_bytes_give_a_bundle_error_naming_the_file(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match="manifest.json"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("command", ["cloud", "edge", "profile"])
def test_the_commands_report_a_broken_manifest_in_one_line(tmp_path, command):
    (tmp_path / "utf").mkdir()
    (tmp_path / "utf" / "manifest.json").write_bytes(b"\xff\xfe\x00{")
    typed = copy.deepcopy(GOOD)
    typed["split_points"][0]["shape"] = "1x16"
    (tmp_path / "typed").mkdir()
    (tmp_path / "typed" / "manifest.json").write_text(json.dumps(typed))
    procs = []
    for bundle, needle in ((tmp_path / "utf", "utf-8"), (tmp_path / "typed", "split_points[0].shape")):
        argv = {"cloud": ["cloud", "--bundle", str(bundle), "--bind", "tcp://127.0.0.1:0"],
                "edge": ["edge", "--bundle", str(bundle), "--listen", "tcp://127.0.0.1:0"],
                "profile": ["profile", str(bundle)]}[command]
        procs.append((bundle, needle, subprocess.Popen(      # both at once: each imports torch
            [sys.executable, "-m", "tether", *argv], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for bundle, needle, proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in stderr, stderr
        errors = [ln for ln in stderr.splitlines() if ln.startswith("tether: error:")]
        assert len(errors) == 1, stderr
        assert str(bundle / "manifest.json") in errors[0] and needle in errors[0], errors[0]
