"""Student-encoder codecs: contract, ONNX encoder, cross-process bit-exactness, bad payloads,
and a smoke run of the two-stage training (tiny data, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tether.core.bundle import CodecEntry, Manifest
from tether.core.errors import CodecError, CodecStateError, PayloadError
from tether.codecs import make_codec
from tether.codecs.store import save_student
from tether.codecs.student import StudentConfig, StudentModel, encoder_flops
from tether.codecs.student_codec import StudentCodec
from tether.codecs.student_training import StudentTrainConfig, augment, train_student

from codec_helpers import make_bundle

CFG = StudentConfig((3, 16, 16), (8, 8, 8), stem_width=8, stem_blocks=1, hidden=16, latent=8,
                    decoder_blocks=1)
REPO = Path(__file__).resolve().parents[2]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)


def _ready_model(seed: int = 0) -> StudentModel:
    torch.manual_seed(seed)
    model = StudentModel(CFG)
    with torch.no_grad():                    # spread the latent so several symbols occur
        model.encoder[-1].weight.mul_(20)
    model.update(force=True)
    return model.eval()


def _tail() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = make_bundle(tmp_path_factory.mktemp("student"), (8, 8, 8))
    save_student(root, "block1", "student-b0.01", _ready_model(), {"beta": 0.01})
    return root


def test_config_validates_and_round_trips() -> None:
    assert StudentConfig.from_dict(CFG.to_dict()) == CFG
    assert CFG.latent_hw == (4, 4)
    with pytest.raises(CodecError):
        StudentConfig((3, 16, 16), (8, 6, 6))          # not a power-of-two multiple
    with pytest.raises(CodecError):
        StudentConfig((3, 18, 18), (8, 8, 8))
    assert encoder_flops(CFG) > 0


def test_compress_before_update_names_the_fix() -> None:
    with pytest.raises(CodecStateError, match="update"):
        StudentModel(CFG).compress(_images(1))


def test_bundle_entry_loads_with_onnx_and_matches_torch(bundle: Path) -> None:
    manifest = Manifest.load(bundle)
    entry = next(c for c in manifest.codecs if c.codec == "student-b0.01")
    assert entry.kind == "student" and entry.params["replaces_head"] is True
    codec = make_codec("student-b0.01", bundle, manifest, split="block1")
    assert isinstance(codec, StudentCodec) and codec.uses_onnx and codec.replaces_head
    torch_codec = StudentCodec.from_entry(entry, bundle, use_onnx=False)
    x = _images(6)
    lat_onnx, lat_torch = codec.latent(x), torch_codec.latent(x)
    np.testing.assert_allclose(lat_onnx.numpy(), lat_torch.numpy(), rtol=1e-4, atol=1e-4)
    enc = codec.encode(x)
    assert len(enc.payload) == 6 and enc.header["shape"] == [6, 3, 16, 16]
    out = codec.decode(enc.header, enc.payload)
    assert out.shape == (6, 8, 8, 8)
    with pytest.raises(CodecError, match="replaces the head"):
        codec.encode(torch.zeros(1, 8, 8, 8))


def test_corrupt_or_truncated_payloads_get_typed_errors(bundle: Path) -> None:
    codec = make_codec("student-b0.01", bundle, split="block1")
    enc = codec.encode(_images(1))
    frame = bytes(enc.payload[0])
    flipped = bytes([frame[0] ^ 1]) + frame[1:]
    for bad in (frame[:-4], frame[:3], frame + b"x", frame + bytes(4), b"", flipped):
        with pytest.raises(PayloadError):
            codec.decode(enc.header, [bad])
    with pytest.raises(PayloadError, match="crc32"):
        codec.decode({k: v for k, v in enc.header.items() if k != "crc32"}, enc.payload)
    with pytest.raises(PayloadError):
        codec.decode({**enc.header, "shape": [1, 3, 8, 8]}, enc.payload)
    with pytest.raises(PayloadError):
        codec.decode(enc.header, [frame, frame])
    rng = np.random.default_rng(0)
    for _ in range(20):      # garbage with a matching CRC: a tensor or a typed error, no crash
        junk = rng.integers(0, 256, size=4 * int(rng.integers(2, 40)), dtype=np.uint8).tobytes()
        try:
            out = codec.decode({**enc.header, "crc32": [zlib.crc32(junk)]}, [junk])
        except PayloadError:
            continue
        assert out.shape == (1, 8, 8, 8)


DECODE_SCRIPT = """
import sys, json, numpy as np, torch
from tether.codecs import make_codec
bundle, src, dst = sys.argv[1:4]
codec = make_codec("student-b0.01", bundle, split="block1")
blob = json.load(open(src))
outs = [codec.decode(h, [bytes.fromhex(p)]).numpy() for h, p in zip(blob["headers"], blob["frames"])]
np.save(dst, np.concatenate(outs))
"""


def test_decoding_in_another_process_is_bit_exact(bundle: Path, tmp_path: Path) -> None:
    codec = make_codec("student-b0.01", bundle, split="block1")
    x = _images(24, seed=3)
    encoded = [codec.encode(x[i:i + 1]) for i in range(len(x))]
    reference = np.concatenate([codec.decode(e.header, e.payload).numpy() for e in encoded])
    src, dst = tmp_path / "payload.json", tmp_path / "decoded.npy"
    src.write_text(json.dumps({"headers": [e.header for e in encoded],
                               "frames": [bytes(e.payload[0]).hex() for e in encoded]}))
    subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(bundle), str(src), str(dst)],
                   check=True, cwd=REPO, timeout=120)
    other = np.load(dst)
    assert other.dtype == reference.dtype and np.array_equal(other, reference)
    assert len({e.payload_bytes for e in encoded}) > 1 or encoded[0].payload_bytes > 8


def test_cdf_tables_are_stored_as_integers(bundle: Path) -> None:
    entry = next(c for c in Manifest.load(bundle).codecs if c.codec == "student-b0.01")
    state = torch.load(bundle / entry.params["weights"], weights_only=True)
    cdf = state["entropy_bottleneck._quantized_cdf"]
    assert cdf.dtype == torch.int32 and cdf.numel() > 0


def test_augment_keeps_shape_and_changes_pixels() -> None:
    imgs = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    out = augment(imgs, torch.Generator().manual_seed(0))
    assert out.shape == imgs.shape and out.dtype == torch.uint8 and not torch.equal(out, imgs)


def test_two_stage_training_smoke_and_resume(tmp_path: Path) -> None:
    tail = _tail()
    torch.manual_seed(1)
    head = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()).eval()

    def teacher(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = head(x)
        return f, tail(f)

    images = (_images(48) * 255).to(torch.uint8)
    evalset = (_images(16, seed=9), torch.zeros(16, dtype=torch.long))
    stage1 = StudentTrainConfig(epochs=1, batch_size=16, beta=1e-3)
    model, hist1 = train_student(StudentModel(CFG), teacher, tail, images, stage1, tmp_path, "s1",
                                 evalset, progress=False)
    stage2 = StudentTrainConfig(epochs=2, batch_size=16, beta=1e-2, kd_weight=1.0)
    model, hist2 = train_student(model, teacher, tail, images, stage2, tmp_path, "b", evalset,
                                 progress=False)
    assert model.ready and len(hist1) == 1 and len(hist2) == 2
    lines = (tmp_path / "b.log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert all(k in hist2[-1] for k in ("kd", "bytes", "eval_top1", "seconds", "lr"))
    again, hist3 = train_student(StudentModel(CFG), teacher, tail, images, stage2, tmp_path, "b",
                                 evalset, progress=False)      # resumes: nothing left to do
    assert hist3 == hist2
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CodecError):
        StudentTrainConfig(beta=-1.0)
    assert isinstance(CodecEntry("s", "c", "student").params, dict)
