"""Decoder-only LLM split: llama2.c/HF checkpoints, edge/cloud parts, early exits.

What crosses the cut is encoded by ``tether.codecs`` (``hidden_codec``, ``decode_hidden``).

Imported by its full path (``tether.partitioner.llm``); transformers is imported lazily.
"""

from tether.partitioner.llm.checkpoint import (
    HFDirCheckpoint, Llama2cCheckpoint, LLMCheckpoint, StateDictCheckpoint, open_llm,
)
from tether.partitioner.llm.evaluate import (
    ExitPoint, calibrate_threshold, encode_texts, exit_curve, split_loss, split_paragraphs,
    split_stories,
)
from tether.partitioner.llm.exits import (
    ExitHead, load_exit_head, new_exit_head, read_exit_meta, save_exit_head, train_exit_head,
)
from tether.partitioner.llm.llama2c import (
    Llama2cTokenizer, StreamDecoder, load_llama2c, read_llama2c,
)
from tether.partitioner.llm.sampling import (
    SamplingParams, choose_token, choose_tokens, generate_whole, sampling_probs, uniform,
)
from tether.partitioner.llm.split import (
    FAMILIES, CloudLM, EdgeLM, family_of, full_model, num_layers, parse_split, split_llm,
    split_name,
)

__all__ = [
    "FAMILIES", "CloudLM", "EdgeLM", "ExitHead", "ExitPoint", "HFDirCheckpoint",
    "LLMCheckpoint", "Llama2cCheckpoint", "Llama2cTokenizer", "SamplingParams",
    "StateDictCheckpoint", "StreamDecoder", "calibrate_threshold", "choose_token",
    "choose_tokens", "encode_texts", "generate_whole", "sampling_probs", "uniform",
    "exit_curve", "family_of", "load_exit_head", "new_exit_head", "save_exit_head",
    "train_exit_head", "full_model", "load_llama2c",
    "num_layers", "open_llm", "parse_split", "read_exit_meta", "read_llama2c", "split_llm", "split_loss",
    "split_name", "split_paragraphs", "split_stories",
]
