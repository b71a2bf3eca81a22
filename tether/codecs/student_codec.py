"""Runtime :class:`StudentCodec`: the edge encodes images, the cloud decodes split tensors.

``encode`` takes the model input (``[N, 3, H, W]`` floats in [0, 1]; the head is *not* run:
``replaces_head``), runs the student encoder (ONNX Runtime when the bundle has the export)
and entropy-codes the latent with the CDF tables stored in the weights file (integers,
loaded as they were saved, never rebuilt from floats). ``decode`` validates the frames and
returns the tensor the bundle's tail takes at the entry's split point.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch

from tether.core.errors import CodecError, PayloadError
from tether.codecs.base import (
    EncodedTensor, Frame, check_frames, check_header, check_shape, require_tensor,
)
from tether.codecs.bottleneck import MAX_BATCH, EntropyCodec
from tether.codecs.student import StudentConfig, StudentModel


class StudentCodec(EntropyCodec):
    """A trained, ``update()``-d :class:`StudentModel` behind the codec contract."""

    replaces_head = True
    model_class = StudentModel
    config_class = StudentConfig
    onnx_input = "image"

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        t = require_tensor(tensor).float().contiguous()
        if t.dim() != 4 or tuple(t.shape[1:]) != self.cfg.input_shape:
            raise CodecError(f"student codec {self.codec_id!r} takes the model input [N, "
                             f"{', '.join(map(str, self.cfg.input_shape))}] (it replaces the "
                             f"head), got {list(t.shape)}")
        strings = self.model.compress_latent(self.latent(t))["strings"][0]
        header = {"codec": self.codec_id, "shape": list(t.shape), "dtype": "float32",
                  "crc32": [zlib.crc32(s) for s in strings]}
        return EncodedTensor(header, list(strings))

    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        check_header(header, self.codec_id)
        shape = check_shape(header.get("shape"))
        if len(shape) != 4 or tuple(shape[1:]) != self.cfg.input_shape or shape[0] > MAX_BATCH:
            raise PayloadError(f"header shape {list(shape)} does not match student codec "
                               f"{self.codec_id!r}: expected [N<={MAX_BATCH}, "
                               f"{', '.join(map(str, self.cfg.input_shape))}]")
        frames = check_frames(payload, shape[0])
        crcs = header.get("crc32")
        if not isinstance(crcs, list) or len(crcs) != len(frames):
            raise PayloadError(f"student codec {self.codec_id!r}: header crc32 must list one "
                               f"checksum per frame")
        strings = [self._checked_string(f, c) for f, c in zip(frames, crcs)]
        if not strings:
            return torch.empty(0, *self.cfg.split_shape)
        try:
            return self.model.decompress([strings], self.cfg.latent_hw)["x_hat"]
        except (RuntimeError, ValueError, OverflowError) as exc:
            raise PayloadError(f"student codec {self.codec_id!r}: undecodable payload: "
                               f"{exc}") from exc

    def _checked_string(self, frame: Frame, crc: Any) -> bytes:
        """rANS cannot detect a truncated or altered string: the header's CRC-32 does."""
        data = self._rans_frame(frame)
        if zlib.crc32(data) != crc:
            raise PayloadError(f"rANS frame of {len(data)} bytes fails its CRC-32 for codec "
                               f"{self.codec_id!r}: truncated or corrupt")
        return self._padded(data)
