"""ZmqCloudLink over real sockets against a scripted cloud: handshake, answers, failures, reconnect."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tether.core.errors import (BusyError, DeadlineExceededError, PeerUnavailableError,
                                SplitError)
from tether.edge.link import CloudLink, CloudRequest
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink

from support.fakes import FakeCloud, fingerprint_bundle, run

FAST = LinkTiming(heartbeat_interval=0.05, heartbeat_timeout=0.3, handshake_timeout=0.2,
                  reconnect_min=0.02, reconnect_max=0.2)


def _request(rid: int = 1, budget: float = 1.0, values=(1.0, 2.0, 3.0)) -> CloudRequest:
    payload = np.asarray(values, dtype=np.float32).tobytes()
    return CloudRequest(rid, "s1", "fp32", {"shape": [1, len(values)]}, [payload], budget)


async def _pair(mode: str = "echo", served=None, timing: LinkTiming = FAST):
    bundle = fingerprint_bundle()
    cloud = FakeCloud((served or bundle,), mode)
    endpoint = await cloud.start()
    link = ZmqCloudLink(endpoint, bundle, "edge-test", timing)
    await link.start()
    return cloud, link


def test_handshake_then_result_with_counted_bytes_and_cloud_times():
    async def scenario():
        cloud, link = await _pair()
        try:
            assert isinstance(link, CloudLink)
            assert await link.wait_ready(2.0)
            reply = await link.infer(_request(values=(1.0, 2.0, 3.0)))
            assert cloud.hellos[0].bundles[0].fingerprint == "f" * 64
            assert cloud.infers[0].deadline_s == pytest.approx(1.0)
            np.testing.assert_allclose(reply.logits, [[2.0, 3.0, 4.0]])
            assert (reply.queue_seconds, reply.decode_seconds, reply.tail_seconds) == \
                (0.001, 0.0005, 0.002)
            assert reply.bytes_sent > 12 and reply.bytes_received > 12
            assert reply.round_trip_seconds >= reply.network_seconds >= 0
            assert reply.extra["batch_size"] == 2
        finally:
            await link.close()
            await cloud.stop()
    run(scenario())


def test_refuses_cloud_without_this_fingerprint():
    async def scenario():
        cloud, link = await _pair(served=fingerprint_bundle("0" * 64))
        try:
            assert not await link.wait_ready(0.6)
            assert "does not serve this bundle" in link.last_refusal
            with pytest.raises(PeerUnavailableError):
                await link.infer(_request())
            assert cloud.infers == []          # nothing was ever sent
        finally:
            await link.close()
            await cloud.stop()
    run(scenario())


@pytest.mark.parametrize("mode, error", [("busy", BusyError), ("error", SplitError),
                                         ("silent", DeadlineExceededError)])
def test_cloud_failures_map_to_tether_errors(mode, error):
    async def scenario():
        cloud, link = await _pair(mode)
        try:
            assert await link.wait_ready(2.0)
            with pytest.raises(error) as info:
                await link.infer(_request(budget=0.2))
            assert info.value.bytes_sent > 0
        finally:
            await link.close()
            await cloud.stop()
    run(scenario())


def test_garbage_reply_is_dropped_and_request_times_out():
    async def scenario():
        cloud, link = await _pair("garbage")
        try:
            assert await link.wait_ready(2.0)
            with pytest.raises(DeadlineExceededError):
                await link.infer(_request(budget=0.2))
            assert link.ready                      # a bad message does not kill the link
        finally:
            await link.close()
            await cloud.stop()
    run(scenario())


def test_heartbeats_feed_rtt_samples():
    async def scenario():
        cloud, link = await _pair()
        samples: list[float] = []
        link.set_rtt_callback(samples.append)
        try:
            assert await link.wait_ready(2.0)
            await asyncio.sleep(0.3)
            assert cloud.pings >= 3 and len(samples) >= 3
            assert all(0 <= s < 0.1 for s in samples)
            assert 0 <= await link.ping(1.0) < 0.1
            assert link.cloud_queue_seconds == 0.004     # the cloud's queue delay from PONG
        finally:
            await link.close()
            await cloud.stop()
    run(scenario())


def test_cloud_death_fails_pending_at_once_and_restart_reconnects():
    async def scenario():
        cloud, link = await _pair("silent")
        endpoint = cloud.endpoint
        try:
            assert await link.wait_ready(2.0)
            pending = asyncio.create_task(link.infer(_request(budget=5.0)))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            await cloud.stop()
            with pytest.raises(PeerUnavailableError):
                await pending
            assert time.monotonic() - t0 < 1.0      # not the 5 s budget
            assert not link.ready
            restarted = FakeCloud((fingerprint_bundle(),), "echo", endpoint)
            await restarted.start()
            t1 = time.monotonic()
            assert await link.wait_ready(2.0)
            reply = await link.infer(_request())
            assert time.monotonic() - t1 < 2.0
            np.testing.assert_allclose(reply.logits, [[2.0, 3.0, 4.0]])
            assert link.connects == 2
            await restarted.stop()
        finally:
            await link.close()
    run(scenario())


def test_heartbeat_timeout_detects_a_mute_cloud_and_keeps_retrying():
    async def scenario():
        cloud, link = await _pair("mute")
        try:
            assert await link.wait_ready(2.0)
            t0 = time.monotonic()
            while link.ready and time.monotonic() - t0 < 3.0:
                await asyncio.sleep(0.01)
            lost_after = time.monotonic() - t0
            assert not link.ready and lost_after < FAST.heartbeat_timeout + 0.5
            await asyncio.sleep(0.5)
            assert len(cloud.hellos) >= 2            # it reconnected (and will again)
            assert link.cloud_queue_seconds == 0.0  # no PONG ever came
        finally:
            await link.close()
            await cloud.stop()
    run(scenario())
