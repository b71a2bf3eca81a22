"""LLM hidden states through tether.codecs: sizes, error bounds, hostile payloads, perplexity."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

from tether.codecs import TENSOR_CODEC_IDS, decode_hidden, hidden_codec, wire_roundtrip
from tether.core.errors import PayloadError, UnknownCodecError
from tether.partitioner.llm import encode_texts, split_llm, split_loss

#: Worst per-token error relative to the token's absmax, by the codec's base.
BOUND = {"fp32": 0.0, "fp16": 1e-3, "int8-token": 0.5 / 127 + 1e-3, "int4-token": 0.5 / 7 + 1e-3}
#: Payload bytes of one token of a 64-wide model, by the codec's base (no lossless stage).
BYTES_PER_TOKEN_64 = {"fp32": 256, "fp16": 128, "int8-token": 66, "int4-token": 34}


def _peer(codec, hidden: torch.Tensor, dim: int, tokens: int | None = None) -> torch.Tensor:
    """What the cloud decodes: header through msgpack, frames as bytes."""
    enc = codec.encode(hidden)
    header = msgpack.unpackb(msgpack.packb(enc.header, use_bin_type=True), raw=False)
    return decode_hidden(codec, header, [bytes(f) for f in enc.payload], dim, tokens)


@pytest.mark.parametrize("codec_id", [c for c in TENSOR_CODEC_IDS if "channel" not in c])
def test_round_trip_error_and_size(codec_id):
    torch.manual_seed(0)
    h = torch.randn(7, 65) * torch.linspace(0.1, 30, 7).unsqueeze(1)   # rows of varied scale
    codec = hidden_codec(codec_id)
    out = _peer(codec, h, 65, 7)
    assert out.shape == (7, 65) and out.dtype == torch.float32
    base = codec_id.split("+")[0]
    rel = ((out - h).abs().amax(dim=1) / h.abs().amax(dim=1)).max().item()
    assert rel <= BOUND[base]
    if "+" not in codec_id:
        one = codec.encode(torch.randn(1, 64)).payload_bytes
        assert one == BYTES_PER_TOKEN_64[base]
        assert codec.encode(h).payload_bytes == 7 * codec.encode(h[:1]).payload_bytes


def test_per_token_beats_per_channel_on_tokens_of_varied_scale():
    torch.manual_seed(0)
    h = torch.randn(7, 65) * torch.linspace(0.1, 30, 7).unsqueeze(1)
    err = {cid: ((_peer(hidden_codec(cid), h, 65) - h).abs().amax(dim=1) /
                 h.abs().amax(dim=1)).max().item() for cid in ("int8-token", "int8-channel")}
    assert err["int8-token"] * 10 < err["int8-channel"]
    one = torch.randn(1, 64)
    token, channel = hidden_codec("int8-token").encode(one), hidden_codec("int8-channel").encode(one)
    assert token.payload_bytes + token.header_bytes < channel.payload_bytes + channel.header_bytes


def test_old_llm_names_mean_per_token():
    for old, new in (("int8", "int8-token"), ("int4", "int4-token"), ("int8+zlib", "int8-token+zlib")):
        assert hidden_codec(old).codec_id == new
    with pytest.raises(UnknownCodecError, match="int8-token"):
        hidden_codec("int3")
    with pytest.raises(UnknownCodecError, match="LLM split codecs"):
        hidden_codec("jpeg75")                 # image codecs do not carry hidden states


def test_hostile_payloads_are_payload_errors():
    codec = hidden_codec("int8-token")
    enc = codec.encode(torch.randn(2, 16))
    header, frames = enc.header, [bytes(f) for f in enc.payload]
    with pytest.raises(PayloadError, match="expected"):
        decode_hidden(codec, header, [frames[0][:-1], frames[1]], 16)
    with pytest.raises(PayloadError, match="does not match"):
        decode_hidden(codec, header, frames, 32)
    with pytest.raises(PayloadError, match="tokens"):
        decode_hidden(codec, header, frames, 16, tokens=3)
    with pytest.raises(PayloadError, match="limit"):
        decode_hidden(codec, {**header, "shape": [10**9, 16]}, frames, 16)
    for shape in ("2", [2, "16"], [0, 16], [1, 2, 16], None):
        with pytest.raises(PayloadError):
            decode_hidden(codec, {**header, "shape": shape}, frames, 16)
    with pytest.raises(PayloadError, match="non-finite"):
        decode_hidden(codec, header, [frames[0], b"\x00\x7c\x00\x7c"], 16)   # fp16 +inf scales
    with pytest.raises(PayloadError, match="encoded with codec"):
        decode_hidden(hidden_codec("int4-token"), header, frames, 16)
    with pytest.raises(PayloadError):
        decode_hidden(codec, ["int8-token"], frames, 16)
    z = hidden_codec("fp16+zlib")
    zenc = z.encode(torch.randn(2, 16))
    with pytest.raises(PayloadError, match="zlib"):
        decode_hidden(z, zenc.header, [b"not zlib"], 16)
    with pytest.raises(PayloadError, match="raw"):
        decode_hidden(z, {k: v for k, v in zenc.header.items() if k != "raw_sizes"},
                      zenc.payload, 16)


def test_odd_and_empty_widths_and_dtypes_survive():
    c4 = hidden_codec("int4-token")
    h = torch.randn(3, 5)
    assert (_peer(c4, h, 5) - h).abs().max() <= h.abs().max() * BOUND["int4-token"]
    zero = torch.zeros(2, 8)
    assert torch.equal(_peer(hidden_codec("int8-token"), zero, 8), zero)
    empty = hidden_codec("int8-token").encode(torch.zeros(0, 8))
    assert hidden_codec("int8-token").decode(empty.header, empty.payload).shape == (0, 8)
    half = torch.randn(2, 8).half()
    enc = c4.encode(half)
    assert c4.decode(enc.header, enc.payload).dtype == torch.float16


def test_non_finite_hidden_states_do_not_poison_the_wire():
    h = torch.tensor([[1.0, float("nan"), float("inf"), -2.0]])
    for cid in ("fp16", "int8-token", "int4-token"):
        out = _peer(hidden_codec(cid), h, 4)
        assert torch.isfinite(out).all() and out[0, 1].abs() < 1e-3   # NaN -> 0


def test_int8_perplexity_increase_within_one_percent(stories, stories_texts):
    toks = encode_texts(stories.tokenizer(), stories_texts)
    edge, cloud = split_llm(stories, 2)
    base = split_loss(edge, cloud, toks)
    assert base == pytest.approx(1.266, abs=0.0015)
    loss = {cid: split_loss(edge, cloud, toks, wire_roundtrip(hidden_codec(cid)))
            for cid in ("fp16", "int8-token", "int4-token")}
    assert math.exp(loss["int8-token"] - base) - 1 <= 0.01
    assert abs(loss["fp16"] - base) < 1e-3
    assert loss["int4-token"] > loss["int8-token"]     # the coarser codec costs measurably more
