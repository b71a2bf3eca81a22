"""Issue 15, cloud half: admission that cannot stick, deadline drops, replies on drain timeout,
non-finite inputs. Real sockets on 127.0.0.1 (ServerThread + RawClient) or the in-process twin."""

from __future__ import annotations

import asyncio
import time

import torch

from tether.cloud import CloudConfig, ServedBundle
from tether.cloud.admission import HALFLIFE_S, CostModel
from tether.cloud.twin import InProcessCloud
from tether.core import protocol as P
from tether.core.errors import DeadlineExceededError, NonFiniteInputError
from tether.core.types import TensorSpec

from support.cloud import RawClient, ServerThread, slow_bundle

FP = "f" * 64


class PerSampleTail(torch.nn.Module):
    """A tail whose time grows with the rows it computes, like a real model's."""

    def __init__(self, seconds_per_sample: float) -> None:
        super().__init__()
        self.seconds_per_sample = seconds_per_sample
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds_per_sample * x.shape[0])
        self.rows.append(x.shape[0])
        return x.sum(dim=1, keepdim=True)


def _config(**kw) -> CloudConfig:
    return CloudConfig(bind="tcp://127.0.0.1:*", **kw)


def _infer(client: RawClient, rid: int, rows: int = 1, deadline_s: float | None = None) -> P.Infer:
    return client.infer_msg(FP, "input", torch.ones(rows, 4), deadline_s=deadline_s, request_id=rid)


def test_an_idle_cloud_admits_single_requests_after_a_heavy_burst(ctx):
    # defect 1: 16 x 64 images (no deadline), then 1-image requests with a deadline the
    # empty queue easily meets were all refused "deadline" by a batch-time estimate that stuck
    tail = PerSampleTail(0.0005)                       # 1024 rows: ~0.5 s; one row: 0.5 ms
    bundle = ServedBundle("slow", FP, TensorSpec((1, 4)), {}, lambda s: tail)
    with ServerThread(_config(max_batch_size=16, max_request_samples=64), [bundle]) as srv:
        client = RawClient(srv.endpoint, ctx)
        for rid in range(1, 17):
            client.send(_infer(client, rid, rows=64))
        burst = [client.recv(timeout=30) for _ in range(16)]
        assert all(isinstance(r, P.Result) for r in burst)
        assert srv.server.core.queue_depth == 0
        replies = [client.request(_infer(client, 100 + i, deadline_s=0.05)) for i in range(20)]
        refused = [r for r in replies if not isinstance(r, P.Result)]
        assert not refused, refused[:3]
        assert srv.sample("tether_cloud_busy_total", {"reason": "deadline"}) == 0
        assert client.request(P.Ping(999, 1.0)).queue_s == 0.0      # idle: no backlog reported
        client.close()


def test_a_stale_cost_estimate_decays_so_a_refusal_cannot_stick():
    costs = CostModel()
    costs.learn(3.6, 1024 * 64 * 4, now=100.0)                  # the heavy burst's batch
    one_image = 4 * 4
    assert costs.cost(1, one_image, 16, now=100.0) < 0.001       # per byte: cheap
    costs.learn(0.5, 16, now=100.0)                             # a fixed-cost tail: 0.5 s a call
    fresh = costs.cost(1, one_image, 16, now=100.0)
    assert fresh > 0.05
    later = costs.cost(1, one_image, 16, now=100.0 + 4 * HALFLIFE_S)
    assert later < fresh / 10                                   # decays with time unrefreshed
    costs.learn(0.01, 16, now=100.0 + 20 * HALFLIFE_S)          # re-measured: the new value wins
    assert abs(costs.batch_s - 0.01) < 1e-4


def test_a_deadline_the_empty_queue_cannot_meet_is_still_refused(ctx):
    bundle, _ = slow_bundle(0.05)
    with ServerThread(_config(max_batch_size=1), [bundle]) as srv:
        client = RawClient(srv.endpoint, ctx)
        assert isinstance(client.request(_infer(client, 1, deadline_s=5.0)), P.Result)
        reply = client.request(_infer(client, 2, deadline_s=0.01))
        assert isinstance(reply, P.Busy) and reply.reason == "deadline"
        assert isinstance(client.request(_infer(client, 3, deadline_s=0.5)), P.Result)
        client.close()


def test_expired_work_is_dropped_before_compute_with_a_typed_deadline_error(ctx):
    # defect 7: RESULTs came back after their deadline; Triton's queue policy drops them instead
    bundle, tail = slow_bundle(0.2)
    with ServerThread(_config(max_batch_size=1, max_queue=64), [bundle]) as srv:
        client = RawClient(srv.endpoint, ctx)
        warm_up = len(tail.batches)                                # the start-up warm-up run
        client.send(_infer(client, 1))                             # occupies the worker 0.2 s
        for rid in range(2, 7):
            client.send(_infer(client, rid, deadline_s=0.3))        # admitted: cost unknown yet
        replies = {r.request_id: r for r in (client.recv(timeout=10) for _ in range(6))}
        results = [r for r in replies.values() if isinstance(r, P.Result)]
        expired = [r for r in replies.values() if isinstance(r, P.Error)]
        assert len(results) + len(expired) == 6 and len(expired) >= 3
        assert all(r.code == "deadline" for r in expired)
        assert all(isinstance(r.to_exception(), DeadlineExceededError) for r in expired)
        assert all(r.queue_s <= 0.3 for r in results if r.request_id != 1)
        assert len(tail.batches) - warm_up == len(results)         # dropped before compute
        assert srv.sample("tether_cloud_deadline_expired_total",
                          {"model": "slow", "split": "input"}) == len(expired)
        client.close()


def test_drain_timeout_still_answers_every_admitted_request_once(ctx):
    # defect 6a: the batch running when the drain timed out never got a reply
    bundle, _ = slow_bundle(0.6)
    config = _config(max_batch_size=4, max_queue=64, drain_timeout_s=0.2)
    srv = ServerThread(config, [bundle]).__enter__()
    client = RawClient(srv.endpoint, ctx)
    try:
        for rid in range(1, 13):
            client.send(_infer(client, rid))
        time.sleep(0.1)                                            # a batch of 4 is running
        t0 = time.perf_counter()
        srv.stop()
        assert time.perf_counter() - t0 < 2.0                     # did not wait for the tail
        replies = [client.recv(timeout=5) for _ in range(12)]
        assert sorted(r.request_id for r in replies) == list(range(1, 13))
        assert all(isinstance(r, P.Busy) and r.reason == "draining" for r in replies)
        assert not client.sock.poll(300)                           # exactly one reply each
    finally:
        client.close()
        srv.stop()


def test_non_finite_inputs_get_a_typed_error_and_others_are_served(model):
    async def run() -> None:
        async with InProcessCloud([model.bundle()], CloudConfig(max_batch_size=4)) as cloud:
            from tether.codecs import make_codec
            x = torch.rand(2, 3, 32, 32)
            for bad in (float("nan"), float("inf")):
                poisoned = x.clone()
                poisoned[1, 0, 5, 5] = bad
                enc = make_codec("fp32").encode(poisoned)
                reply = await cloud.request(P.Infer(1, model.fingerprint, "input", "fp32",
                                                    enc.header, None, tuple(enc.payload)))
                assert isinstance(reply, P.Error) and reply.code == "non_finite", reply
                assert isinstance(reply.to_exception(), NonFiniteInputError)
            enc = make_codec("fp32").encode(x)
            ok = await cloud.request(P.Infer(2, model.fingerprint, "input", "fp32", enc.header,
                                             None, tuple(enc.payload)))
            torch.testing.assert_close(ok.tensor(), model.expected(x), atol=1e-5, rtol=1e-5)
    asyncio.run(run())
