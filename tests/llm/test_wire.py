"""Per-token hidden-state codecs: sizes, error bounds, hostile payloads, perplexity change."""

from __future__ import annotations

import math

import pytest
import torch

from tether.core.errors import PayloadError, UnknownCodecError
from tether.partitioner.llm import (HIDDEN_CODECS, encode_texts, make_hidden_codec, split_llm,
                                    split_loss)


@pytest.mark.parametrize("codec_id", sorted(HIDDEN_CODECS))
def test_round_trip_error_and_size(codec_id):
    torch.manual_seed(0)
    h = torch.randn(7, 65) * torch.linspace(0.1, 30, 7).unsqueeze(1)   # rows of varied scale
    codec = make_hidden_codec(codec_id)
    header, frames = codec.encode(h)
    out = codec.decode(header, frames, dim=65)
    assert out.shape == (7, 65) and out.dtype == torch.float32
    bits = HIDDEN_CODECS[codec_id][0]
    rel = ((out - h).abs().amax(dim=1) / h.abs().amax(dim=1)).max().item()
    assert rel <= {32: 0.0, 16: 1e-3, 8: 0.5 / 127 + 1e-3, 4: 0.5 / 7 + 1e-3}[bits]
    if "zlib" not in codec_id:
        assert sum(len(f) for f in frames) == 7 * codec.bytes_per_token(65)
    assert codec.bytes_per_token(64) == {32: 256, 16: 128, 8: 66, 4: 34}[bits]


def test_hostile_payloads_are_payload_errors():
    codec = make_hidden_codec("int8")
    header, frames = codec.encode(torch.randn(2, 16))
    with pytest.raises(PayloadError, match="expected"):
        codec.decode(header, [frames[0][:-1], frames[1]])
    with pytest.raises(PayloadError, match="does not match"):
        codec.decode(header, frames, dim=32)
    with pytest.raises(PayloadError, match="tokens"):
        codec.decode({"n": 10**9, "d": 16}, frames)
    with pytest.raises(PayloadError):
        codec.decode({"n": "2", "d": 16}, frames)
    with pytest.raises(PayloadError, match="non-finite"):
        codec.decode(header, [frames[0], b"\x00\x7c\x00\x7c"])          # fp16 +inf scales
    z = make_hidden_codec("fp16+zlib")
    zh, zf = z.encode(torch.randn(2, 16))
    with pytest.raises(PayloadError, match="zlib"):
        z.decode(zh, [b"not zlib"])
    with pytest.raises(PayloadError, match="raw"):
        z.decode({"n": 2, "d": 16}, zf)
    with pytest.raises(UnknownCodecError, match="int8"):
        make_hidden_codec("int3")


def test_non_finite_hidden_states_do_not_poison_the_wire():
    h = torch.tensor([[1.0, float("nan"), float("inf"), -2.0]])
    for cid in ("fp16", "int8"):
        c = make_hidden_codec(cid)
        assert torch.isfinite(c.decode(*c.encode(h))).all()


def test_int8_perplexity_increase_within_one_percent(stories, stories_texts):
    toks = encode_texts(stories.tokenizer(), stories_texts)
    edge, cloud = split_llm(stories, 2)
    base = split_loss(edge, cloud, toks)
    assert base == pytest.approx(1.266, abs=0.0015)
    fp16 = split_loss(edge, cloud, toks, make_hidden_codec("fp16"))
    int8 = split_loss(edge, cloud, toks, make_hidden_codec("int8"))
    int4 = split_loss(edge, cloud, toks, make_hidden_codec("int4"))
    assert math.exp(int8 - base) - 1 <= 0.01
    assert abs(fp16 - base) < 1e-3
    assert int4 > int8          # the coarser codec costs measurably more
