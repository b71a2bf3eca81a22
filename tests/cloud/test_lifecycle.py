"""Overload, deadlines, draining, SIGTERM in a real process, CURVE, and the in-process twin."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth

from tether.cloud import CloudConfig
from tether.cloud.config import CloudCurveConfig
from tether.cloud.twin import InProcessCloud
from tether.core import protocol as P

from support.cloud import SPLITS, RawClient, ServerThread, slow_bundle

REPO = Path(__file__).resolve().parents[2]


def _config(**kw) -> CloudConfig:
    return CloudConfig(bind="tcp://127.0.0.1:*", **kw)


def _slow_infer(client, rid, deadline_s=None):
    return client.infer_msg("f" * 64, "input", torch.ones(1, 4), deadline_s=deadline_s, request_id=rid)


def test_overload_answers_busy_at_once_and_the_queue_bound_holds(ctx):
    bundle, tail = slow_bundle(0.05)
    config = _config(max_batch_size=2, max_queue=4, max_queue_delay_s=0.0)
    with ServerThread(config, [bundle]) as srv:
        client = RawClient(srv.endpoint, ctx)
        for rid in range(1, 41):
            client.send(_slow_infer(client, rid))
        replies = {}
        t0 = time.perf_counter()
        first_busy = None
        while len(replies) < 40:
            reply = client.recv()
            replies[reply.request_id] = reply
            if isinstance(reply, P.Busy) and first_busy is None:
                first_busy = time.perf_counter() - t0
        busy = [r for r in replies.values() if isinstance(r, P.Busy)]
        done = [r for r in replies.values() if isinstance(r, P.Result)]
        assert busy and all(b.reason == "queue_full" and b.queue_depth <= 4 for b in busy)
        assert len(done) + len(busy) == 40 and len(done) <= 4 + 2 + 2   # queue + running batches
        assert first_busy < 0.05                       # refused at once, not after queueing
        assert max(tail.batches) <= 2
        assert srv.sample("tether_cloud_busy_total", {"reason": "queue_full"}) == len(busy)
        assert srv.sample("tether_cloud_queue_depth") == 0
        client.close()


def test_queued_bytes_are_bounded_too(ctx):
    bundle, _ = slow_bundle(0.05)
    big = torch.ones(64, 4)                          # 1 KiB of payload per request
    config = _config(max_batch_size=1, max_queue=1000, max_queue_bytes=4 * 1100,
                     max_request_samples=64)
    with ServerThread(config, [bundle]) as srv:
        client = RawClient(srv.endpoint, ctx)
        for rid in range(1, 21):
            client.send(client.infer_msg("f" * 64, "input", big, request_id=rid))
        replies = [client.recv() for _ in range(20)]
        busy = [r for r in replies if isinstance(r, P.Busy)]
        assert len([r for r in replies if isinstance(r, P.Result)]) <= 4 + 1
        assert len(busy) >= 15 and all(b.reason == "queue_full" for b in busy)
        assert srv.sample("tether_cloud_queue_bytes") == 0
        client.close()


def test_a_deadline_that_cannot_be_met_is_refused(ctx):
    bundle, _ = slow_bundle(0.05)
    with ServerThread(_config(max_batch_size=1), [bundle]) as srv:
        client = RawClient(srv.endpoint, ctx)
        assert isinstance(client.request(_slow_infer(client, 1, deadline_s=5.0)), P.Result)
        reply = client.request(_slow_infer(client, 2, deadline_s=0.01))   # tail takes 50 ms
        assert isinstance(reply, P.Busy) and reply.reason == "deadline"
        assert reply.retry_after_s >= 0.04
        client.close()


def test_drain_finishes_queued_work_then_refuses(ctx):
    bundle, _ = slow_bundle(0.03)
    with ServerThread(_config(max_batch_size=1, max_queue=64), [bundle]) as srv:
        client = RawClient(srv.endpoint, ctx)
        for rid in range(1, 11):
            client.send(_slow_infer(client, rid))
        time.sleep(0.05)
        stop = asyncio.run_coroutine_threadsafe(srv.server.core.drain(10), srv.loop)
        time.sleep(0.02)
        client.send(_slow_infer(client, 99))
        replies = {r.request_id: r for r in (client.recv() for _ in range(11))}
        assert stop.result(10) is True
        assert srv.server._health() == (True, False)        # /healthz 200, /readyz 503
        assert all(isinstance(replies[i], P.Result) for i in range(1, 11))
        assert isinstance(replies[99], P.Busy) and replies[99].reason == "draining"
        client.close()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from tether.partitioner import export_bundle
    out = tmp_path_factory.mktemp("cloud") / "resnet20"
    export_bundle("cifar_resnet20", out, splits=["layer1.2"], repeats=1, warmup=0, progress=False,
                  profile_all=False)
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_cleanly(bundle_dir, ctx, tmp_path):
    from tether.partitioner import BundleModel
    bm = BundleModel.load(bundle_dir)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "cloud", "--bundle", str(bundle_dir), "--bind", endpoint,
         "--max-batch-size", "4", "--torch-threads", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=(tmp_path / "log").open("w"), text=True)
    try:
        assert "ready on" in proc.stdout.readline()
        client = RawClient(endpoint, ctx)
        x = torch.rand(1, 3, 32, 32)
        with torch.inference_mode():
            head, expected = bm.head("layer1.2")(x), bm.full_model()(x)
        for rid in range(1, 31):
            client.send(client.infer_msg(bm.manifest.fingerprint, "layer1.2", head, request_id=rid))
        first = client.recv()
        proc.send_signal(signal.SIGTERM)
        replies = [first] + [client.recv(timeout=10) for _ in range(29)]
        assert proc.wait(timeout=20) == 0
        results = [r for r in replies if isinstance(r, P.Result)]
        assert {r.request_id for r in replies} == set(range(1, 31))      # nothing lost
        assert all(isinstance(r, (P.Result, P.Busy)) for r in replies)
        assert all(r.reason == "draining" for r in replies if isinstance(r, P.Busy))
        for r in results:
            torch.testing.assert_close(r.tensor(), expected, atol=1e-5, rtol=1e-5)
        log = (tmp_path / "log").read_text()
        assert "draining" in log and "tether cloud stopped" in log, log
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_curve_serves_allowed_clients_and_refuses_unknown_keys(tmp_path, ctx):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    keys.mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(str(keys), "server")
    good_pub, good_sec = zmq.auth.create_certificates(str(keys), "good")
    _, bad_sec = zmq.auth.create_certificates(str(keys), "stranger")
    os.replace(good_pub, allowed / "good.key")
    server_key, _ = zmq.auth.load_certificate(server_pub)
    bundle, _ = slow_bundle(0.0)
    config = _config(curve=CloudCurveConfig(Path(server_sec), allowed))
    with ServerThread(config, [bundle]) as srv:
        good = RawClient(srv.endpoint, ctx, (server_key, *zmq.auth.load_certificate(good_sec)))
        assert isinstance(good.request(_slow_infer(good, 1)), P.Result)
        stranger = RawClient(srv.endpoint, ctx, (server_key, *zmq.auth.load_certificate(bad_sec)))
        stranger.send(_slow_infer(stranger, 2))
        with pytest.raises(TimeoutError):
            stranger.recv(timeout=1.0)
        plain = RawClient(srv.endpoint, ctx)
        plain.send(_slow_infer(plain, 3))
        with pytest.raises(TimeoutError):
            plain.recv(timeout=0.5)
        assert srv.sample("tether_cloud_requests_total", {"model": "slow", "split": "input",
                                                          "codec": "fp32", "outcome": "ok"}) == 1
        good.close(), stranger.close(), plain.close()


def test_in_process_twin_runs_the_same_path(model):
    async def main():
        async with InProcessCloud([model.bundle()], CloudConfig(max_batch_size=4,
                                                                max_queue_delay_s=0.01)) as cloud:
            ready = await cloud.request(P.Hello(1, "e"))
            assert ready.bundle(model.fingerprint).splits == ("input", *SPLITS)
            xs = [torch.rand(1, 3, 32, 32) for _ in range(8)]
            client = RawClient.__new__(RawClient)
            client._ids = iter(range(1, 100))
            msgs = [client.infer_msg(model.fingerprint, "layer1.2", model.crossing("layer1.2", x))
                    for x in xs]
            replies = await asyncio.gather(*(cloud.request(m) for m in msgs))
            for x, r in zip(xs, replies):
                torch.testing.assert_close(r.tensor(), model.expected(x), atol=1e-5, rtol=1e-5)
            assert max(r.batch_size for r in replies) == 4
            bad = await cloud.request_frames([b"\x03", b"\x80"])
            assert isinstance(P.decode(bad), P.Error)
    asyncio.run(main())


class EchoSessions:
    """A stand-in LLM engine: answers every session message with its position as a tensor."""

    bundle = P.BundleInfo("tiny-llm", "1" * 64, ("layer2",), ("fp16",))

    async def handle(self, msg):
        if isinstance(msg, P.Close):
            raise KeyError("no such session")
        return P.result_for(msg.request_id, torch.tensor([msg.position]))


def test_session_messages_go_to_the_session_handler(model):
    async def main():
        cloud = InProcessCloud([model.bundle()], sessions=EchoSessions())
        async with cloud:
            ready = await cloud.request(P.Hello(1, "e", (EchoSessions.bundle,)))
            assert isinstance(ready, P.Ready) and ready.bundle("1" * 64).model_id == "tiny-llm"
            reply = await cloud.request(P.Decode(2, "s", "1" * 64, "layer2", "fp16", 7))
            assert isinstance(reply, P.Result) and reply.tensor().item() == 7
            failed = await cloud.request(P.Close(3, "s"))
            assert isinstance(failed, P.Error) and failed.request_id == 3
        llm_only = InProcessCloud([], sessions=EchoSessions())
        async with llm_only:
            assert isinstance(await llm_only.request(P.Hello(1, "e")), P.Ready)
    asyncio.run(main())


def test_a_reply_to_a_vanished_edge_is_dropped_and_service_goes_on(ctx):
    bundle, _ = slow_bundle(0.2)
    with ServerThread(_config(), [bundle]) as srv:
        leaving = RawClient(srv.endpoint, ctx)
        leaving.send(_slow_infer(leaving, 1))
        time.sleep(0.05)
        leaving.close()
        deadline = time.monotonic() + 5
        while srv.server.dropped_replies == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.dropped_replies == 1
        staying = RawClient(srv.endpoint, ctx)
        assert isinstance(staying.request(_slow_infer(staying, 2)), P.Result)
        assert srv.sample("tether_cloud_inflight_requests") == 0
        staying.close()


def test_fuzzed_frames_always_get_a_reply_and_the_twin_keeps_serving(model):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = RawClient.__new__(RawClient)
    good._ids = iter(range(1, 1 << 20))
    x = torch.rand(1, 3, 32, 32)
    valid = [bytes(f) for f in P.encode(good.infer_msg(model.fingerprint, "layer2.2",
                                                       model.crossing("layer2.2", x)))]
    loop = asyncio.new_event_loop()
    cloud = InProcessCloud([model.bundle()])
    loop.run_until_complete(cloud.start())

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2), st.integers(0, 10_000), st.binary(max_size=24))
    def fuzz(i, cut, junk):
        frames = list(valid)
        frames[i] = frames[i][:cut % (len(frames[i]) + 1)] + junk
        reply = P.decode(loop.run_until_complete(cloud.request_frames(frames)))
        assert isinstance(reply, (P.Result, P.Error, P.Busy))

    try:
        fuzz()
        ok = loop.run_until_complete(cloud.request(P.decode(valid)))
        torch.testing.assert_close(ok.tensor(), model.expected(x), atol=1e-5, rtol=1e-5)
    finally:
        loop.run_until_complete(cloud.close())
        loop.close()
