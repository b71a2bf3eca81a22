"""Input codecs (JPEG, WebP, PNG) for full offload."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tether.core.errors import CodecError, PayloadError
from tether.codecs import make_codec


def _images(n: int = 3, c: int = 3, h: int = 32, w: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.linspace(0, 255, h * w).reshape(1, 1, h, w).expand(n, c, h, w)
    noise = torch.randint(0, 40, (n, c, h, w), generator=g)
    return (base * 0.8 + noise).clamp(0, 255).to(torch.uint8)


def test_png_is_lossless_for_uint8_and_float() -> None:
    x = _images()
    codec = make_codec("png")
    enc = codec.encode(x)
    assert len(enc.payload) == 3
    assert torch.equal(codec.decode(enc.header, enc.payload), x)
    xf = x.float() / 255
    enc = codec.encode(xf)
    y = codec.decode(enc.header, enc.payload)
    assert y.dtype == torch.float32 and torch.allclose(y, xf, atol=1e-6)


@pytest.mark.parametrize("codec_id", ["jpeg50", "jpeg95", "webp50", "webp90"])
def test_lossy_image_codecs_are_close_and_smaller_at_lower_quality(codec_id: str) -> None:
    x = _images()
    codec = make_codec(codec_id)
    enc = codec.encode(x)
    y = codec.decode(enc.header, [bytes(f) for f in enc.payload])
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert (y.float() - x.float()).abs().mean() < 25
    raw = enc.payload_bytes
    lower = make_codec(codec_id[:4] + "10").encode(x).payload_bytes
    assert lower < raw


def test_grayscale_images() -> None:
    x = _images(c=1)
    codec = make_codec("png")
    enc = codec.encode(x)
    assert torch.equal(codec.decode(enc.header, enc.payload), x)


def test_bad_inputs_to_encode() -> None:
    with pytest.raises(CodecError, match="NCHW"):
        make_codec("jpeg90").encode(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(CodecError, match="NCHW"):
        make_codec("png").encode(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(CodecError):
        make_codec("png").encode(torch.zeros(1, 3, 8, 8, dtype=torch.int32))


@pytest.mark.parametrize("codec_id", ["jpeg75", "webp75", "png"])
def test_corrupt_truncated_and_mismatched_frames(codec_id: str) -> None:
    codec = make_codec(codec_id)
    enc = codec.encode(_images(n=1))
    frame = bytes(enc.payload[0])
    with pytest.raises(PayloadError):
        codec.decode(enc.header, [frame[: len(frame) // 3]])
    with pytest.raises(PayloadError):
        codec.decode(enc.header, [b"\x00" * 64])
    with pytest.raises(PayloadError, match="header says"):
        codec.decode({**enc.header, "shape": [1, 3, 16, 16]}, enc.payload)
    with pytest.raises(PayloadError, match="frame"):
        codec.decode(enc.header, enc.payload * 2)
    with pytest.raises(PayloadError):
        codec.decode({**enc.header, "shape": [1, 3, 100000, 100000]}, enc.payload)


def test_other_format_in_frame_is_rejected() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (24, 32)).save(buf, format="PNG")
    codec = make_codec("jpeg90")
    header = {"codec": "jpeg90", "shape": [1, 3, 32, 24], "dtype": "uint8"}
    with pytest.raises(PayloadError):
        codec.decode(header, [buf.getvalue()])


def test_decompression_bomb_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")   # small file, 9 MPixel image
    codec = make_codec("png")
    with pytest.raises(PayloadError):
        codec.decode({"codec": "png", "shape": [1, 1, 32, 32], "dtype": "uint8"}, [buf.getvalue()])
