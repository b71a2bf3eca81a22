"""Student codecs (issue 11) end to end over real ZeroMQ sockets on 127.0.0.1.

A cifar_resnet20 bundle gets a small ladder of student codecs at ``layer3.2`` (encoder = the
teacher's conv1..layer3.0, fine-tuned; decoder = bottleneck + layer3.1..3.2), briefly trained
the way `tether codec train --family student` trains, stored with the same store function.
Then a real :class:`CloudServer` and an :class:`EdgeAgent`: ``split:layer3.2:student-*``
requests send only the student's rANS bytes (the edge runs no head) and the predictions over
the sockets equal the in-process evaluation (``measure_codec``) on 200 images, per image.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil

import numpy as np
import pytest
import torch

from tether.cloud import CloudConfig, ServedBundle
from tether.codecs import make_codec
from tether.codecs.evaluate import measure_codec, predict
from tether.codecs.store import save_student, update_costs
from tether.codecs.student_training import StudentTrainConfig, train_student
from tether.commands.codec_student import _teacher, build_student
from tether.core.bundle import Manifest
from tether.core.policy import FixedPolicy
from tether.core.types import Action, CostTable
from tether.edge.agent import EdgeAgent
from tether.edge.compute import EdgeCompute
from tether.edge.config import EdgeConfig
from tether.edge.records import ListSink
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink
from tether.partitioner import BundleModel

from support.cloud import ServerThread
from support.bundles import assets_dir, sample_images
from support.fakes import run

SPLIT = "layer3.2"
BETAS = (0.001, 0.01)
IMAGES = sample_images(200, seed=4)
TIMING = LinkTiming(heartbeat_interval=0.1, heartbeat_timeout=1.0, handshake_timeout=0.5,
                    reconnect_min=0.05, reconnect_max=0.25)


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def _labels(bm: BundleModel, x: torch.Tensor) -> torch.Tensor:
    """True labels of the lossless images when the assets exist, else the model's answers."""
    found = assets_dir()
    path = found / "cifar10" / "cifar10_test_first1017_lossless.npz" if found else None
    if path is not None and path.is_file():
        return torch.from_numpy(np.load(path)["y"][:len(x)].astype(np.int64))
    return predict(bm.full_model(), x)


@pytest.fixture(scope="module")
def ladder_bundle(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "bundle"
    shutil.copytree(bundle, out)
    bm = BundleModel.load(out)
    args = argparse.Namespace(stem_blocks=3, stem_extra=[3, 1], hidden=32, latent=16,
                              decoder_blocks=2, latent_stride=4)
    tail = bm.tail(SPLIT)
    teacher = _teacher(bm.head(SPLIT), tail)
    train_images = (_float(sample_images(64, seed=9)) * 255).to(torch.uint8)
    x = _float(IMAGES)
    labels = _labels(bm, x)
    for beta in BETAS:
        model = build_student(bm, SPLIT, args)
        cfg = StudentTrainConfig(epochs=1, batch_size=32, beta=beta, kd_weight=1.0)
        model, _ = train_student(model, teacher, tail, train_images, cfg,
                                 out / "work", f"b{beta:g}", progress=False)
        entry = save_student(out, SPLIT, f"student-b{beta:g}", model, {"beta": beta})
        codec = make_codec(entry.codec, out, split=SPLIT)
        result = measure_codec(codec, SPLIT, x, tail, labels)
        update_costs(out, codecs=[result.to_cost(replaces_head=True)])
    return out


@pytest.fixture(scope="module")
def server(ladder_bundle):
    config = CloudConfig(bind="tcp://127.0.0.1:*", max_queue_delay_s=0.002, torch_threads=1)
    with ServerThread(config, [ServedBundle.load(ladder_bundle)]) as srv:
        yield srv


async def _agent_run(compute, endpoint, action, images, sink, concurrency=8):
    agent = EdgeAgent(compute, FixedPolicy(Action.parse(action)),
                      EdgeConfig(edge_id="edge-student", deadline_seconds=10.0),
                      ZmqCloudLink(endpoint, compute.bundle_info(), "edge-student", TIMING),
                      [sink])
    await agent.start()
    try:
        assert await agent.link.wait_ready(10.0)
        results = []
        for i in range(0, len(images), concurrency):
            results += await asyncio.gather(*(agent.infer(img)
                                              for img in images[i:i + concurrency]))
        return results
    finally:
        await agent.close()


def test_ladder_is_in_the_manifest_and_the_cost_table(ladder_bundle):
    manifest = Manifest.load(ladder_bundle)
    ladder = [c for c in manifest.codecs if c.kind == "student"]
    assert sorted(c.params["beta"] for c in ladder) == sorted(BETAS)
    assert all(c.split == SPLIT and c.params["replaces_head"] for c in ladder)
    costs = CostTable.load(ladder_bundle / manifest.cost_table)
    rows = [c for c in costs.codecs if c.codec.startswith("student-")]
    assert len(rows) == len(BETAS)
    assert all(c.replaces_head and c.bytes > 0 and c.bytes_p95 >= c.bytes * 0.5 for c in rows)


def test_socket_predictions_equal_in_process_evaluation(server, ladder_bundle):
    compute = EdgeCompute(ladder_bundle)
    bm = BundleModel.load(ladder_bundle)
    x = _float(IMAGES)
    for beta in BETAS:
        codec_id = f"student-b{beta:g}"
        codec = make_codec(codec_id, ladder_bundle, split=SPLIT)
        expected = []
        with torch.inference_mode():
            for i in range(len(x)):
                enc = codec.encode(x[i:i + 1])
                expected.append(int(bm.tail(SPLIT)(codec.decode(enc.header, enc.payload))
                                    .argmax(1)))
        sink = ListSink()
        results = run(_agent_run(compute, server.endpoint, f"split:{SPLIT}:{codec_id}", IMAGES,
                                 sink), timeout=120)
        records = sorted(sink.records, key=lambda r: r.request_id)
        assert len(results) == len(IMAGES) == len(records)
        assert all((r.outcome, r.fallback_reason) == ("cloud", "") for r in records)
        assert all(r.head_seconds == 0 for r in records)          # the edge ran no head
        got = [r.prediction for r in results]
        assert got == expected, codec_id
        sent = [r.bytes_sent for r in records]
        assert max(sent) < 64 * 8 * 8 * 4 / 4                     # far below the fp32 tensor
        labels = _labels(bm, x)
        in_process = measure_codec(codec, SPLIT, x, bm.tail(SPLIT), labels)
        socket_top1 = float((torch.tensor(got) == labels).double().mean())
        assert socket_top1 == in_process.accuracy, (codec_id, socket_top1, in_process.accuracy)


@pytest.mark.assets
def test_cli_student_training_smoke_then_resume(bundle, assets, tmp_path, capsys):
    """`tether codec train --family student` on 32 images, 1 + 1 epochs; re-running resumes."""
    from tether.cli import main
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    argv = ["codec", "train", str(out), "--family", "student", "--split", SPLIT, "--betas",
            "0.01", "--stage1-epochs", "1", "--epochs", "1", "--limit", "32", "--stem-extra",
            "3", "1", "--latent", "8", "--hidden", "16", "--assets", str(assets), "--threads",
            "1", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "student-b0.01" in first and "B/sample" in first
    work = out / "codecs" / SPLIT / "student"
    logs = (work / "b0.01.log.jsonl").read_text().splitlines()
    assert len(logs) == 1 and (work / "stage1.ckpt").is_file()
    entry = next(c for c in Manifest.load(out).codecs if c.codec == "student-b0.01")
    assert entry.params["encoder_flops"] > 0 and entry.params["rate_bytes_p95"] > 0
    assert main(argv) == 0                                      # resumes: no new epochs
    assert (work / "b0.01.log.jsonl").read_text().splitlines() == logs


DECODE_ALL = """
import sys, numpy as np
from tether.codecs import make_codec
bundle, codec_id, split, src, dst = sys.argv[1:]
blob = np.load(src, allow_pickle=False)
codec = make_codec(codec_id, bundle, split=split)
frames, sizes = blob["frames"], blob["sizes"]
starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
out = [codec.decode({"codec": codec_id, "shape": [1, 3, 32, 32], "dtype": "float32",
                     "crc32": [int(c)]}, [frames[s:s + n].tobytes()]).numpy()
       for s, n, c in zip(starts, sizes, blob["crc32"])]
np.save(dst, np.concatenate(out))
"""


def test_all_lossless_images_decode_bit_exactly_in_another_process(ladder_bundle, tmp_path):
    """The edge encodes with ONNX Runtime, another process decodes with torch: the decoded
    tensors equal this process's decode exactly, for every one of the 1017 lossless images."""
    import subprocess
    import sys
    found = assets_dir()
    path = found / "cifar10" / "cifar10_test_first1017_lossless.npz" if found else None
    if path is None or not path.is_file():
        pytest.skip("the lossless CIFAR-10 images are in ../shared/assets (absent here)")
    x = _float(np.load(path)["x"])
    assert len(x) == 1017
    codec_id = f"student-b{BETAS[0]:g}"
    codec = make_codec(codec_id, ladder_bundle, split=SPLIT)
    assert codec.uses_onnx                                  # the edge's encoder, not torch's
    encoded = [codec.encode(x[i:i + 1]) for i in range(len(x))]
    reference = np.concatenate([codec.decode(e.header, e.payload).numpy() for e in encoded])
    frames = [bytes(e.payload[0]) for e in encoded]
    src, dst = tmp_path / "payload.npz", tmp_path / "decoded.npy"
    np.savez(src, frames=np.frombuffer(b"".join(frames), np.uint8),
             sizes=np.array([len(f) for f in frames]),
             crc32=np.array([e.header["crc32"][0] for e in encoded], np.int64))
    subprocess.run([sys.executable, "-c", DECODE_ALL, str(ladder_bundle), codec_id, SPLIT,
                    str(src), str(dst)], check=True, timeout=300)
    other = np.load(dst)
    assert other.shape == reference.shape and np.array_equal(other, reference)
