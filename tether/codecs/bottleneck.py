"""Learned bottleneck codec (BottleFit / Entropic Student style) for one split point.

:class:`BottleneckAutoencoder` is a CompressAI ``CompressionModel``: an encoder (strided
conv + GDN, fewer channels) that runs on the edge, a factorized-prior
``EntropyBottleneck`` that turns the quantized latent into real rANS bytes, and a decoder
(conv + inverse GDN) that restores the tensor the tail expects. Contract: ``forward`` for
training (reconstruction + likelihoods), ``update()`` once trained, then ``compress`` /
``decompress``; calling those before ``update()`` raises :class:`CodecStateError`.

:class:`BottleneckCodec` is the runtime :class:`~tether.codecs.base.Codec` built from a
bundle entry: one payload frame per sample (the rANS string), the encoder in ONNX Runtime
when the bundle has an ONNX export.
"""

from __future__ import annotations

import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from compressai.models import CompressionModel
from torch import nn
from torch.nn import functional as F

from tether.core.bundle import CodecEntry
from tether.core.errors import (
    BundleError, CodecError, CodecStateError, PayloadError, WeightsError,
)
from tether.codecs.base import (
    Codec, EncodedTensor, Frame, check_frames, check_header, check_shape, frame_len,
    onnx_session, require_tensor,
)

MAX_BATCH = 4096


@dataclass(frozen=True)
class BottleneckConfig:
    """Shape of a bottleneck codec: the split tensor it serves and its latent size."""

    feature_shape: tuple[int, int, int]   # C, H, W of the crossing tensor (batch excluded)
    latent: int = 12                      # channels of the entropy-coded latent
    hidden: int = 64                      # channels inside encoder and decoder
    stride: int = 2                       # spatial downsampling of the latent: 1, 2 or 4
    relu_out: bool = False                # clamp the reconstruction at 0 (can die: off by default)

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.feature_shape)
        object.__setattr__(self, "feature_shape", shape)
        if len(shape) != 3 or min(shape) <= 0:
            raise CodecError(f"feature_shape must be (C, H, W), got {self.feature_shape}")
        if self.stride not in (1, 2, 4) or shape[1] % self.stride or shape[2] % self.stride:
            raise CodecError(f"stride must be 1, 2 or 4 and divide H and W {shape[1:]}, "
                             f"got {self.stride}")
        if self.latent <= 0 or self.hidden <= 0:
            raise CodecError("latent and hidden channels must be positive")

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.feature_shape[1] // self.stride, self.feature_shape[2] // self.stride

    def to_dict(self) -> dict[str, Any]:
        return {"feature_shape": list(self.feature_shape), "latent": self.latent,
                "hidden": self.hidden, "stride": self.stride, "relu_out": self.relu_out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BottleneckConfig":
        try:
            return cls(tuple(d["feature_shape"]), int(d["latent"]), int(d["hidden"]),
                       int(d["stride"]), bool(d["relu_out"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid bottleneck config {d!r}: {exc}") from exc


def _encoder(cfg: BottleneckConfig) -> nn.Sequential:
    c, n = cfg.feature_shape[0], cfg.hidden
    layers: list[nn.Module] = []
    downs = int(math.log2(cfg.stride))
    for i in range(max(downs, 1)):
        layers += [nn.Conv2d(c if i == 0 else n, n, 5 if downs else 3,
                             stride=2 if downs else 1, padding=2 if downs else 1), GDN(n)]
    layers.append(nn.Conv2d(n, cfg.latent, 3, padding=1))
    return nn.Sequential(*layers)


def _decoder(cfg: BottleneckConfig) -> nn.Sequential:
    """Latent -> tensor: conv + inverse GDN at low resolution, pixel-shuffle upsampling."""
    c, n = cfg.feature_shape[0], cfg.hidden
    layers: list[nn.Module] = [nn.Conv2d(cfg.latent, n, 3, padding=1), GDN(n, inverse=True),
                               nn.Conv2d(n, n, 3, padding=1), nn.ReLU(inplace=True)]
    width = n
    for _ in range(int(math.log2(cfg.stride))):
        layers += [nn.Conv2d(width, 2 * width, 3, padding=1), nn.PixelShuffle(2),
                   nn.ReLU(inplace=True)]
        width //= 2
    layers.append(nn.Conv2d(width, c, 3, padding=1))
    if cfg.relu_out:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class EntropyCodedModel(CompressionModel):
    """encoder -> EntropyBottleneck (factorized prior) -> decoder, the CompressAI contract.

    Subclasses set ``encoder``, ``entropy_bottleneck`` and ``decoder`` and may override
    :meth:`encode_latent` / :meth:`decode_latent` (e.g. to rescale).
    """

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (the latent before quantization)."""
        return self.encoder(x)

    def decode_latent(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Decoder output for a (quantized) latent."""
        return self.decoder(y_hat)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """Training pass: noisy latent, reconstruction and the latent's likelihoods."""
        y_hat, likelihoods = self.entropy_bottleneck(self.encode_latent(x))
        return {"x_hat": self.decode_latent(y_hat), "likelihoods": {"y": likelihoods}}

    @property
    def ready(self) -> bool:
        """True once ``update()`` has built the CDF tables the entropy coder needs."""
        return self.entropy_bottleneck._quantized_cdf.numel() > 0

    def _require_ready(self) -> None:
        if not self.ready:
            raise CodecStateError("Uninitialized CDFs. Run update() first")

    @torch.no_grad()
    def compress(self, x: torch.Tensor) -> dict[str, Any]:
        """Encode ``x`` to one rANS string per sample."""
        self._require_ready()
        return self.compress_latent(self.encode_latent(x))

    @torch.no_grad()
    def compress_latent(self, y: torch.Tensor) -> dict[str, Any]:
        """Entropy-code an encoder output (e.g. from the ONNX encoder)."""
        self._require_ready()
        return {"strings": [self.entropy_bottleneck.compress(y)], "shape": tuple(y.shape[-2:])}

    @torch.no_grad()
    def decompress(self, strings: list[list[bytes]], shape: Sequence[int]) -> dict[str, Any]:
        """Decode rANS strings (latent spatial ``shape``) to the reconstructed tensor."""
        self._require_ready()
        y_hat = self.entropy_bottleneck.decompress(strings[0], tuple(shape))
        return {"x_hat": self.decode_latent(y_hat)}


def load_codec_weights(model: nn.Module, weights: Path) -> None:
    """Load a codec's state dict (``weights_only``) into ``model``: errors name the fix."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError as exc:
        raise WeightsError(f"codec weights {weights} missing: re-run "
                           f"`tether codec train`") from exc
    except (RuntimeError, KeyError, ValueError, OSError, EOFError,
            pickle.UnpicklingError) as exc:
        raise WeightsError(f"codec weights {weights} unreadable or mismatched: {exc}") from exc


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path,
                input_name: str, what: str) -> None:
    """Export an encoder (``input_name`` -> ``latent``) with a dynamic batch dimension."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # legacy exporter is fine
            torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                              output_names=["latent"], opset_version=17, dynamo=False,
                              dynamic_axes={input_name: {0: "batch"}, "latent": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - exporter errors are many; map them all
        raise CodecError(f"ONNX export of the {what} failed: {exc}") from exc


class BottleneckAutoencoder(EntropyCodedModel):
    """Encoder -> EntropyBottleneck (factorized prior) -> decoder on a split tensor."""

    def __init__(self, cfg: BottleneckConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _encoder(cfg)
        self.entropy_bottleneck = EntropyBottleneck(cfg.latent)
        self.decoder = _decoder(cfg)
        # RMS of the split tensor: the encoder sees unit-scale input, the decoder undoes it
        self.register_buffer("scale", torch.ones(()))

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (the latent before quantization)."""
        return self.encoder(x / self.scale)

    def decode_latent(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Decoder output for a (quantized) latent, in the split tensor's units."""
        return self.decoder(y_hat) * self.scale


def bits_per_sample(likelihoods: torch.Tensor) -> torch.Tensor:
    """Estimated rate of a batch in bits per sample (the training rate term)."""
    return -torch.log2(likelihoods.clamp_min(1e-9)).sum() / likelihoods.shape[0]


class _PlainGDN(nn.Module):
    """GDN with its reparametrized weights frozen into buffers (ONNX-exportable)."""

    def __init__(self, gdn: GDN) -> None:
        super().__init__()
        with torch.no_grad():
            beta = gdn.beta_reparam(gdn.beta).detach().clone()
            gamma = gdn.gamma_reparam(gdn.gamma).detach().clone()
        self.register_buffer("beta", beta)
        self.register_buffer("gamma", gamma.reshape(*gamma.shape, 1, 1))
        self.inverse = gdn.inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = F.conv2d(x * x, self.gamma, self.beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


class _Scale(nn.Module):
    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv", 1.0 / scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv


def plain_encoder(model: BottleneckAutoencoder) -> nn.Sequential:
    """A copy of the encoder without CompressAI's custom autograd ops, for ONNX export."""
    layers = [_PlainGDN(m) if isinstance(m, GDN) else m for m in model.encoder]
    return nn.Sequential(_Scale(model.scale), *layers).eval()


def export_encoder_onnx(model: BottleneckAutoencoder, path: str | Path) -> None:
    """Export the edge part (the encoder) to ONNX with a dynamic batch dimension."""
    export_onnx(plain_encoder(model), torch.zeros(1, *model.cfg.feature_shape), path,
                "features", "bottleneck encoder")


def rans_padding(frame_bytes: int, symbols: int) -> int:
    """Zero bytes appended before rANS decoding so a hostile string cannot read out of bounds.

    The decoder reads 32-bit words forward; garbage can at most request about 15 bypass
    nibbles per nibble of input, and zero words end every bypass run.
    """
    return 16 * frame_bytes + 2 * symbols + 64


class EntropyCodec(Codec):
    """Runtime codec around a trained, ``update()``-d :class:`EntropyCodedModel`: the edge
    runs the encoder (ONNX Runtime when exported), the cloud decodes the rANS strings."""

    lossless = False
    model_class: type = EntropyCodedModel
    config_class: Any = None
    onnx_input = "features"          # the ONNX encoder's input name

    def __init__(self, codec_id: str, model: EntropyCodedModel,
                 onnx_path: str | Path | None = None, threads: int = 1) -> None:
        model.eval()
        if not model.ready:
            raise CodecStateError(f"codec {codec_id!r}: Uninitialized CDFs. Run update() "
                                  f"first (re-train or re-save with `tether codec train`)")
        self.codec_id = codec_id
        self.model = model
        self.cfg = model.cfg
        self._session = onnx_session(onnx_path, threads, f"ONNX encoder of {codec_id}") \
            if onnx_path else None

    @property
    def uses_onnx(self) -> bool:
        return self._session is not None

    @classmethod
    def from_entry(cls, entry: CodecEntry, bundle_dir: str | Path,
                   use_onnx: bool = True) -> "EntropyCodec":
        """Load the codec a bundle manifest entry describes."""
        params = entry.params
        model = cls.model_class(cls.config_class.from_dict(params.get("config", {})))
        load_codec_weights(model, Path(bundle_dir) / str(params.get("weights", "")))
        onnx_rel = params.get("encoder_onnx")
        onnx_path = Path(bundle_dir) / onnx_rel if onnx_rel and use_onnx else None
        return cls(entry.codec, model, onnx_path if onnx_path and onnx_path.is_file() else None)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output for ``x`` (ONNX Runtime when available)."""
        if self._session is not None:
            return torch.from_numpy(self._session.run(None, {self.onnx_input: x.numpy()})[0])
        with torch.no_grad():
            return self.model.encode_latent(x)

    def _rans_frame(self, frame: Frame) -> bytes:
        """A frame's bytes once its length is plausible for this codec's latent."""
        symbols = self.cfg.latent * math.prod(self.cfg.latent_hw)
        n = frame_len(frame)
        if n < 8 or n % 4 or n > 8 * symbols + 64:
            raise PayloadError(f"rANS frame of {n} bytes is invalid for codec {self.codec_id!r}"
                               f" (needs a multiple of 4 in 8..{8 * symbols + 64}): "
                               f"truncated or corrupt")
        return bytes(frame)

    def _padded(self, data: bytes) -> bytes:
        symbols = self.cfg.latent * math.prod(self.cfg.latent_hw)
        return data + bytes(rans_padding(len(data), symbols))


class BottleneckCodec(EntropyCodec):
    """A bottleneck codec on the head's features at a split point."""

    model_class = BottleneckAutoencoder
    config_class = BottleneckConfig

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        t = require_tensor(tensor).float().contiguous()
        if t.dim() != 4 or tuple(t.shape[1:]) != self.cfg.feature_shape:
            raise CodecError(f"codec {self.codec_id!r} takes tensors [N, "
                             f"{', '.join(map(str, self.cfg.feature_shape))}], got {list(t.shape)}"
                             f": is it the right split point?")
        strings = self.model.compress_latent(self.latent(t))["strings"][0]
        header = {"codec": self.codec_id, "shape": list(t.shape), "dtype": "float32"}
        return EncodedTensor(header, list(strings))

    def decode(self, header: dict[str, Any], payload: Sequence[Frame]) -> torch.Tensor:
        check_header(header, self.codec_id)
        shape = check_shape(header.get("shape"))
        if len(shape) != 4 or tuple(shape[1:]) != self.cfg.feature_shape or shape[0] > MAX_BATCH:
            raise PayloadError(f"header shape {list(shape)} does not match codec "
                               f"{self.codec_id!r}: expected [N<={MAX_BATCH}, "
                               f"{', '.join(map(str, self.cfg.feature_shape))}]")
        frames = check_frames(payload, shape[0])
        strings = [self._padded(self._rans_frame(f)) for f in frames]
        if not strings:
            return torch.empty(shape)
        return self.model.decompress([strings], self.cfg.latent_hw)["x_hat"]

