"""Tiny causal LMs of each supported family, built from configs (random weights)."""

from __future__ import annotations

import torch

from tether.partitioner.llm import StateDictCheckpoint


def tiny_config(family: str):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "phi":
        from transformers import PhiConfig
        return PhiConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                         partial_rotary_factor=0.5)
    if family == "gpt_neox":
        from transformers import GPTNeoXConfig
        return GPTNeoXConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                             rotary_pct=0.25, tie_word_embeddings=False)
    return GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                      bos_token_id=1, eos_token_id=2)


def tiny_checkpoint(family: str, seed: int = 0) -> StateDictCheckpoint:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    return StateDictCheckpoint.from_model(model)


FAMILY_NAMES = ("llama", "qwen2", "mistral", "gpt2", "phi", "gpt_neox")
