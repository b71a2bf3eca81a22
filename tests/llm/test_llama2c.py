"""The llama2.c loader and tokenizer reproduce the reference figures of the shared assets."""

from __future__ import annotations

import struct

import pytest
import torch
import torch.nn.functional as F

from tether.core.errors import UnknownModelError, WeightsError
from tether.partitioner.llm import Llama2cTokenizer, StreamDecoder, open_llm, read_llama2c

REFERENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
             "the park. One day, she saw a big, red ball.")


def test_greedy_sample_from_bos_matches_llama2c(stories, stories_full):
    out = stories_full.generate(torch.tensor([[1]]), max_new_tokens=48, do_sample=False)
    text = stories.tokenizer().decode(out[0].tolist())
    assert text.startswith(REFERENCE)


def test_loss_on_tinystories_sample_is_1_266(stories, stories_full, stories_texts):
    tok = stories.tokenizer()
    total = count = 0
    assert len(stories_texts) == 5
    for story in stories_texts:
        ids = torch.tensor([tok.encode(story)])
        assert ids[0, 0] == tok.bos_id
        with torch.no_grad():
            logits = stories_full(ids).logits[0]
        total += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert total / count == pytest.approx(1.266, abs=0.0015)


def test_config_matches_the_documented_architecture(stories, stories_full):
    cfg = stories.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.tie_word_embeddings
    assert sum(p.numel() for p in stories_full.parameters()) == 260_032


def test_tokenizer_round_trips_text_with_bytes_and_newlines(stories):
    tok = stories.tokenizer()
    text = "Tom said, “Hi!”\nThe café was open. 12345 ☃"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) < len(text.encode()) + 2
    assert tok.decode(ids) == text
    stream = StreamDecoder(tok, prev=ids[0])
    assert "".join(stream.feed(t) for t in ids[1:]) == text


def test_tokenizer_merges_common_words(stories):
    tok = stories.tokenizer()
    ids = tok.encode("Once upon a time", bos=False)
    assert len(ids) <= 5
    assert tok.decode(ids) == " Once upon a time"   # the dummy-prefix space stays without BOS


def test_truncated_checkpoint_is_a_weights_error(stories, tmp_path):
    src = stories.source["path"]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(open(src, "rb").read()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        read_llama2c(bad)
    (tmp_path / "hdr.bin").write_bytes(struct.pack("<7i", 64, 0, 5, 8, 4, 512, 512))
    with pytest.raises(WeightsError, match="implausible"):
        read_llama2c(tmp_path / "hdr.bin")


def test_bad_tokenizer_and_missing_checkpoint(tmp_path):
    (tmp_path / "tok.bin").write_bytes(struct.pack("<i", 7) + struct.pack("<fi", 0.0, 99) + b"ab")
    with pytest.raises(WeightsError):
        Llama2cTokenizer.load(tmp_path / "tok.bin")
    with pytest.raises(UnknownModelError, match="not found"):
        open_llm(tmp_path / "nope.bin")
