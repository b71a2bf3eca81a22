"""Codecs for what crosses the cut, and early exits. Depends only on ``tether.core``.

API::

    from tether.codecs import make_codec, EncodedTensor, Codec

    codec = make_codec("int8-channel+zlib")   # fp32 fp16 int8-channel int8-token int4-token
                                              # [+zlib|+zstd] jpeg<q> webp<q> png
    codec = make_codec("bottleneck-b0.001", bundle_dir, manifest, split="layer2")  # learned
    enc = codec.encode(tensor)       # EncodedTensor(header: dict of msgpack-able scalars, lists,
                                     # bytes; payload: list[bytes | memoryview] frames)
    enc.payload_bytes, enc.header_bytes                # wire sizes (header as msgpack)
    out = codec.decode(enc.header, enc.payload)        # untrusted input: raises PayloadError

    make_codec("nope")  -> UnknownCodecError naming the known ids
    learned_codec_ids(manifest, split)                 # learned codec ids a bundle offers

LLM hidden states (``[tokens, hidden]``) use the same codecs::

    codec = hidden_codec("int8-token")        # any TENSOR_CODEC_IDS; old LLM names int8/int4
    enc = codec.encode(hidden)                # edge
    h = decode_hidden(codec, enc.header, enc.payload, dim=hidden_size, tokens=n)   # cloud:
                                              # shape checked against the model before allocating

Old codec names work only through :data:`RENAMED` (``int8`` -> ``int8-channel`` for features,
``int8-token`` for hidden states); :func:`canonical_codec_id` resolves them.
``wire_roundtrip(codec)`` is ``h -> decode(encode(h))``, for quality checks of a split.

Early exits (edge side)::

    from tether.codecs import load_exit
    ex = load_exit(bundle_dir, manifest, split)        # ONNX Runtime when exported, else torch
    decision = ex(features)                            # ExitDecision(prediction, confidence, take)

Training and evaluation (used by ``tether codec train|eval``) live in
``tether.codecs.training``, ``tether.codecs.exits``, ``tether.codecs.store`` and
``tether.codecs.evaluate``. Learned-codec contract (CompressAI style): ``forward`` gives the
reconstruction and likelihoods, ``update()`` builds CDFs, ``compress``/``decompress`` use
them and raise ``CodecStateError("Uninitialized CDFs. Run update() first")`` before.
"""

from __future__ import annotations

from tether.codecs.base import Codec, EncodedTensor
from tether.codecs.factory import (KNOWN_IDS_TEXT, RENAMED, TENSOR_CODEC_IDS, canonical_codec_id,
                                   hidden_codec, learned_codec_ids, make_codec)
from tether.codecs.tokens import decode_hidden, wire_roundtrip


def load_exit(bundle_dir, manifest=None, split=None):  # noqa: ANN001 - thin lazy wrapper
    """Load the early exit stored in the bundle at ``split`` (see :mod:`tether.codecs.exits`)."""
    from tether.codecs.exits import load_exit as _load
    return _load(bundle_dir, manifest, split)


__all__ = ["Codec", "EncodedTensor", "KNOWN_IDS_TEXT", "RENAMED", "TENSOR_CODEC_IDS",
           "canonical_codec_id", "decode_hidden", "hidden_codec", "learned_codec_ids",
           "load_exit", "make_codec", "wire_roundtrip"]
