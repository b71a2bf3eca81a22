"""The cloud service over real sockets on 127.0.0.1: handshake, results, batching, bad input."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import msgpack
import pytest
import torch

from tether.core import protocol as P

from support.cloud import SPLITS, RawClient


def test_handshake_lists_what_is_served_and_refuses_a_mismatch(server, model, ctx):
    client = RawClient(server.endpoint, ctx)
    ready = client.request(P.Hello(1, "edge-a", (P.BundleInfo("cifar_resnet20", model.fingerprint),)))
    assert isinstance(ready, P.Ready) and ready.request_id == 1
    info = ready.bundle(model.fingerprint)
    assert info.model_id == "cifar_resnet20" and info.splits == ("input", *SPLITS)
    assert "fp16" in info.codecs and info.input.shape == (1, 3, 32, 32)
    refused = client.request(P.Hello(2, "edge-a", (P.BundleInfo("cifar_resnet20", "0" * 64),)))
    assert isinstance(refused, P.Error) and refused.code == "bundle"
    assert "does not serve" in refused.message and model.fingerprint[:12] in refused.message
    client.sock.send_multipart([bytes([P.MsgType.HELLO]), msgpack.packb({"v": 0, "id": 3})])
    reply = client.recv()
    assert isinstance(reply, P.Error) and reply.code == "version" and reply.request_id == 3
    client.close()


@pytest.mark.parametrize("split", ["input", *SPLITS])
@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_results_equal_the_whole_model(server, model, ctx, split, codec):
    client = RawClient(server.endpoint, ctx)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    reply = client.request(client.infer_msg(model.fingerprint, split, model.crossing(split, x),
                                            codec, deadline_s=5.0))
    assert isinstance(reply, P.Result), reply
    logits = reply.tensor()
    assert logits.shape == (3, 10)
    tol = 1e-5 if codec == "fp32" else 2e-2
    torch.testing.assert_close(logits, model.expected(x), atol=tol, rtol=tol)
    assert reply.tail_s > 0 and reply.queue_s >= 0 and reply.decode_s > 0
    client.close()


def test_concurrent_edges_form_batches_and_get_their_own_answers(server, model, ctx):
    clients = [RawClient(server.endpoint, ctx) for _ in range(6)]
    inputs, outgoing = {}, []
    for round_ in range(4):
        for c, client in enumerate(clients):
            x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(100 * round_ + c))
            msg = client.infer_msg(model.fingerprint, "layer2.2", model.crossing("layer2.2", x))
            inputs[(c, msg.request_id)] = x
            outgoing.append((client, msg))
    for client, msg in outgoing:       # all at once, as many busy edges would
        client.send(msg)
    sizes = []
    for c, client in enumerate(clients):
        for _ in range(4):
            reply = client.recv()
            assert isinstance(reply, P.Result), reply
            sizes.append(reply.batch_size)
            torch.testing.assert_close(reply.tensor(), model.expected(inputs[(c, reply.request_id)]),
                                       atol=1e-5, rtol=1e-5)
    assert max(sizes) > 1, sizes
    assert server.sample("tether_cloud_batch_size_count", {"model": "cifar_resnet20",
                                                           "split": "layer2.2"}) < len(sizes)
    for client in clients:
        client.close()


def _bad_inputs(model, client):
    fp = model.fingerprint
    good = client.infer_msg(fp, "layer1.2", model.crossing("layer1.2", torch.rand(1, 3, 32, 32)))
    frames = [bytes(f) for f in P.encode(good)]
    header = msgpack.unpackb(frames[1])
    return [
        ("unknown_split", P.encode(P.Infer(11, fp, "layer9", "fp32", good.codec_header, None,
                                           good.payload))),
        ("unknown_codec", P.encode(P.Infer(12, fp, "layer1.2", "zstd-99", good.codec_header, None,
                                           good.payload))),
        ("bundle", P.encode(P.Infer(13, "e" * 64, "layer1.2", "fp32", good.codec_header, None,
                                    good.payload))),
        ("bad_input", P.encode(client.infer_msg(fp, "layer1.2", torch.rand(1, 3, 32, 32), request_id=14))),
        ("bad_input", P.encode(client.infer_msg(fp, "input", torch.rand(1, 3, 16, 16), request_id=15))),
        ("bad_payload", [frames[0], msgpack.packb({**header, "id": 16, "sizes": [10]}), frames[2][:10]]),
        ("bad_payload", [frames[0], msgpack.packb({**header, "id": 17, "codec_header": {
            **header["codec_header"], "dtype": "int64"}}), frames[2]]),
        ("protocol", [frames[0], msgpack.packb({**header, "id": 18}), frames[2][:-4]]),   # truncated
        ("protocol", [frames[0], frames[1][:-3], frames[2]]),                             # cut header
        ("protocol", [b"\x77", frames[1]]),
        ("protocol", [frames[0], msgpack.packb({**header, "id": 19, "sizes": [2 << 20] * 3}),
                      *[b"\0" * (2 << 20)] * 3]),                                         # oversized
        ("protocol", [bytes([P.MsgType.RESULT]), msgpack.packb({"v": 1, "id": 20})]),   # wrong way
    ]


def test_bad_input_gets_an_error_and_others_are_still_served(server, model, ctx):
    bad, good = RawClient(server.endpoint, ctx), RawClient(server.endpoint, ctx)
    x = torch.rand(2, 3, 32, 32)
    for code, frames in _bad_inputs(model, bad):
        bad.sock.send_multipart(frames)
        good.send(good.infer_msg(model.fingerprint, "layer1.2", model.crossing("layer1.2", x)))
        reply = bad.recv()
        assert isinstance(reply, P.Error), (code, reply)
        assert reply.code == code, (code, reply.message)
        ok = good.recv()
        assert isinstance(ok, P.Result)
        torch.testing.assert_close(ok.tensor(), model.expected(x), atol=1e-5, rtol=1e-5)
    assert server.sample("tether_cloud_errors_total", {"code": "protocol"}) >= 5
    bad.close(), good.close()


def test_a_frame_beyond_the_socket_limit_drops_only_that_connection(server, model, ctx):
    rogue, good = RawClient(server.endpoint, ctx), RawClient(server.endpoint, ctx)
    rogue.sock.send_multipart([bytes([P.MsgType.INFER]), b"\0" * (5 << 20)])
    x = torch.rand(1, 3, 32, 32)
    reply = good.request(good.infer_msg(model.fingerprint, "input", x))
    assert isinstance(reply, P.Result)
    with pytest.raises(TimeoutError):
        rogue.recv(timeout=0.5)
    rogue.close(), good.close()


def test_ping_pong_and_http_endpoints(server, ctx):
    client = RawClient(server.endpoint, ctx)
    pong = client.request(P.Ping(5, 12.5))
    assert isinstance(pong, P.Pong) and pong.t == 12.5 and pong.request_id == 5
    base = f"http://127.0.0.1:{server.server.metrics_port}"
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    for name in ("tether_cloud_requests_total", "tether_cloud_queue_depth",
                 "tether_cloud_batch_size_bucket", "tether_cloud_queue_seconds_bucket",
                 "tether_cloud_tail_seconds_bucket", "tether_cloud_received_bytes_total"):
        assert name in text
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert json.loads(urllib.request.urlopen(base + "/readyz", timeout=5).read())["ready"] is True
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/nope", timeout=5)
    assert err.value.code == 404
    client.close()


def test_session_messages_without_llm_bundle_are_refused(server, ctx):
    client = RawClient(server.endpoint, ctx)
    reply = client.request(P.Close(9, "s1"))
    assert isinstance(reply, P.Error) and reply.code == "session"
    client.close()
