"""Bundles: layout, ONNX heads equal to torch heads / named modules, atomic writes, profiling."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tether.core.bundle import Manifest
from tether.core.errors import BundleError, InputShapeError, SplitError, UnknownModelError
from tether.core.types import CodecCost, CostTable
from tether.partitioner import (
    BundleModel, OnnxModule, SplitPoint, export_bundle, load_model, pareto_front, profile_bundle,
)

FAST = {"repeats": 1, "warmup": 0, "progress": False, "profile_all": False}
SPLITS = ["layer1.2", "layer2.1", "flatten"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """cifar_resnet20 (seeded random weights) with an ONNX head at every split point."""
    out = tmp_path_factory.mktemp("bundles") / "r20"
    export_bundle("cifar_resnet20", out, splits=["all"], **{**FAST, "profile_all": True})
    return out


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "r20small"
    export_bundle("cifar_resnet20", out, splits=SPLITS, **FAST)
    return out


def test_bundle_layout_and_manifest(small_bundle):
    files = {p.relative_to(small_bundle).as_posix() for p in small_bundle.rglob("*") if p.is_file()}
    assert files == {"manifest.json", "costs.json", "model.pt", "heads/full.onnx",
                     *(f"heads/{s}.onnx" for s in SPLITS)}
    manifest = Manifest.load(small_bundle)
    loaded = load_model("cifar_resnet20")
    assert manifest.model_id == "cifar_resnet20" and manifest.fingerprint == loaded.fingerprint
    assert manifest.input.shape == (1, 3, 32, 32)
    assert [e.name for e in manifest.split_points if e.head] == SPLITS
    entry = manifest.split("layer2.1")
    assert entry.shape == (1, 32, 16, 16) and entry.bytes == 32 * 16 * 16 * 4
    assert entry.head == "heads/layer2.1.onnx" and entry.dtype == "float32"
    raw = json.loads((small_bundle / "manifest.json").read_text())
    assert raw["preprocess"]["normalization"] == "inside_model"
    assert raw["extra"]["selection"] == "explicit"
    assert len(raw["split_points"]) == len(manifest.split_names) > len(SPLITS)


def test_every_onnx_head_equals_the_named_module_with_dynamic_batch(bundle_dir):
    bundle = BundleModel.load(bundle_dir)
    assert bundle.exported_splits == bundle.manifest.split_names
    model = load_model("cifar_resnet20").module
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    modules = dict(model.named_modules())
    captured = {}
    hooks = [modules[n].register_forward_hook(
        lambda _m, _i, o, n=n: captured.__setitem__(n, o.clone()))
        for n in bundle.exported_splits if n in modules]
    with torch.inference_mode():
        want = model(x)
    for h in hooks:
        h.remove()
    assert {"normalize", "conv1", "bn1", "layer1.0", "layer2.2", "layer3.2"} <= set(captured)
    for name in bundle.exported_splits:
        onnx_out = torch.from_numpy(OnnxModule(bundle.head_onnx_path(name))(x.numpy()))
        with torch.inference_mode():
            torch.testing.assert_close(onnx_out, bundle.head(name)(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(bundle.tail(name)(onnx_out), want, rtol=1e-4, atol=1e-4)
        if name in captured:
            torch.testing.assert_close(onnx_out, captured[name], rtol=1e-4, atol=1e-4, msg=name)
    full = OnnxModule(bundle.full_onnx_path(), threads=1)
    torch.testing.assert_close(torch.from_numpy(full(x.numpy())), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputShapeError, match="expects input of shape"):
        full(np.zeros((1, 3, 16, 16), np.float32))


def test_bundle_model_api(small_bundle):
    bundle = BundleModel.load(small_bundle)
    assert bundle.head("layer2.1") is bundle.head("layer2.1")  # cached
    assert bundle.exported_splits == SPLITS
    assert [s.name for s in bundle.cost_table().splits] == SPLITS  # what the edge can run
    with pytest.raises(SplitError, match="no ONNX head.*exported"):
        bundle.head_onnx_path("layer1.0")
    with pytest.raises(SplitError, match="valid split points"):
        bundle.head("nope")
    x = bundle.example()
    with torch.no_grad():  # torch heads exist for every point, exported or not
        torch.testing.assert_close(bundle.tail("layer1.0")(bundle.head("layer1.0")(x)),
                                   bundle.full_model()(x))


def test_cost_table_covers_every_point(bundle_dir):
    bundle = BundleModel.load(bundle_dir)
    table = bundle.cost_table(exported_only=False)
    assert [s.name for s in table.splits] == bundle.manifest.split_names
    by_name = {s.name: s for s in table.splits}
    total = sum(p.numel() for p in bundle.full_model().parameters())
    for s in table.splits:
        assert s.head_seconds > 0 and s.tail_seconds > 0
        assert s.head_params + s.tail_params == total
        assert s.bytes == bundle.manifest.split(s.name).bytes
    head_flops = [by_name[n].head_flops for n in ("layer1.2", "layer2.1", "flatten")]
    assert head_flops == sorted(set(head_flops))
    flops = by_name["layer1.2"].head_flops + by_name["layer1.2"].tail_flops
    assert 80e6 < flops < 84e6  # resnet20: about 41 M multiply-adds per image
    assert table.edge_full_seconds > 0 and table.cloud_full_seconds > 0
    assert len(bundle.cost_table().splits) == len(table.splits)  # every head exported here


def test_profile_bundle_rewrites_costs_and_keeps_codec_entries(small_bundle):
    path = small_bundle / "costs.json"
    table = CostTable.load(path)
    codec = CodecCost(split="layer2.1", codec="int8", bytes=8200.0, encode_seconds=1e-4,
                      decode_seconds=1e-4)
    replace(table, codecs=(codec,), full_accuracy=0.9).save(path)
    fresh = profile_bundle(small_bundle, repeats=2, warmup=0, progress=False, profile_all=False)
    assert fresh.codecs == (codec,) and fresh.full_accuracy == 0.9
    assert fresh.meta["repeats"] == 2 and CostTable.load(path).meta["repeats"] == 2
    assert [s.name for s in fresh.splits] == SPLITS


def test_bundle_detects_tampered_weights(small_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_bundle, copy)
    state = torch.load(copy / "model.pt", weights_only=True)
    state["linear.bias"] = state["linear.bias"] + 1
    torch.save(state, copy / "model.pt")
    with pytest.raises(BundleError, match="fingerprint"):
        BundleModel.load(copy).full_model()
    (copy / "model.pt").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="bad weights"):
        BundleModel.load(copy).full_model()


def test_failed_export_leaves_nothing_behind(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(SplitError, match="layer2.1"):
        export_bundle("cifar_resnet20", out, splits=["layer9"], **FAST)
    with pytest.raises(UnknownModelError):
        export_bundle("resnet19", out, **FAST)
    with pytest.raises(InputShapeError):
        export_bundle("cifar_resnet20", out, input_shape=(1, 1, 32, 32), **FAST)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BundleError, match="BundleModel|not a complete bundle"):
        BundleModel.load(out)


def test_existing_bundle_replaced_but_foreign_directory_protected(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="--force"):
        export_bundle("cifar_resnet20", foreign, splits=["flatten"], **FAST)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "b"
    export_bundle("cifar_resnet20", out, splits=["flatten"], **FAST)
    export_bundle("cifar_resnet20", out, splits=["layer3.0"], **FAST)
    assert BundleModel.load(out).exported_splits == ["layer3.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "mine"]


def _pt(name: str, index: int, nbytes: int) -> SplitPoint:
    return SplitPoint(name, index, (1, nbytes // 4), "float32", nbytes, name)


def test_pareto_front_keeps_only_points_that_can_win():
    points = [_pt("a", 0, 400), _pt("b", 1, 800), _pt("c", 2, 300), _pt("c2", 3, 300),
              _pt("d", 4, 300), _pt("e", 5, 40)]
    flops = {"a": 0, "b": 10, "c": 20, "c2": 20, "d": 30, "e": 40}
    # b: more compute and bytes than a; c/c2 tie (later kept); d: more compute, same bytes as c2
    assert pareto_front(points, flops) == ["a", "c2", "e"]


def test_default_selection_is_the_pareto_front_on_resnet18(tmp_path):
    manifest = export_bundle("resnet18", tmp_path / "r18", input_shape=(1, 3, 64, 64), **FAST)
    exported = [e.name for e in manifest.split_points if e.head]
    # layer2.1 has the bytes of layer2.0 and more compute; add_3 ties layer2.0 (outer kept)
    assert exported == ["normalize", "layer2.0", "layer3.0", "layer4.0", "flatten"]
    sizes = [manifest.split(n).bytes for n in exported]
    assert sizes == sorted(sizes, reverse=True)


def test_heads_cut_from_one_multi_output_export_match_torch(tmp_path):
    from tether.partitioner import SplitGraph
    from tether.partitioner.profile import extract_heads

    module = load_model("resnet18").module  # in-place ReLUs after bn1: snapshot must hold
    x = torch.rand(2, 3, 32, 32)
    graph = SplitGraph(module, x[:1])
    names = ["bn1", "relu", "layer1.0", "layer3.1", "flatten"]
    heads = extract_heads(graph, names, x[:1], tmp_path)
    assert sorted(heads) == sorted(names)
    for name in names:
        with torch.inference_mode():
            want = graph.split(name)[0](x)
        got = torch.from_numpy(OnnxModule(heads[name])(x.numpy()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
