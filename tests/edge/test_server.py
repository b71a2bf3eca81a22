"""The edge's local endpoint in-process over real sockets: answers, bad input, BUSY, drain."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from tether.core import protocol as P
from tether.core.policy import FixedPolicy
from tether.core.types import LOCAL
from tether.edge.agent import EdgeAgent
from tether.edge.compute import EdgeCompute
from tether.edge.config import EdgeConfig
from tether.edge.server import EdgeServer

from support.bundles import reference_logits, sample_images
from support.fakes import run

IMAGES = sample_images(4)


class SlowCompute(EdgeCompute):
    """The real compute, 50 ms slower per whole-model run (to fill queues on purpose)."""

    def full(self, x, stop=None):
        time.sleep(0.05)
        return super().full(x, stop)


def _infer_frames(rid, image):
    desc, view = P.tensor_frame(image)
    return P.encode(P.ImageRequest(rid, (desc,), (view,), 2.0))


def _old_infer_frames(rid, image):
    """What clients before the declared app-endpoint messages sent: the cloud's INFER."""
    desc, view = P.tensor_frame(image)
    return P.encode(P.Infer(rid, "", "input", "tensor", desc.to_wire(), 2.0, (view,)))


async def _serve(compute, queue_size=8, workers=2):
    agent = EdgeAgent(compute, FixedPolicy(LOCAL), EdgeConfig())
    server = EdgeServer(agent, "tcp://127.0.0.1:0", queue_size, workers)
    endpoint = await server.start()
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return agent, server, sock


async def _recv(sock, n):
    return [P.decode(await asyncio.wait_for(sock.recv_multipart(), 10)) for _ in range(n)]


def test_endpoint_answers_and_survives_bad_messages(bundle):
    compute = EdgeCompute(bundle)
    expected = reference_logits(bundle, IMAGES)

    async def scenario():
        agent, server, sock = await _serve(compute)
        try:
            await sock.send_multipart(P.encode(P.Hello(1, "app")))
            await sock.send_multipart(P.encode(P.Ping(2, 1.5)))
            await sock.send_multipart([b"\x03", b"\xc1not msgpack"])            # malformed
            await sock.send_multipart(_old_infer_frames(4, IMAGES[0]))
            await sock.send_multipart(_infer_frames(5, np.zeros((3, 8, 8), np.float32)))
            await sock.send_multipart(P.encode(P.Result(6)))                    # wrong direction
            await sock.send_multipart(_infer_frames(7, IMAGES[1]))
            return {m.request_id: m for m in await _recv(sock, 7)}
        finally:
            sock.close()
            await server.stop(1.0)
            await agent.close()
    replies = run(scenario())
    ready = replies[1]
    assert isinstance(ready, P.Ready) and ready.bundles[0].fingerprint == compute.fingerprint
    assert ready.bundles[0].input.shape == (1, 3, 32, 32)
    assert isinstance(replies[2], P.Pong) and replies[2].t == 1.5
    assert isinstance(replies[0], P.Error) and replies[0].code == "protocol"
    assert isinstance(replies[4], P.Error) and replies[4].code == "protocol"
    assert "INFER is the cloud's message" in replies[4].message and "ImageRequest" in \
        replies[4].message
    assert isinstance(replies[5], P.Error) and replies[5].code == "bad_input"
    assert isinstance(replies[6], P.Error) and replies[6].code == "protocol"
    result = replies[7]
    assert isinstance(result, P.ImageReply)
    np.testing.assert_allclose(P.frame_array(result.tensors[0], result.payload[0])[0],
                               expected[1], rtol=1e-4, atol=1e-4)
    assert result.record["outcome"] == "local" and result.record["total_seconds"] > 0


def test_full_queue_answers_busy_at_once_and_drain_refuses_new_work(bundle):
    compute = SlowCompute(bundle)

    async def scenario():
        agent, server, sock = await _serve(compute, queue_size=2, workers=1)
        try:
            for rid in range(1, 9):
                await sock.send_multipart(_infer_frames(rid, IMAGES[rid % 4]))
            replies = await _recv(sock, 8)
            for rid in (11, 12):                       # work in progress when SIGTERM comes
                await sock.send_multipart(_infer_frames(rid, IMAGES[0]))
            await asyncio.sleep(0.02)
            stopping = asyncio.create_task(server.stop(5.0))
            await asyncio.sleep(0.01)
            await sock.send_multipart(_infer_frames(99, IMAGES[0]))
            during = {m.request_id: m for m in await _recv(sock, 3)}
            await stopping
            return replies, during
        finally:
            sock.close()
            await agent.close()
    replies, during = run(scenario())
    kinds = [type(m).__name__ for m in replies]
    assert sorted(m.request_id for m in replies) == list(range(1, 9))   # every request answered
    assert kinds.count("Busy") >= 4 and kinds.count("ImageReply") >= 2
    assert all(m.reason == "queue_full" for m in replies if isinstance(m, P.Busy))
    assert isinstance(during[11], P.ImageReply) and isinstance(during[12], P.ImageReply)
    assert isinstance(during[99], P.Busy) and during[99].reason == "draining"


@pytest.mark.parametrize("queue_size", [0, -1])
def test_bad_server_sizes_are_rejected(queue_size):
    with pytest.raises(Exception):
        EdgeConfig(queue_size=queue_size)


def _serve_for_client(compute, limits=P.DEFAULT_LIMITS):
    agent = EdgeAgent(compute, FixedPolicy(LOCAL), EdgeConfig())
    return agent, EdgeServer(agent, "tcp://127.0.0.1:0", 8, 2, limits=limits)


def test_client_gets_an_error_for_oversized_or_non_finite_input_at_once(bundle):
    """Defects: an oversized message got an ERROR with id 0 that EdgeClient ignored (it then
    waited its whole timeout); a NaN image came back as a confident class-0 answer."""
    from tether.core.errors import InputShapeError, ProtocolError
    from tether.edge.client import EdgeClient

    limits = P.Limits(max_message_bytes=64 * 1024)

    async def scenario():
        agent, server = _serve_for_client(EdgeCompute(bundle), limits)
        endpoint = await server.start()
        loop = asyncio.get_running_loop()
        client = EdgeClient(endpoint, timeout=20)

        def calls():
            out = {}
            t0 = time.monotonic()
            with pytest.raises(ProtocolError, match="exceeds max_message_bytes"):
                client.infer(np.zeros((1, 3, 128, 128), np.float32))      # 196 KiB
            out["oversized_s"] = time.monotonic() - t0
            nan = IMAGES[0].astype(np.float32).transpose(2, 0, 1)[None] / 255
            nan[0, 1, 5, 5] = np.nan
            with pytest.raises(InputShapeError, match="NaN/Inf"):
                client.infer(nan)
            with pytest.raises(InputShapeError, match="NaN/Inf"):
                client.infer(np.full((1, 3, 32, 32), np.inf, np.float32))
            out["after"] = client.infer(IMAGES[1]).prediction
            return out
        try:
            return await loop.run_in_executor(None, calls)
        finally:
            client.close()
            await server.stop(1.0)
            await agent.close()
    out = run(scenario())
    assert out["oversized_s"] < 5.0           # not the 20 s timeout
    assert out["after"] == int(np.argmax(reference_logits(bundle, IMAGES[1:2])[0]))
