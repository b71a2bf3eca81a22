"""Fixtures of the LLM split tests: the stories260K checkpoint and tiny models of each family."""

from __future__ import annotations

import pytest
import torch

from tether.partitioner.llm import full_model, open_llm


@pytest.fixture(scope="session")
def stories(assets):
    """The real stories260K llama2.c checkpoint (+ tok512 tokenizer)."""
    return open_llm(assets / "tinyllm" / "stories260K.bin")


@pytest.fixture(scope="session")
def stories_full(stories):
    return full_model(stories)


@pytest.fixture(scope="session")
def stories_texts(assets):
    from tether.partitioner.llm import split_stories
    return split_stories((assets / "tinyllm" / "text" / "cs336_tinystories_sample.txt").read_text())


@pytest.fixture(autouse=True)
def _one_thread():
    """Seven engineers share two cores: one intra-op thread is much faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def exit_training_tokens(assets, stories):
    """Training text for exit heads: the validation head (never the evaluation sample)."""
    from tether.partitioner.llm import encode_texts, split_paragraphs
    text = (assets / "tinyllm" / "text" / "tinystories_validation_head.txt").read_text()
    return encode_texts(stories.tokenizer(), split_paragraphs(text, 60))
