"""Learned bottleneck codec: CompressAI contract, real rANS bytes, hostile payloads, training."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from tether.core.errors import CodecError, CodecStateError, PayloadError, UnknownCodecError
from tether.codecs import make_codec
from tether.codecs.bottleneck import BottleneckAutoencoder, BottleneckCodec, BottleneckConfig
from tether.codecs.store import save_bottleneck
from tether.codecs.training import Teacher, TrainConfig, train_bottleneck

from codec_helpers import make_bundle, tiny_features

CFG = BottleneckConfig((8, 8, 8), latent=4, hidden=16, stride=2)


@pytest.fixture(scope="module")
def updated_model() -> BottleneckAutoencoder:
    torch.manual_seed(0)
    model = BottleneckAutoencoder(CFG)
    model.update(force=True)
    return model.eval()


def test_forward_gives_reconstruction_and_likelihoods() -> None:
    model = BottleneckAutoencoder(CFG)
    out = model(torch.rand(3, 8, 8, 8))
    assert out["x_hat"].shape == (3, 8, 8, 8)
    lk = out["likelihoods"]["y"]
    assert lk.shape == (3, 4, 4, 4) and (lk > 0).all() and (lk <= 1).all()
    clamped = BottleneckAutoencoder(BottleneckConfig((8, 8, 8), 4, 16, 2, relu_out=True))
    assert (clamped(torch.rand(2, 8, 8, 8))["x_hat"] >= 0).all()


def test_compress_before_update_names_the_fix() -> None:
    model = BottleneckAutoencoder(CFG).eval()
    with pytest.raises(CodecStateError, match=r"Uninitialized CDFs. Run update\(\) first"):
        model.compress(torch.rand(1, 8, 8, 8))
    with pytest.raises(CodecStateError, match="update"):
        BottleneckCodec("bottleneck-b1", model)


def test_compress_decompress_roundtrip_matches_quantized_forward(updated_model) -> None:
    x = torch.rand(2, 8, 8, 8)
    comp = updated_model.compress(x)
    assert len(comp["strings"][0]) == 2 and all(isinstance(s, bytes) for s in comp["strings"][0])
    rec = updated_model.decompress(comp["strings"], comp["shape"])["x_hat"]
    with torch.no_grad():
        y = updated_model.encode_latent(x)
        y_hat = updated_model.entropy_bottleneck.quantize(
            y, "dequantize", updated_model.entropy_bottleneck._get_medians())
        ref = updated_model.decode_latent(y_hat)
    assert torch.allclose(rec, ref, atol=1e-5)


def test_runtime_codec_sends_one_rans_frame_per_sample(updated_model) -> None:
    codec = BottleneckCodec("bottleneck-b1", updated_model)
    x = torch.rand(3, 8, 8, 8)
    enc = codec.encode(x)
    assert len(enc.payload) == 3 and enc.payload_bytes == sum(len(f) for f in enc.payload)
    assert enc.payload_bytes < x.numel()        # well below even int8
    out = codec.decode(enc.header, enc.payload)
    assert out.shape == x.shape
    with pytest.raises(CodecError, match="split point"):
        codec.encode(torch.rand(1, 4, 8, 8))


def test_hostile_rans_frames_never_crash(updated_model) -> None:
    codec = BottleneckCodec("bottleneck-b1", updated_model)
    header = {"codec": "bottleneck-b1", "shape": [1, 8, 8, 8], "dtype": "float32"}
    rng = random.Random(0)
    for n in (8, 12, 64, 256, 512):
        for fill in ("random", "ones", "zeros"):
            blob = {"random": bytes(rng.getrandbits(8) for _ in range(n)),
                    "ones": b"\xff" * n, "zeros": bytes(n)}[fill]
            out = codec.decode(header, [blob])
            assert out.shape == (1, 8, 8, 8)
    for bad in (b"", b"\x01\x02\x03", bytes(13), bytes(10_000)):
        with pytest.raises(PayloadError):
            codec.decode(header, [bad])
    good = codec.encode(torch.rand(1, 8, 8, 8))
    with pytest.raises(PayloadError, match="shape"):
        codec.decode({**header, "shape": [1, 8, 16, 16]}, good.payload)
    with pytest.raises(PayloadError, match="frame"):
        codec.decode({**header, "shape": [2, 8, 8, 8]}, good.payload)
    with pytest.raises(PayloadError, match="encoded with codec"):
        codec.decode({**header, "codec": "bottleneck-b2"}, good.payload)


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _real_bytes(model: BottleneckAutoencoder, feats: torch.Tensor) -> float:
    return BottleneckCodec("b", model).encode(feats).payload_bytes / len(feats)


def test_short_training_reduces_the_rate(tmp_path, one_thread) -> None:
    feats, tail, logits = tiny_features(n=128)
    teacher = Teacher(feats.half(), logits)
    train = TrainConfig(epochs=3, batch_size=16, lr=1e-2, seed=0)
    log = tmp_path / "log.jsonl"
    model, hist = train_bottleneck(teacher, tail, CFG, beta=0.3, train=train, progress=False,
                                   log_path=log)
    assert len(hist) == 3 and len(log.read_text().splitlines()) == 3
    assert hist[-1]["bytes"] < hist[0]["bytes"]
    assert model.ready
    torch.manual_seed(0)
    untrained = BottleneckAutoencoder(CFG)
    untrained.scale.copy_(model.scale)
    untrained.update(force=True)
    assert _real_bytes(model, feats) < 0.9 * _real_bytes(untrained, feats)
    again, _ = train_bottleneck(teacher, tail, CFG, beta=0.3, train=train, progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)                                  # seeded: reproducible


def test_bigger_beta_gives_fewer_real_bytes(one_thread) -> None:
    feats, tail, logits = tiny_features(n=128)
    teacher = Teacher(feats.half(), logits)
    train = TrainConfig(epochs=3, batch_size=16, lr=1e-2, seed=0)
    free, hist_free = train_bottleneck(teacher, tail, CFG, beta=0.0, train=train,
                                       progress=False)
    tight, hist_tight = train_bottleneck(teacher, tail, CFG, beta=0.3, train=train,
                                         progress=False)
    assert _real_bytes(tight, feats) < _real_bytes(free, feats)
    assert hist_tight[-1]["bytes"] < hist_free[-1]["bytes"]


def test_bundle_roundtrip_through_make_codec(tmp_path, updated_model) -> None:
    bundle = make_bundle(tmp_path, feature_shape=(8, 8, 8))
    manifest = save_bottleneck(bundle, "block1", "bottleneck-b0.5", updated_model,
                               {"beta": 0.5, "rate_bytes": 12.0})
    entry = manifest.codecs[0]
    assert entry.kind == "bottleneck" and entry.split == "block1"
    assert (bundle / entry.params["weights"]).is_file()
    assert (bundle / entry.params["encoder_onnx"]).is_file()
    codec = make_codec("bottleneck-b0.5", bundle, split="block1")
    x = torch.rand(2, 8, 8, 8)
    enc = codec.encode(x)                      # ONNX Runtime encoder
    torch_enc = BottleneckCodec("bottleneck-b0.5", updated_model).encode(x)
    assert [bytes(f) for f in enc.payload] == [bytes(f) for f in torch_enc.payload]
    assert torch.allclose(codec.decode(enc.header, enc.payload),
                          updated_model.decompress([list(torch_enc.payload)], (4, 4))["x_hat"])
    with pytest.raises(UnknownCodecError, match="bottleneck-b0.5@block1"):
        make_codec("bottleneck-b9", bundle)
    with pytest.raises(UnknownCodecError):
        make_codec("bottleneck-b0.5", bundle, split="other")


def test_corrupt_weights_are_a_clear_error(tmp_path, updated_model) -> None:
    from tether.core.errors import WeightsError
    bundle = make_bundle(tmp_path, feature_shape=(8, 8, 8))
    manifest = save_bottleneck(bundle, "block1", "bottleneck-b1", updated_model, {})
    (bundle / manifest.codecs[0].params["weights"]).write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="unreadable"):
        make_codec("bottleneck-b1", bundle)


def test_config_validation() -> None:
    with pytest.raises(CodecError):
        BottleneckConfig((8, 9, 9), stride=2)
    with pytest.raises(CodecError):
        BottleneckConfig((8, 8))  # type: ignore[arg-type]
    assert BottleneckConfig.from_dict(CFG.to_dict()) == CFG
    assert isinstance(BottleneckAutoencoder(BottleneckConfig((3, 8, 8), stride=4)).decoder,
                      nn.Sequential)
