"""Runtime :class:`StudentCodec`: the edge encodes images, the cloud decodes split tensors.

``encode`` takes the model input (``[N, 3, H, W]`` floats in [0, 1]; the head is *not* run:
``replaces_head``), runs the student encoder (ONNX Runtime when the bundle has the export)
and entropy-codes the latent with the CDF tables stored in the weights file (integers,
loaded as they were saved, never rebuilt from floats). ``decode`` validates the frames and
returns the tensor the bundle's tail takes at the entry's split point.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch

from tether.core.bundle import CodecEntry
from tether.core.errors import CodecError, CodecStateError, PayloadError
from tether.codecs.base import (
    Codec, EncodedTensor, Frame, check_frames, check_header, check_shape, frame_len,
    onnx_session, require_tensor,
)
from tether.codecs.bottleneck import MAX_BATCH, load_codec_weights, rans_padding
from tether.codecs.student import StudentConfig, StudentModel


class StudentCodec(Codec):
    """A trained, ``update()``-d :class:`StudentModel` behind the codec contract."""

    lossless = False
    replaces_head = True

    def __init__(self, codec_id: str, model: StudentModel,
                 onnx_path: str | Path | None = None, threads: int = 1) -> None:
        model.eval()
        if not model.ready:
            raise CodecStateError(f"codec {codec_id!r}: Uninitialized CDFs. Run update() first "
                                  f"(re-train or re-save with `tether codec train`)")
        self.codec_id = codec_id
        self.model = model
        self.cfg = model.cfg
        self._session = onnx_session(onnx_path, threads, "ONNX student encoder") \
            if onnx_path else None

    @property
    def uses_onnx(self) -> bool:
        return self._session is not None

    @classmethod
    def from_entry(cls, entry: CodecEntry, bundle_dir: str | Path,
                   use_onnx: bool = True) -> "StudentCodec":
        """Load the codec a bundle manifest entry describes."""
        params = entry.params
        cfg = StudentConfig.from_dict(params.get("config", {}))
        weights = Path(bundle_dir) / str(params.get("weights", ""))
        model = StudentModel(cfg)
        load_codec_weights(model, weights)
        onnx_rel = params.get("encoder_onnx")
        onnx_path = Path(bundle_dir) / onnx_rel if onnx_rel and use_onnx else None
        return cls(entry.codec, model, onnx_path if onnx_path and onnx_path.is_file() else None)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output for images ``x`` (ONNX Runtime when available)."""
        if self._session is not None:
            return torch.from_numpy(self._session.run(None, {"image": x.numpy()})[0])
        with torch.no_grad():
            return self.model.encoder(x)

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
        symbols = self.cfg.latent * math.prod(self.cfg.latent_hw)
        n = frame_len(frame)
        if n < 8 or n % 4 or n > 8 * symbols + 64:
            raise PayloadError(f"rANS frame of {n} bytes is invalid for codec {self.codec_id!r}"
                               f" (needs a multiple of 4 in 8..{8 * symbols + 64}): "
                               f"truncated or corrupt")
        data = bytes(frame)
        if zlib.crc32(data) != crc:
            raise PayloadError(f"rANS frame of {n} bytes fails its CRC-32 for codec "
                               f"{self.codec_id!r}: truncated or corrupt")
        return data + bytes(rans_padding(n, symbols))
