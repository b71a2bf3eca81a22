"""Phi and GPT-NeoX: split -> edge + in-process cloud engine -> greedy tokens equal the whole
model's (the families added to the embed -> blocks -> norm -> head split)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tether.cloud.llm import LLMEngine, LLMEngineConfig
from tether.edge.llm import GenerateConfig, LLMEdge, LocalSessionLink
from tether.partitioner.llm import EdgeLM, full_model, num_layers

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
    for k in (1, num_layers(ckpt.config) - 1):
        edge = LLMEdge(EdgeLM(ckpt, k), ckpt.fingerprint, _IdsTokenizer(),
                       GenerateConfig(codec="fp32", timeout_s=30.0), LocalSessionLink(engine.handle))

        async def run():
            return [ev async for ev in edge.generate(prompt, STEPS, stop_at_eos=False)]

        events = asyncio.run(run())
        assert [e.token for e in events] == ref, (family, k)
        assert all(e.source == "cloud" for e in events), [e.source for e in events]
