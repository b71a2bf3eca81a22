"""The split: tail(head(x)) equals the whole model for every family and several k."""

from __future__ import annotations

import pytest
import torch

from tether.core.errors import SplitError, UnknownModelError
from tether.partitioner.llm import (CloudLM, EdgeLM, StateDictCheckpoint, full_model, num_layers,
                                    parse_split, split_llm)

from .llm_tiny import FAMILY_NAMES, tiny_checkpoint, tiny_config


def greedy_split(edge, cloud, ids, steps, wire_dtype=torch.float16):
    ec, cc = edge.new_cache(), cloud.new_cache()
    out, x, pos = list(ids), torch.tensor([ids]), 0
    for _ in range(steps):
        h = edge(x, ec, pos).to(wire_dtype).float()
        pos += x.shape[1]
        token = int(cloud(h, cc)[0, -1].argmax())
        out.append(token)
        x = torch.tensor([[token]])
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_split_logits_equal_full_model_with_caches(family):
    ckpt = tiny_checkpoint(family)
    full = full_model(ckpt)
    ids = torch.tensor([[1, 5, 9, 3, 7, 11]])
    with torch.no_grad():
        ref = full(ids).logits
    for k in range(num_layers(ckpt.config) + 1):
        edge, cloud = split_llm(ckpt, k)
        ec, cc = edge.new_cache(), cloud.new_cache()
        first = cloud(edge(ids[:, :4], ec, 0), cc, last_only=False)
        rest = cloud(edge(ids[:, 4:], ec, 4), cc, last_only=False)   # incremental, with caches
        got = torch.cat([first, rest], dim=1)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=f"{family} k={k}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_edge_exit_at_last_layer_equals_full_model(family):
    ckpt = tiny_checkpoint(family, seed=1)
    n = num_layers(ckpt.config)
    ids = torch.tensor([[1, 4, 6, 8]])
    edge = EdgeLM(ckpt, n)
    with torch.no_grad():
        torch.testing.assert_close(edge.exit_logits(edge(ids)), full_model(ckpt)(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_stories_greedy_through_fp16_split_equals_whole_model(stories, stories_full):
    ref = stories_full.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)[0].tolist()
    for k in (1, 2, 3, 4):
        edge, cloud = split_llm(stories, k)
        assert greedy_split(edge, cloud, [1], 40) == ref, f"k={k}"


class RecordingCheckpoint(StateDictCheckpoint):
    def __init__(self, inner):
        super().__init__(inner.config, inner.state_dict(lambda k: True))
        self.requested: set[str] = set()

    def state_dict(self, keep):
        out = super().state_dict(keep)
        self.requested |= set(out)
        return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_side_reads_only_the_weights_it_needs(family):
    ckpt = RecordingCheckpoint(tiny_checkpoint(family))
    layers = "model.layers." if family == "llama" else "transformer.h."
    EdgeLM(ckpt, 1, with_exit=False)
    assert any(k.startswith(layers + "0.") for k in ckpt.requested)
    assert not any(k.startswith(layers + i) for k in ckpt.requested for i in "123")
    assert not any(k.startswith("lm_head") for k in ckpt.requested)
    ckpt.requested.clear()
    cloud = CloudLM(ckpt, 3)
    assert {k.split(".")[2] for k in ckpt.requested if k.startswith(layers)} == {"3"}
    assert not any("embed_tokens" in k or "wpe" in k for k in ckpt.requested)
    assert sum(p.numel() for p in cloud.parameters()) < sum(
        p.numel() for p in full_model(ckpt).parameters()) // 2


def test_invalid_split_and_family_are_clear_errors():
    ckpt = tiny_checkpoint("llama")
    with pytest.raises(SplitError, match="valid split layers are 0..4"):
        EdgeLM(ckpt, 5)
    with pytest.raises(SplitError, match="layer<k>"):
        parse_split("block2", ckpt.config)
    assert parse_split("layer2", ckpt.config) == 2
    with pytest.raises(SplitError):
        EdgeLM(ckpt, 2, with_exit=False).exit_logits(torch.zeros(1, 1, 32))
    cfg = tiny_config("llama")
    cfg.model_type = "mamba"
    with pytest.raises(UnknownModelError, match="supported"):
        EdgeLM(StateDictCheckpoint(cfg, {}), 1)


def test_hf_model_directory_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.core.errors import WeightsError
    from tether.partitioner.llm import open_llm
    from .llm_tiny import tiny_config

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    model.save_pretrained(tmp_path / "qwen")
    ckpt = open_llm(tmp_path / "qwen")
    assert ckpt.source["kind"] == "hf" and len(ckpt.fingerprint) == 64
    assert set(ckpt.state_dict(lambda k: k.startswith("model.layers.1."))) and all(
        k.startswith("model.layers.1.") for k in ckpt.state_dict(lambda k: k.startswith("model.layers.1.")))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    edge, cloud = split_llm(ckpt, 2)
    with torch.no_grad():
        torch.testing.assert_close(cloud(edge(ids), last_only=False), model(ids).logits,
                                   atol=1e-4, rtol=1e-4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "qwen" / "config.json").read_text())
    with pytest.raises(WeightsError, match="save_pretrained"):
        open_llm(tmp_path / "empty")
