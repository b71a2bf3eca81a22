"""Hugging Face models from a save_pretrained folder (tiny configs, no downloads): ViT and
BERT through torch.export; the served answers equal the transformers model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tether.core.bundle import Manifest  # noqa: E402
from tether.partitioner import export_bundle  # noqa: E402
from tether.partitioner.sources import resolve_model  # noqa: E402

from .models import serve_and_ask, tiny_bert, tiny_vit  # noqa: E402

QUICK = dict(repeats=2, warmup=0, rounds=1, progress=False, profile_all=False)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "vit_tiny"
    model = tiny_vit(folder)
    out = folder.parent / "vit_bundle"
    export_bundle(f"hf:{folder}", out, splits=["vit.layers.0"], **QUICK)
    return model, out


def test_vit_split_and_offload_equal_the_model(vit):
    model, out = vit
    m = Manifest.load(out)
    assert m.source["kind"] == "hf" and m.source["graph"] == "export"
    assert m.input.shape == (1, 3, 32, 32) and m.preprocess["normalization"] == "none"
    names = m.split_names
    assert {"vit.layers.0", "vit.layers.1"} <= set(names), names
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(pixel_values=x).logits.numpy()
    for action in ("split:vit.layers.0:fp32", "offload:fp32"):
        got = serve_and_ask(out, action, [row[None].numpy() for row in x])
        np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-5, err_msg=action)


def test_vit_over_real_sockets(vit):
    from support.cloud import ServerThread

    from tether.cloud import CloudConfig, ServedBundle
    model, out = vit
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(pixel_values=x).logits.numpy()
    config = CloudConfig(bind="tcp://127.0.0.1:*", max_queue_delay_s=0.0)
    with ServerThread(config, [ServedBundle.load(out)]) as server:
        got = serve_and_ask(out, "split:vit.layers.0:fp16", [r[None].numpy() for r in x],
                            endpoint=server.endpoint)
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-2, atol=1e-3)


def test_bert_token_ids_split_equal_the_model(tmp_path):
    model = tiny_bert(tmp_path / "bert_tiny")
    out = tmp_path / "bundle"
    export_bundle(str(tmp_path / "bert_tiny"), out, splits=["bert.encoder.layer.0"],
                  **QUICK)
    m = Manifest.load(out)
    assert m.input.dtype == "int64" and m.preprocess["layout"] == "NL"
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    got = serve_and_ask(out, "split:bert.encoder.layer.0:fp32", [r[None].numpy() for r in ids])
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-5)


def test_hf_vision_normalization_from_the_image_processor(tmp_path):
    import json
    folder = tmp_path / "vit"
    tiny_vit(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    loaded = resolve_model(f"hf:{folder}")
    assert loaded.preprocess["normalization"] == "inside_model"
    assert loaded.preprocess["mean"] == [0.5, 0.5, 0.5]
    none = resolve_model(f"hf:{folder}", normalize=None)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), none.module((x - 0.5) / 0.5))
