"""End to end over real sockets on 127.0.0.1: edge agents against a real `tether cloud` process.

- 4 edges x 1 cloud, 200 requests each, at two split points: every answer equals the whole
  model's, and the cloud formed batches larger than one.
- The cloud is killed mid-stream: every request is still answered (local fallback); after a
  restart the edges reconnect and offload again within 2 s.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tether.core.policy import FixedPolicy
from tether.core.types import Action
from tether.edge.agent import EdgeAgent
from tether.edge.compute import EdgeCompute
from tether.edge.config import EdgeConfig
from tether.edge.records import ListSink
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink

from support.bundles import SPLITS, reference_logits, sample_images
from support.fakes import run

from support.procs import histogram_mean

pytestmark = pytest.mark.slow

IMAGES = sample_images(200)
TIMING = LinkTiming(heartbeat_interval=0.1, heartbeat_timeout=0.5, handshake_timeout=0.3,
                    reconnect_min=0.05, reconnect_max=0.25)


@pytest.fixture(scope="module")
def compute(bundle):
    return EdgeCompute(bundle)


@pytest.fixture(scope="module")
def expected(bundle):
    return reference_logits(bundle, IMAGES)


def _edge(compute, endpoint, split, name, deadline=5.0):
    config = EdgeConfig(edge_id=name, deadline_seconds=deadline)
    link = ZmqCloudLink(endpoint, compute.bundle_info(), name, TIMING)
    sink = ListSink()
    agent = EdgeAgent(compute, FixedPolicy(Action.parse(f"split:{split}:fp32")), config, link,
                      [sink])
    return agent, sink


async def _stream(agent, indices, concurrency):
    """Send ``indices`` through ``agent`` with ``concurrency`` requests in flight."""
    queue = list(indices)
    results = {}

    async def worker():
        while queue:
            i = queue.pop(0)
            results[i] = await agent.infer(IMAGES[i])
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def test_four_edges_one_cloud_equal_the_whole_model_and_batch(compute, expected, cloud):
    before = histogram_mean(cloud.daemon.metrics(), "tether_cloud_batch_size")

    async def scenario():
        edges = [_edge(compute, cloud.endpoint, SPLITS[i % 2], f"edge-{i}") for i in range(4)]
        for agent, _ in edges:
            await agent.start()
        assert all([await agent.link.wait_ready(10.0) for agent, _ in edges])
        try:
            return edges, await asyncio.gather(
                *(_stream(agent, range(len(IMAGES)), 6) for agent, _ in edges))
        finally:
            for agent, _ in edges:
                await agent.close()
    edges, all_results = run(scenario(), timeout=120)
    after = histogram_mean(cloud.daemon.metrics(), "tether_cloud_batch_size")
    batch_sum, batch_count = after[0] - before[0], after[1] - before[1]
    for (agent, sink), results in zip(edges, all_results):
        assert len(results) == len(IMAGES) == len(sink.records)
        assert {r.outcome for r in sink.records} == {"cloud"}
        got = np.stack([results[i].logits[0] for i in range(len(IMAGES))])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert [results[i].prediction for i in range(len(IMAGES))] == \
            list(np.argmax(expected, axis=1))
    assert batch_count > 0 and batch_sum / batch_count > 1.0, (batch_sum, batch_count)


async def _keep_sending(agent, stop, events):
    """Requests back to back until ``stop``; notes when the cloud answers after the restart."""
    sent = 0
    while not stop.is_set():
        result = await agent.infer(IMAGES[sent % len(IMAGES)])
        if result.record.outcome == "cloud" and "restarted" in events:
            events.setdefault(f"back-{agent.edge_id}", time.monotonic())
        sent += 1
        await asyncio.sleep(0.01)       # a steady stream, leaving CPU for the restarting cloud
    return sent


def test_cloud_killed_mid_stream_then_restarted(compute, expected, cloud):
    events: dict[str, float] = {}

    async def scenario():
        edges = [_edge(compute, cloud.endpoint, SPLITS[i], f"edge-{i}", deadline=0.5)
                 for i in range(2)]
        for agent, _ in edges:
            await agent.start()
            assert await agent.link.wait_ready(10.0)
        stop = asyncio.Event()
        senders = [asyncio.create_task(_keep_sending(a, stop, events)) for a, _ in edges]
        await asyncio.sleep(0.3)                  # a few answers from the cloud first
        await asyncio.to_thread(cloud.daemon.kill)
        await asyncio.sleep(0.3)                  # the restart below takes seconds more
        await asyncio.to_thread(cloud.start)
        events["restarted"] = time.monotonic()
        deadline = time.monotonic() + 5.0
        while sum(k.startswith("back-") for k in events) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        counts = await asyncio.gather(*senders)
        for agent, _ in edges:
            await agent.close()
        return edges, counts
    edges, counts = run(scenario(), timeout=180)
    for (agent, sink), count in zip(edges, counts):
        records = sink.records
        assert len(records) == count                      # every request got an answer
        outcomes = [r.outcome for r in records]
        assert outcomes[0] == "cloud" and outcomes[-1] == "cloud"
        fallbacks = [r for r in records if r.outcome == "fallback"]
        assert fallbacks and {r.fallback_reason for r in fallbacks} <= {"disconnected", "timeout"}
        assert all(r.total_seconds < 0.5 + 0.3 for r in records)
        for r in records:                                 # fallback answers are the model's too
            assert r.prediction == int(np.argmax(expected[(r.request_id - 1) % len(IMAGES)]))
        assert agent.link.connects >= 2                   # it reconnected
    for name in ("edge-0", "edge-1"):
        assert f"back-{name}" in events, events
        assert events[f"back-{name}"] - events["restarted"] < 2.0, events
