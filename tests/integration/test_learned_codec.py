"""Learned bottleneck codecs end to end over real ZeroMQ sockets on 127.0.0.1 (issue 7).

A cifar_resnet20 bundle gets a bottleneck codec at one split, stored the way `tether codec
train` stores it (a few distillation steps on synthetic images, ``update()``, weights + ONNX
encoder + manifest entry + cost). Then a real :class:`CloudServer` and an :class:`EdgeAgent`
with :class:`ZmqCloudLink`:

- ``split:<split>:<codec>`` requests are answered by the cloud (no fallback) with exactly
  ``tail(decoder(encoder(head(x))))``, and the request on the socket is a small fraction of
  the fp32 crossing tensor;
- an INFER naming a codec the cloud does not know (over a raw DEALER: the edge refuses it
  before sending) gets an ERROR ``unknown_codec``, and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import torch
import zmq

from tether.cloud import CloudConfig, ServedBundle
from tether.codecs import make_codec
from tether.codecs.bottleneck import BottleneckCodec, BottleneckConfig
from tether.codecs.evaluate import measure_codec
from tether.codecs.store import save_bottleneck, update_costs
from tether.codecs.training import TrainConfig, describe, teacher_outputs, train_bottleneck
from tether.core import protocol as P
from tether.core.errors import UnknownCodecError
from tether.core.policy import FixedPolicy
from tether.core.types import Action
from tether.edge.agent import EdgeAgent
from tether.edge.compute import EdgeCompute
from tether.edge.config import EdgeConfig
from tether.edge.records import ListSink
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink
from tether.partitioner import BundleModel

from support.cloud import RawClient, ServerThread
from support.bundles import sample_images
from support.fakes import run

SPLIT = "layer2.2"           # crossing tensor 32 x 16 x 16 fp32 = 32 768 B
OTHER_SPLIT = "layer1.2"     # exported head, but no learned codec there
CODEC = "bottleneck-b0.01"
IMAGES = sample_images(12, seed=3)
TIMING = LinkTiming(heartbeat_interval=0.1, heartbeat_timeout=1.0, handshake_timeout=0.5,
                    reconnect_min=0.05, reconnect_max=0.25)


@pytest.fixture(scope="module")
def codec_bundle(bundle, tmp_path_factory):
    """A copy of the session bundle with a (briefly) trained bottleneck codec at SPLIT."""
    out = tmp_path_factory.mktemp("learned") / "bundle"
    shutil.copytree(bundle, out)
    bm = BundleModel.load(out)
    head, tail = bm.head(SPLIT), bm.tail(SPLIT)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(48, 3, 32, 32, generator=gen)
    teacher = teacher_outputs(head, tail, images)
    cfg = BottleneckConfig(tuple(teacher.features.shape[1:]), latent=8, hidden=32, stride=2)
    train = TrainConfig(epochs=1, batch_size=16, seed=0)
    model, history = train_bottleneck(teacher, tail, cfg, 0.01, train, progress=False)
    with torch.no_grad():
        eval_feats = head(images[:8])
        labels = tail(eval_feats).argmax(dim=1)
    result = measure_codec(BottleneckCodec(CODEC, model), SPLIT, eval_feats, tail, labels)
    save_bottleneck(out, SPLIT, CODEC, model, {
        "beta": 0.01, "rate_bytes": result.payload_bytes, "accuracy": result.accuracy,
        "train": describe(train), "train_indices": "synthetic (test)", "final": history[-1]})
    update_costs(out, codecs=[result.to_cost()])
    return out


@pytest.fixture(scope="module")
def server(codec_bundle):
    config = CloudConfig(bind="tcp://127.0.0.1:*", max_queue_delay_s=0.002, torch_threads=1)
    with ServerThread(config, [ServedBundle.load(codec_bundle)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def compute(codec_bundle):
    return EdgeCompute(codec_bundle)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _direct_logits(compute: EdgeCompute, codec_bundle, image: np.ndarray) -> np.ndarray:
    """tail(decoder(encoder(head(x)))) without the runtime: the same ONNX head and codec."""
    codec = make_codec(CODEC, codec_bundle, split=SPLIT)
    features = torch.from_numpy(compute.head(SPLIT, compute.prepare(image)))
    enc = codec.encode(features)
    with torch.inference_mode():
        return BundleModel.load(codec_bundle).tail(SPLIT)(
            codec.decode(enc.header, enc.payload)).numpy()


async def _agent_run(compute, endpoint, action, images, sink, concurrency=1):
    """Send ``images`` through a fresh agent, ``concurrency`` requests in flight (so the
    cloud batches several learned-codec payloads into one decode + tail)."""
    agent = EdgeAgent(compute, FixedPolicy(Action.parse(action)),
                      EdgeConfig(edge_id="edge-learned", deadline_seconds=5.0),
                      ZmqCloudLink(endpoint, compute.bundle_info(), "edge-learned", TIMING),
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


def test_learned_codec_requests_are_answered_by_the_cloud(server, compute, codec_bundle):
    entry = next(c for c in compute.manifest.codecs if c.codec == CODEC)
    assert entry.split == SPLIT and (codec_bundle / entry.params["encoder_onnx"]).is_file()
    assert CODEC in next(iter(server.server.core.info())).codecs      # READY advertises it
    sink = ListSink()
    results = run(_agent_run(compute, server.endpoint, f"split:{SPLIT}:{CODEC}", IMAGES, sink,
                             concurrency=4), timeout=60)
    fp32_bytes = compute.manifest.split(SPLIT).bytes
    assert fp32_bytes == 32 * 16 * 16 * 4
    expected = np.concatenate([_direct_logits(compute, codec_bundle, img) for img in IMAGES])
    assert len(np.unique(expected.round(4), axis=0)) == len(IMAGES)   # a mix-up would show
    records = sorted(sink.records, key=lambda r: r.request_id)
    assert len(records) == len(results) == len(IMAGES)
    for i, (result, record) in enumerate(zip(results, records)):
        assert (record.outcome, record.fallback_reason) == ("cloud", "")
        assert record.action == f"split:{SPLIT}:{CODEC}"
        np.testing.assert_allclose(result.logits[0], expected[i], rtol=1e-4, atol=1e-4)
        assert result.prediction == int(np.argmax(expected[i]))
        assert 0 < record.bytes_sent < fp32_bytes / 10, (record.bytes_sent, fp32_bytes)
    ok = server.sample("tether_cloud_requests_total", {
        "model": "cifar_resnet20", "split": SPLIT, "codec": CODEC, "outcome": "ok"})
    assert ok >= len(IMAGES)
    fp32_sink = ListSink()                     # the same requests as fp32, for the ratio
    run(_agent_run(compute, server.endpoint, f"split:{SPLIT}:fp32", IMAGES[:2], fp32_sink),
        timeout=60)
    fp32_sent = [r.bytes_sent for r in fp32_sink.records]
    assert all(r.outcome == "cloud" for r in fp32_sink.records) and min(fp32_sent) > fp32_bytes
    sent = [r.bytes_sent for r in records]
    assert max(sent) < min(fp32_sent) / 10
    print(f"\n{CODEC} at {SPLIT}: {np.mean(sent):.0f} B/request on the socket (min {min(sent)},"
          f" max {max(sent)}); fp32: {np.mean(fp32_sent):.0f} B/request "
          f"({fp32_bytes} B tensor)")


def _infer(compute, split, codec_id, enc, rid):
    return P.Infer(rid, compute.fingerprint, split, codec_id, dict(enc.header), 5.0,
                   tuple(enc.payload))


def test_unknown_codec_gets_an_error_and_the_service_keeps_serving(server, compute,
                                                                   codec_bundle, ctx):
    codec = make_codec(CODEC, codec_bundle, split=SPLIT)
    x = compute.prepare(IMAGES[0])
    enc = codec.encode(torch.from_numpy(compute.head(SPLIT, x)))
    errors_before = server.sample("tether_cloud_errors_total", {"code": "unknown_codec"})
    client = RawClient(server.endpoint, ctx)
    try:
        bad = [("bottleneck-b999", SPLIT),          # never trained
               (CODEC, OTHER_SPLIT),                # exists, but for another split point
               ("bottleneck-b0.01+zlib", SPLIT)]    # not a valid composition
        for rid, (codec_id, split) in enumerate(bad, start=1):
            reply = client.request(_infer(compute, split, codec_id, enc, rid))
            assert isinstance(reply, P.Error), reply
            assert (reply.request_id, reply.code) == (rid, UnknownCodecError.code)
            assert codec_id in reply.message
        good = client.request(_infer(compute, SPLIT, CODEC, enc, 99))
        assert isinstance(good, P.Result) and good.request_id == 99
        np.testing.assert_allclose(P.frame_array(good.tensors[0], good.payload[0]),
                                   _direct_logits(compute, codec_bundle, IMAGES[0]),
                                   rtol=1e-4, atol=1e-4)
    finally:
        client.close()
    assert server.sample("tether_cloud_errors_total",
                         {"code": "unknown_codec"}) - errors_before == len(bad)
    # the edge refuses an unknown codec itself (local answer, reason "error"), then offloads
    sink = ListSink()
    images = [IMAGES[1], IMAGES[1]]
    run(_agent_run(compute, server.endpoint, f"split:{SPLIT}:bottleneck-b999", images[:1],
                   sink), timeout=60)
    run(_agent_run(compute, server.endpoint, f"split:{SPLIT}:{CODEC}", images[1:], sink),
        timeout=60)
    assert [(r.outcome, r.fallback_reason) for r in sink.records] == \
        [("fallback", "error"), ("cloud", "")]
    assert sink.records[0].bytes_sent == 0
