"""Baseline codecs: round trips on awkward tensors and clear errors on bad payloads."""

from __future__ import annotations

import zlib

import msgpack
import pytest
import torch

from tether.core.errors import CodecError, PayloadError, UnknownCodecError
from tether.codecs import EncodedTensor, make_codec

TENSOR_IDS = ["fp32", "fp16", "int8-channel", "int8-token", "int4-token", "fp32+zlib", "fp16+zlib",
              "int8-channel+zlib", "int4-token+zlib", "fp32+zstd", "fp16+zstd", "int8-channel+zstd",
              "int8-token+zstd"]


def _roundtrip(codec_id: str, x: torch.Tensor) -> tuple[torch.Tensor, EncodedTensor]:
    codec = make_codec(codec_id)
    enc = codec.encode(x)
    # what a peer would get: frames as bytes, header through msgpack
    header = msgpack.unpackb(msgpack.packb(enc.header, use_bin_type=True), raw=False)
    return codec.decode(header, [bytes(f) for f in enc.payload]), enc


def _awkward() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "features": torch.randn(2, 16, 8, 8, generator=g).relu(),
        "vector": torch.randn(7, generator=g),
        "single": torch.tensor([3.5]),
        "empty_batch": torch.zeros(0, 4, 3, 3),
        "constant_channel": torch.cat([torch.ones(1, 1, 4, 4) * 2.5,
                                       torch.randn(1, 1, 4, 4, generator=g)], dim=1),
        "negative_offset": torch.rand(1, 3, 5, 5, generator=g) * 0.01 + 1000.0,
        "non_contiguous": torch.randn(3, 8, 4, 4, generator=g).transpose(2, 3),
        "float64": torch.randn(2, 3, 4, dtype=torch.float64, generator=g),
        "float16": torch.randn(2, 3, 4, generator=g).half(),
        "tokens_like": torch.randn(1, 5, 64, generator=g),
    }


@pytest.mark.parametrize("codec_id", TENSOR_IDS)
@pytest.mark.parametrize("name", sorted(_awkward()))
def test_roundtrip_keeps_shape_dtype_and_values(codec_id: str, name: str) -> None:
    x = _awkward()[name]
    y, enc = _roundtrip(codec_id, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = x.double()
    if not ref.numel():
        return
    absmax = ref.abs().max().item()
    span = max(ref.max().item(), 0.0) - min(ref.min().item(), 0.0)   # int8 range includes 0
    tol = {"fp32": 0.0 if x.dtype in (torch.float32, torch.float16) else 1e-6 * absmax,
           "fp16": 0.0 if x.dtype == torch.float16 else 1e-3 * max(1.0, absmax),
           "int8-channel": span / 255 / 2 + 1e-6 * max(1.0, absmax),
           "int8-token": absmax * (0.5 / 127 + 1e-3),     # per row: never worse than the absmax
           "int4-token": absmax * (0.5 / 7 + 1e-3)}[codec_id.split("+")[0]]
    assert (y.double() - ref).abs().max().item() <= tol
    assert enc.header_bytes == len(msgpack.packb(enc.header, use_bin_type=True))


def test_sizes_follow_the_dtype_on_the_wire() -> None:
    x = torch.randn(1, 32, 16, 16)
    ids = ("fp32", "fp16", "int8-channel", "int8-token", "int4-token")
    sizes = {cid: make_codec(cid).encode(x).payload_bytes for cid in ids}
    rows = 32 * 16                                                  # rows of the last dim
    assert sizes == {"fp32": 32768, "fp16": 16384, "int8-channel": 8192,
                     "int8-token": 8192 + 2 * rows, "int4-token": 4096 + 2 * rows}


def test_zlib_shrinks_sparse_features_and_stays_exact() -> None:
    x = torch.randn(1, 32, 16, 16).relu()
    x[:, ::2] = 0
    for base in ("fp32", "int8-channel", "int8-token"):
        plain, packed = make_codec(base).encode(x), make_codec(base + "+zlib").encode(x)
        assert packed.payload_bytes < plain.payload_bytes
        a = make_codec(base).decode(plain.header, plain.payload)
        b = make_codec(base + "+zlib").decode(packed.header, packed.payload)
        assert torch.equal(a, b)


def test_zstd_bombs_and_corruption_are_rejected() -> None:
    import zstandard
    codec = make_codec("int8-channel+zstd")
    enc = codec.encode(torch.randn(1, 2, 4, 4))
    bomb = zstandard.ZstdCompressor().compress(bytes(10_000_000))
    for bad in ([bomb], [b"not zstd at all"], [bytes(enc.payload[0])[:-3]]):
        with pytest.raises(PayloadError, match="zstd"):
            codec.decode(enc.header, bad)
    with pytest.raises(PayloadError):
        codec.decode({**enc.header, "raw_sizes": [10**12]}, enc.payload)


def test_zstd_beats_or_matches_zlib_on_sparse_features() -> None:
    x = torch.randn(1, 32, 16, 16).relu()
    x[:, ::2] = 0
    zl, zs = make_codec("int8-channel+zlib").encode(x), make_codec("int8-channel+zstd").encode(x)
    assert zs.payload_bytes <= zl.payload_bytes * 1.05
    plain = make_codec("int8-channel").encode(x)
    assert torch.equal(make_codec("int8-channel+zstd").decode(zs.header, zs.payload),
                       make_codec("int8-channel").decode(plain.header, plain.payload))


def test_fp16_clamps_instead_of_overflowing() -> None:
    x = torch.tensor([[1e6, -1e6, 1.0, float("inf"), float("nan")]])
    y, _ = _roundtrip("fp16", x)
    assert torch.isfinite(y).all() and y[0, 0] == 65504.0 and y[0, 1] == -65504.0
    assert y[0, 3] == 65504.0 and y[0, 4] == 0.0                   # inf clamps, NaN -> 0


def test_int8_handles_nan_and_inf() -> None:
    x = torch.tensor([[0.0, 1.0, float("nan"), float("inf"), -float("inf"), -2.0]]).reshape(1, 1, 6)
    y, _ = _roundtrip("int8-channel", x)
    assert torch.isfinite(y).all()
    assert y[0, 0, 2].abs() < 0.02                      # NaN -> 0
    assert y[0, 0, 3] == y.max() and y[0, 0, 4] == y.min()


def test_int8_is_per_channel() -> None:
    x = torch.stack([torch.linspace(0, 1, 64), torch.linspace(0, 1000, 64)]).reshape(1, 2, 8, 8)
    y, enc = _roundtrip("int8-channel", x)
    assert len(enc.header["scale"]) == 8 and len(enc.header["zero_point"]) == 2   # f32 + i8
    assert (y[0, 0] - x[0, 0]).abs().max() < 1.0 / 255 + 1e-6   # not the 1000-wide step


@pytest.mark.parametrize("codec_id", TENSOR_IDS)
def test_truncated_and_padded_payloads_are_rejected(codec_id: str) -> None:
    codec = make_codec(codec_id)
    enc = codec.encode(torch.randn(1, 4, 8, 8))
    frame = bytes(enc.payload[0])
    for bad in (frame[:-1], frame[: len(frame) // 2], frame + b"\0", b""):
        with pytest.raises(PayloadError):
            codec.decode(enc.header, [bad])
    with pytest.raises(PayloadError, match="frame"):
        codec.decode(enc.header, [frame, frame])
    with pytest.raises(PayloadError):
        codec.decode(enc.header, [])


@pytest.mark.parametrize("codec_id", TENSOR_IDS)
def test_wrong_codec_id_is_named(codec_id: str) -> None:
    other = "fp16" if codec_id != "fp16" else "fp32"
    enc = make_codec(other).encode(torch.randn(2, 3))
    with pytest.raises(PayloadError, match=f"encoded with codec '{other}'"):
        make_codec(codec_id).decode(enc.header, enc.payload)


@pytest.mark.parametrize("field,value", [
    ("shape", [-1, 4]), ("shape", "12"), ("shape", [1 << 20, 1 << 20]), ("shape", [True, 2]),
    ("shape", [1] * 20), ("dtype", "object"), ("dtype", None),
])
def test_hostile_headers_are_rejected_before_allocating(field: str, value: object) -> None:
    codec = make_codec("fp32")
    enc = codec.encode(torch.randn(2, 3))
    with pytest.raises(PayloadError):
        codec.decode({**enc.header, field: value}, enc.payload)


@pytest.mark.parametrize("scale", [[0.0], [float("nan")], [-1.0], ["a"], [1.0, 2.0], None,
                                   b"\0\0\0\0", b"\0\0\x80\x7f", b"\0\0\x80", [1.0] * 9])
def test_int8_rejects_bad_quantisation_params(scale: object) -> None:
    codec = make_codec("int8-channel")
    enc = codec.encode(torch.randn(4))
    with pytest.raises(PayloadError, match="scale"):
        codec.decode({**enc.header, "scale": scale}, enc.payload)


def test_non_dict_header_and_non_bytes_frames() -> None:
    codec = make_codec("fp32")
    enc = codec.encode(torch.randn(2, 3))
    with pytest.raises(PayloadError):
        codec.decode(["fp32"], enc.payload)  # type: ignore[arg-type]
    with pytest.raises(PayloadError):
        codec.decode(enc.header, [12345])  # type: ignore[list-item]


def test_zlib_bombs_and_corruption_are_rejected() -> None:
    codec = make_codec("int8-channel+zlib")
    enc = codec.encode(torch.randn(1, 2, 4, 4))
    bomb = zlib.compress(bytes(10_000_000))
    with pytest.raises(PayloadError):
        codec.decode(enc.header, [bomb])
    with pytest.raises(PayloadError):
        codec.decode({**enc.header, "raw_sizes": [10**12]}, enc.payload)
    with pytest.raises(PayloadError, match="zlib"):
        codec.decode(enc.header, [b"not zlib at all"])
    with pytest.raises(PayloadError):
        codec.decode(enc.header, [bytes(enc.payload[0])[:-3]])


@pytest.mark.parametrize("codec_id", ["fp8", "int4", "png+zlib", "jpeg0", "jpeg101", "webp",
                                      "fp16+lz4", "bottleneck-b0.01", "", "int8+zlib+zlib"])
def test_unknown_codec_ids_name_the_known_ones(codec_id: str) -> None:
    with pytest.raises(UnknownCodecError, match="known ids: fp32, fp16, int8-channel, int8-token"):
        make_codec(codec_id)


def test_encode_rejects_non_float_tensors() -> None:
    with pytest.raises(CodecError, match="floating"):
        make_codec("int8-channel").encode(torch.arange(10))
    with pytest.raises(CodecError):
        make_codec("fp16").encode([1.0, 2.0])  # type: ignore[arg-type]
