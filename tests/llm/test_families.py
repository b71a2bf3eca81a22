"""Every supported family through edge + in-process cloud engine: greedy tokens, and seeded
sampled tokens (temperature, top-k, top-p), equal the whole model's; the edge alone and a
stream that loses its cloud midway draw the same tokens too."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tether.cloud.llm import LLMEngine, LLMEngineConfig
from tether.core import protocol as P
from tether.edge.llm import GenerateConfig, LLMEdge
from tether.partitioner.llm import EdgeLM, SamplingParams, full_model, generate_whole, num_layers

from .links import local_cloud
from .llm_tiny import FAMILY_NAMES, tiny_checkpoint

STEPS = 12
PROMPT = [1, 7, 3, 9]
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)


class _IdsTokenizer:
    """Token ids as text (the tiny configs have no tokenizer)."""

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _through_split(ckpt, splits, sampling=None, handler=None):
    """{k: [(token, source)]} from an edge at each split against one in-process engine."""
    async def run(link, k):
        edge = LLMEdge(EdgeLM(ckpt, k), ckpt.fingerprint, _IdsTokenizer(),
                       GenerateConfig(codec="fp32", timeout_s=30.0, retry_after_s=60.0), link)
        return [(e.token, e.source) async for e in
                edge.generate(PROMPT, STEPS, stop_at_eos=False, sampling=sampling)]

    async def all_splits():     # one event loop: the engine lives on it, as in a daemon
        engine = LLMEngine(ckpt, LLMEngineConfig(), "tiny")
        if handler is not None:
            engine.handle = handler(engine.handle)
        async with local_cloud(engine) as link:
            return {k: await run(link, k) for k in splits}
    return asyncio.run(all_splits())


@pytest.mark.parametrize("family", ["phi", "gpt_neox"])
def test_greedy_tokens_through_edge_and_cloud_equal_the_whole_model(family):
    ckpt = tiny_checkpoint(family, seed=3)
    full, ids = full_model(ckpt), list(PROMPT)
    with torch.no_grad():          # plain argmax, no generate() logits processors
        for _ in range(STEPS):
            ids.append(int(full(torch.tensor([ids])).logits[0, -1].argmax()))
    ref = ids[len(PROMPT):]
    assert len(set(ref)) > 1       # a degenerate reference would prove little
    assert generate_whole(full, PROMPT, STEPS) == ref        # temperature 0 is the argmax
    for k, events in _through_split(ckpt, (1, num_layers(ckpt.config) - 1)).items():
        assert [t for t, _ in events] == ref, (family, k)
        assert all(s == "cloud" for _, s in events), events
    cold = SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=9)   # filters ignored
    (events,) = _through_split(ckpt, (2,), cold).values()
    assert [t for t, _ in events] == ref


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_seeded_sampling_through_the_split_equals_the_whole_model(family):
    ckpt = tiny_checkpoint(family, seed=3)
    full = full_model(ckpt)
    ref = generate_whole(full, PROMPT, STEPS, SAMPLED)
    assert len(set(ref)) > STEPS // 2                          # really sampled, not stuck
    assert ref != generate_whole(full, PROMPT, STEPS)          # and not the greedy answer
    other = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1235)
    ref_other = generate_whole(full, PROMPT, STEPS, other)
    assert ref_other != ref                                    # the seed matters
    last = num_layers(ckpt.config)
    for k, events in _through_split(ckpt, (0, 1, last - 1), SAMPLED).items():
        assert [t for t, _ in events] == ref, (family, k)
        assert all(s == "cloud" for _, s in events), events
    (events,) = _through_split(ckpt, (2,), other).values()
    assert [t for t, _ in events] == ref_other


def test_an_unseeded_stream_records_its_seed_and_replays_from_it():
    ckpt = tiny_checkpoint("qwen2", seed=5)
    unseeded = SamplingParams(temperature=1.0, top_p=0.9)

    async def twice():
        engine = LLMEngine(ckpt, LLMEngineConfig(), "tiny")
        async with local_cloud(engine) as link:
            edge = LLMEdge(EdgeLM(ckpt, 2), ckpt.fingerprint, _IdsTokenizer(),
                           GenerateConfig(codec="fp32", timeout_s=30.0), link)
            runs = [[e.token async for e in edge.generate(PROMPT, STEPS, False,
                                                            sampling=unseeded)]
                    for _ in range(2)]
        return runs, [r.seed for r in edge.records]
    runs, seeds = asyncio.run(twice())
    assert None not in seeds and seeds[0] != seeds[1] and runs[0] != runs[1]
    full = full_model(ckpt)
    for tokens, seed in zip(runs, seeds):
        replay = SamplingParams(temperature=1.0, top_p=0.9, seed=seed)
        assert generate_whole(full, PROMPT, STEPS, replay) == tokens


def _fails_after(calls):
    """A cloud handler that answers ``calls`` messages, then reports itself unavailable."""
    def wrap(handle):
        seen = [0]

        async def handler(msg):
            seen[0] += 1
            if seen[0] > calls:
                return P.Error(msg.request_id, "unavailable", "cloud went away")
            return await handle(msg)
        return handler
    return wrap


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cloud_then_edge_alone_draw_the_whole_models_sampled_tokens(family):
    """Edge holding every layer: the cloud answers 5 tokens, then the edge (``local``) goes
    on with the same draws; with no cloud at all the edge alone gives them too."""
    ckpt = tiny_checkpoint(family, seed=4)
    ref = generate_whole(full_model(ckpt), PROMPT, STEPS, SAMPLED)
    last = num_layers(ckpt.config)
    (events,) = _through_split(ckpt, (last,), SAMPLED, _fails_after(5)).values()
    assert [s for _, s in events] == ["cloud"] * 5 + ["local"] * (STEPS - 5)
    assert [t for t, _ in events] == ref

    async def alone():
        edge = LLMEdge(EdgeLM(ckpt, last), ckpt.fingerprint, _IdsTokenizer(),
                       GenerateConfig(codec="fp32"))
        return [e.token async for e in edge.generate(PROMPT, STEPS, False, sampling=SAMPLED)]
    assert asyncio.run(alone()) == ref


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
