"""A user's own module, from a file, from pkg:attr and as a Python object: partition ->
cloud + edge -> the answers equal the module's own."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tether
from tether.core.bundle import Manifest
from tether.core.errors import ModelError
from tether.partitioner import BundleModel, export_bundle

from .models import seeded, serve_and_ask, write_user_model

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
X = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
QUICK = dict(repeats=2, warmup=0, rounds=1, progress=False)


def _import_user(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("user_mynet_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_file_reference_through_the_cli_serves_equal_answers(tmp_path):
    path = write_user_model(tmp_path / "src")
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "tether", "partition", f"{path}:MyNet", "--input-shape",
         "1,3,16,16", "--splits", "stem.1,down.2", "--repeats", "2", "--warmup", "0",
         "--rounds", "1", "--no-progress", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = Manifest.load(out)
    assert manifest.source["kind"] == "python" and manifest.source["graph"] == "fx"
    assert manifest.preprocess["normalization"] == "none"
    module = seeded(_import_user(path).MyNet)
    with torch.no_grad():
        want = module(X).numpy()
    for action in ("split:stem.1:fp32", "split:down.2:fp32", "offload:fp32"):
        got = serve_and_ask(out, action, [x[None].numpy() for x in X])
        np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-5, err_msg=action)


def test_package_reference_is_rebuilt_from_code(tmp_path, monkeypatch):
    write_user_model(tmp_path / "userpkg", "models.py")
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    manifest = export_bundle("userpkg.models:build", out, splits=["all"],
                             input_shape=(1, 3, 16, 16), **QUICK)
    assert manifest.source["ref"] == "userpkg.models:build" and manifest.weights == "model.pt"
    module = seeded(_import_user(tmp_path / "userpkg" / "models.py").build)
    bundle = BundleModel.load(out)
    with torch.no_grad():
        for split in manifest.split_names:
            torch.testing.assert_close(bundle.tail(split)(bundle.head(split)(X)), module(X))


def test_python_object_gets_a_self_contained_bundle(tmp_path):
    module = seeded(_import_user(write_user_model(tmp_path)).MyNet)
    bundle = tether.partition(module, X[:1], tmp_path / "b", splits=["stem.1"], **QUICK)
    assert isinstance(bundle, tether.Bundle)
    m = bundle.manifest
    assert m.source["graph"] == "export" and m.weights == "model.pt2"
    assert (tmp_path / "b" / "model.pt2").is_file() and "stem.1" in m.split_names
    with torch.no_grad():       # the batch stays dynamic in the exported program and ONNX head
        want = module(X).numpy()
        head = bundle.onnx_head("stem.1")(X.numpy())
        np.testing.assert_allclose(bundle.tail("stem.1")(torch.from_numpy(head)).numpy(), want,
                                   rtol=1e-4, atol=1e-5)
    got = serve_and_ask(tmp_path / "b", "split:stem.1:fp16", [x[None].numpy() for x in X])
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-2, atol=1e-2)


def test_fx_for_an_object_needs_a_source(tmp_path):
    module = seeded(_import_user(write_user_model(tmp_path)).MyNet)
    with pytest.raises(ModelError, match="source="):
        tether.partition(module, X[:1], tmp_path / "b", method="fx", **QUICK)


def test_fx_failure_names_the_export_path_and_auto_falls_back(tmp_path, monkeypatch):
    from tether.core.errors import NotTraceableError
    write_user_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotTraceableError) as info:
        export_bundle("mynet:ShapeBranch", tmp_path / "b", method="fx", splits=["stem.1"],
                      input_shape=(1, 3, 16, 16), **QUICK)
    assert "--method export" in str(info.value) and "--leaf  " not in str(info.value) \
        and "--leaf ," not in str(info.value) and "leaf_modules=['']" not in str(info.value)
    manifest = export_bundle("mynet:ShapeBranch", tmp_path / "b", splits=["stem.1"],
                             input_shape=(1, 3, 16, 16), **QUICK)
    assert manifest.source["graph"] == "export" and manifest.source["kind"] == "python"
    module = seeded(_import_user(tmp_path / "mynet.py").ShapeBranch)
    bundle = BundleModel.load(tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(bundle.tail("stem.1")(bundle.head("stem.1")(X)), module(X))


def test_bad_references_name_the_fix(tmp_path, monkeypatch):
    from tether.core.errors import TetherError
    monkeypatch.chdir(tmp_path)
    write_user_model(tmp_path)
    for spec, text in [("nosuchpkg.mod:Net", "cannot import"), ("mynet:Nope", "no attribute"),
                       ("missing.py:Net", "does not exist"), ("mynet:torch", "not a torch.nn")]:
        with pytest.raises(TetherError, match=text):
            export_bundle(spec, tmp_path / "b", **QUICK)
