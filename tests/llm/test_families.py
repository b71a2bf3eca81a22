"""Phi and GPT-NeoX: split -> edge + in-process cloud engine -> greedy tokens equal the whole
model's (the families added to the embed -> blocks -> norm -> head split)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tether.cloud.llm import LLMEngine, LLMEngineConfig
from tether.edge.llm import GenerateConfig, LLMEdge
from tether.partitioner.llm import EdgeLM, full_model, num_layers

from .links import local_cloud
from .llm_tiny import tiny_checkpoint

STEPS = 12


class _IdsTokenizer:
    """Token ids as text (the tiny configs have no tokenizer)."""

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("family", ["phi", "gpt_neox"])
def test_greedy_tokens_through_edge_and_cloud_equal_the_whole_model(family):
    ckpt = tiny_checkpoint(family, seed=3)
    prompt = [1, 7, 3, 9]
    full, ids = full_model(ckpt), list(prompt)
    with torch.no_grad():          # plain argmax, no generate() logits processors
        for _ in range(STEPS):
            ids.append(int(full(torch.tensor([ids])).logits[0, -1].argmax()))
    ref = ids[len(prompt):]
    assert len(set(ref)) > 1       # a degenerate reference would prove little
    engine = LLMEngine(ckpt, LLMEngineConfig(), f"tiny-{family}")

    async def run(k, link):
        edge = LLMEdge(EdgeLM(ckpt, k), ckpt.fingerprint, _IdsTokenizer(),
                       GenerateConfig(codec="fp32", timeout_s=30.0), link)
        return [ev async for ev in edge.generate(prompt, STEPS, stop_at_eos=False)]

    async def both():            # one event loop: the engine lives on it, as in a daemon
        async with local_cloud(engine) as link:
            return {k: await run(k, link) for k in (1, num_layers(ckpt.config) - 1)}

    for k, events in asyncio.run(both()).items():
        assert [e.token for e in events] == ref, (family, k)
        assert all(e.source == "cloud" for e in events), [e.source for e in events]


def test_gpt_neox_folder_with_legacy_head_name_splits_like_the_model(tmp_path):
    """A save_pretrained folder whose LM head is stored as ``embed_out`` (Pythia checkpoints)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from tether.partitioner.llm import open_llm, split_llm

    from .llm_tiny import tiny_config
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neox")).eval()
    model.save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    state = load_file(str(weights))
    state = {("embed_out." + k[len("lm_head."):] if k.startswith("lm_head.") else k): v
             for k, v in state.items()}
    assert "embed_out.weight" in state
    save_file(state, str(weights), metadata={"format": "pt"})
    ckpt = open_llm(tmp_path)
    edge, cloud = split_llm(ckpt, 2)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        got = cloud(edge(ids, edge.new_cache(), 0), cloud.new_cache(), last_only=False)
        torch.testing.assert_close(got, model(ids).logits, atol=1e-4, rtol=1e-4)
