"""Input codecs for full offload: JPEG, WebP and PNG of uint8 images (Pillow).

``encode`` takes an NCHW image batch (C = 1 or 3), either uint8 or float in [0, 1] (the
models' input); each image becomes one payload frame. ``decode`` returns the same dtype
family: uint8 stays uint8, float comes back as float32 in [0, 1]. Image sizes are checked
against the header *before* Pillow decodes pixels (no decompression bombs).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from tether.core.errors import CodecError, PayloadError
from tether.codecs.base import (
    DTYPE_NAMES, Codec, EncodedTensor, Frame, check_dtype, check_frames, check_header,
    check_shape, require_tensor,
)

MAX_SIDE = 8192
FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


class ImageCodec(Codec):
    """One image format at one quality (``quality`` is ignored by PNG, which is lossless)."""

    def __init__(self, fmt: str, quality: int | None = None) -> None:
        if fmt not in FORMATS:
            raise CodecError(f"unknown image format {fmt!r}; expected one of {sorted(FORMATS)}")
        if fmt != "png" and (quality is None or not 1 <= quality <= 100):
            raise CodecError(f"{fmt} quality must be 1..100, got {quality!r}")
        self.fmt = fmt
        self.quality = quality
        self.codec_id = fmt if fmt == "png" else f"{fmt}{quality}"
        self.lossless = fmt == "png"

    def _save_kwargs(self) -> dict[str, Any]:
        if self.fmt == "png":
            return {"optimize": True}
        if self.fmt == "webp":
            return {"quality": self.quality, "method": 4}
        return {"quality": self.quality}

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        t = require_tensor(tensor, floating=False)
        if t.dim() != 4 or t.shape[1] not in (1, 3):
            raise CodecError(f"image codecs take NCHW images with 1 or 3 channels, got "
                             f"shape {list(t.shape)}")
        if t.dtype != torch.uint8:
            if not t.is_floating_point():
                raise CodecError(f"image codecs take uint8 or float [0,1] images, got {t.dtype}")
            t = (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        frames = [self._encode_one(img) for img in t]
        header = {"codec": self.codec_id, "shape": list(tensor.shape),
                  "dtype": DTYPE_NAMES[tensor.dtype] if tensor.dtype == torch.uint8 else "float32"}
        return EncodedTensor(header, frames)

    def _encode_one(self, img: torch.Tensor) -> bytes:
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr,
                              mode="L" if arr.shape[2] == 1 else "RGB")
        buf = io.BytesIO()
        pil.save(buf, format=FORMATS[self.fmt], **self._save_kwargs())
        return buf.getvalue()

    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        check_header(header, self.codec_id)
        shape = check_shape(header.get("shape"))
        dtype = check_dtype(header.get("dtype"), ("uint8", "float32"))
        if len(shape) != 4 or shape[1] not in (1, 3) or max(shape[2:]) > MAX_SIDE:
            raise PayloadError(f"image header shape must be [N, 1|3, H, W] with sides <= "
                               f"{MAX_SIDE}, got {list(shape)}")
        frames = check_frames(payload, shape[0])
        imgs = [self._decode_one(f, shape[1], shape[2], shape[3]) for f in frames]
        out = torch.from_numpy(np.stack(imgs)) if imgs else torch.empty(shape, dtype=torch.uint8)
        out = out.permute(0, 3, 1, 2).contiguous()
        return out if dtype == "uint8" else out.float().div_(255.0)

    def _decode_one(self, frame: Frame, channels: int, height: int, width: int) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                pil = Image.open(io.BytesIO(bytes(frame)), formats=[FORMATS[self.fmt]])
                if pil.size != (width, height):
                    raise PayloadError(f"{self.fmt} frame is {pil.size[0]}x{pil.size[1]}, "
                                       f"header says {width}x{height}")
                pil = pil.convert("L" if channels == 1 else "RGB")
                arr = np.asarray(pil, dtype=np.uint8)
        except PayloadError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            raise PayloadError(f"corrupt {self.fmt} frame: {exc}") from exc
        return arr.reshape(height, width, channels)
