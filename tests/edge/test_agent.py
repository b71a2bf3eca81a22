"""EdgeAgent on a real bundle with the in-process cloud twin: every action, every fallback."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from tether.cloud.bundles import ServedBundle
from tether.cloud.config import CloudConfig
from tether.cloud.twin import InProcessCloud
from tether.core import protocol as P
from tether.core.bundle import ExitEntry, Manifest
from tether.core.errors import InputShapeError
from tether.core.metrics import EdgeMetrics
from tether.core.policy import FixedPolicy
from tether.core.types import LOCAL, Action
from tether.edge.agent import EdgeAgent
from tether.edge.compute import INPUT, EdgeCompute, StoppedError
from tether.edge.config import EdgeConfig
from tether.edge.inproc import InProcessLink
from tether.edge.records import ListSink

from support.bundles import SPLITS, reference_logits, sample_images
from support.fakes import run

IMAGES = sample_images(6)
CONFIG = EdgeConfig(deadline_seconds=5.0)


@pytest.fixture(scope="module")
def compute(bundle):
    return EdgeCompute(bundle)


@pytest.fixture(scope="module")
def served(bundle):
    return ServedBundle.load(bundle)


@pytest.fixture(scope="module")
def expected(bundle):
    return reference_logits(bundle, IMAGES)


class RecordingPolicy(FixedPolicy):
    def __init__(self, action):
        super().__init__(action)
        self.contexts, self.observations = [], []

    def decide(self, ctx):
        self.contexts.append(ctx)
        return self.action

    def observe(self, obs):
        self.observations.append(obs)


async def _agent_with_cloud(served, compute, action, config=CONFIG, peer=None):
    cloud = InProcessCloud([served], CloudConfig(max_queue_delay_s=0.0))
    await cloud.start()
    link = InProcessLink(peer or cloud, compute.bundle_info(), "edge-t")
    sink = ListSink()
    policy = RecordingPolicy(action)
    agent = EdgeAgent(compute, policy, config, link, [sink])
    await agent.start()
    return agent, cloud, sink, policy


@pytest.mark.parametrize("action", [f"split:{s}:fp32" for s in SPLITS] + ["offload:fp32"])
def test_cloud_actions_equal_the_whole_model(served, compute, expected, action):
    async def scenario():
        agent, cloud, sink, policy = await _agent_with_cloud(served, compute, Action.parse(action))
        try:
            results = await asyncio.gather(*(agent.infer(img) for img in IMAGES))
        finally:
            await agent.close()
            await cloud.close()
        for result, ref in zip(results, expected):
            np.testing.assert_allclose(result.logits[0], ref, rtol=1e-4, atol=1e-4)
            assert result.prediction == int(np.argmax(ref))
        records = sink.records
        assert [r.outcome for r in records] == ["cloud"] * len(IMAGES)
        assert all(r.action == action and r.fallback_reason == "" for r in records)
        crossing = 3 * 32 * 32 * 4 if action.startswith("offload") else \
            compute.manifest.split(action.split(":")[1]).bytes
        assert all(r.bytes_sent > crossing and r.bytes_received > 40 for r in records)
        assert all(r.tail_seconds > 0 and r.total_seconds >= r.head_seconds for r in records)
        assert all(o.ok and o.action == Action.parse(action) for o in policy.observations)
        assert all(c.cloud_available for c in policy.contexts)
        # the measured compute feeds the policy's online calibration
        for o, r in zip(policy.observations, records):
            assert o.edge_seconds == pytest.approx(r.head_seconds + r.encode_seconds + r.local_seconds)
            assert o.cloud_seconds == pytest.approx(r.cloud_decode_seconds + r.tail_seconds)
            assert o.cloud_seconds > 0
    run(scenario())


@pytest.mark.parametrize("threads", [1, 0])
def test_local_action_runs_the_whole_model_on_the_edge(bundle, compute, expected, threads):
    async def scenario():
        sink = ListSink()
        config = replace(CONFIG, compute_threads=threads)     # 0: inline on the event loop
        agent = EdgeAgent(compute, FixedPolicy(LOCAL), config, None, [sink])
        results = [await agent.infer(img) for img in IMAGES]
        await agent.close()
        return results, sink.records
    results, records = run(scenario())
    for result, ref in zip(results, expected):
        np.testing.assert_allclose(result.logits[0], ref, rtol=1e-4, atol=1e-4)
    assert {r.outcome for r in records} == {"local"}
    assert all(r.bytes_sent == 0 and r.local_seconds > 0 for r in records)


@pytest.mark.parametrize("action", [f"split:{SPLITS[0]}:fp32", "local"])
def test_busy_compute_thread_is_wait_not_compute(served, compute, action):
    """Issue 10: waiting for the (single) compute thread, busy with another request's
    compute, is not head/encode/local time."""
    from tether.edge.agent import _Timing

    async def scenario():
        config = replace(CONFIG, compute_threads=1)
        agent, cloud, sink, policy = await _agent_with_cloud(
            served, compute, Action.parse(action), config)
        await agent.infer(IMAGES[0])             # warm-up: first-call costs are not the point
        blocker = asyncio.ensure_future(agent._run(_Timing(), time.sleep, 0.3))
        await asyncio.sleep(0.02)                # another request's job holds the thread
        try:
            result = await agent.infer(IMAGES[1])
        finally:
            await blocker
            await agent.close()
            await cloud.close()
        return result.record, policy.observations[-1]
    record, obs = run(scenario())
    assert record.outcome == ("local" if action == "local" else "cloud")
    service = record.head_seconds + record.encode_seconds + record.local_seconds
    assert 0 < service < 0.1
    assert record.edge_wait_seconds >= 0.25
    assert record.total_seconds >= service + record.edge_wait_seconds
    assert obs.edge_seconds == pytest.approx(service)     # the calibration never sees the wait


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priority here")
def test_compute_threads_run_nicer_than_the_event_loop(compute):
    """On a weak core the loop's receives, sends and replies go before a whole-model run."""
    import threading

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario(nice):
        from tether.edge.agent import _Timing
        agent = EdgeAgent(compute, RecordingPolicy(LOCAL), replace(CONFIG, compute_threads=1,
                                                                     compute_nice=nice))
        try:
            return (await agent._run(_Timing(), niceness))[0]
        finally:
            await agent.close()
    base = niceness()
    assert run(scenario(7)) == min(19, base + 7)
    assert run(scenario(0)) == base


class ScriptedPeer:
    """A peer answering HELLO like the real cloud and INFER as scripted."""

    def __init__(self, cloud, mode):
        self.cloud, self.mode = cloud, mode

    async def request_frames(self, frames):
        msg = P.decode(frames)
        if isinstance(msg, P.Infer):
            if self.mode == "busy":
                return P.encode(P.Busy(msg.request_id, "queue_full", 9))
            if self.mode == "error":
                return P.encode(P.Error(msg.request_id, "bad_payload", "corrupt"))
            if self.mode == "slow":
                await asyncio.sleep(10)
            if self.mode == "late":
                await asyncio.sleep(0.4)
        return await self.cloud.request_frames(frames)


@pytest.mark.parametrize("mode, reason", [("busy", "busy"), ("error", "error"),
                                          ("slow", "timeout"), ("down", "disconnected")])
def test_failures_fall_back_to_the_local_model(served, compute, expected, mode, reason):
    async def scenario():
        config = replace(CONFIG, deadline_seconds=0.3)
        cloud = InProcessCloud([served])
        await cloud.start()
        agent, _, sink, policy = await _agent_with_cloud(
            served, compute, Action.parse(f"split:{SPLITS[0]}:fp16"), config,
            ScriptedPeer(cloud, mode))
        if mode == "down":
            agent.link.disconnect()
        try:
            results = await asyncio.gather(*(agent.infer(img) for img in IMAGES[:3]))
        finally:
            await agent.close()
            await cloud.close()
        for result, ref in zip(results, expected):
            np.testing.assert_allclose(result.logits[0], ref, rtol=1e-4, atol=1e-4)
        assert [(r.outcome, r.fallback_reason) for r in sink.records] == [("fallback", reason)] * 3
        assert all(r.total_seconds < 0.3 + 0.2 for r in sink.records)
        assert all(not o.ok for o in policy.observations)
        if mode != "down":
            assert all(r.bytes_sent > 0 and r.head_seconds > 0 for r in sink.records)
    run(scenario())


class PatientPolicy(RecordingPolicy):
    """Waits ``value`` seconds after the send ("boom": its patience raises)."""

    def __init__(self, action, value):
        super().__init__(action)
        self.value = value

    def patience(self, action):
        if self.value == "boom":
            raise RuntimeError("boom")
        return self.value


async def _patient_request(served, compute, mode, patience, deadline, linger, metrics=None):
    cloud = InProcessCloud([served])
    await cloud.start()
    link = InProcessLink(ScriptedPeer(cloud, mode), compute.bundle_info(), "edge-t")
    sink, policy = ListSink(), PatientPolicy(Action.parse(f"split:{SPLITS[0]}:fp16"), patience)
    agent = EdgeAgent(compute, policy, replace(CONFIG, deadline_seconds=deadline), link, [sink],
                      metrics=metrics)
    await agent.start()
    try:
        result = await agent.infer(IMAGES[0])
        at_answer = list(policy.observations)
        await asyncio.sleep(linger)       # the reply it gave up on is still awaited
    finally:
        await agent.close()
        await cloud.close()
    return result, at_answer, policy.observations


@pytest.mark.parametrize("mode, patience, deadline, reason", [
    ("slow", 0.05, 2.0, "overdue"), ("late", 0.05, 2.0, "overdue"), ("slow", None, 0.3, "timeout"),
    ("slow", 5.0, 0.3, "timeout"), ("slow", "boom", 0.3, "timeout")])
def test_patience_gives_up_an_overdue_offload(served, compute, expected, mode, patience,
                                              deadline, reason):
    linger = 2.3 if mode == "slow" and reason == "overdue" else 0.6
    result, at_answer, observed = run(_patient_request(served, compute, mode, patience,
                                                       deadline, linger))
    record = result.record
    np.testing.assert_allclose(result.logits[0], expected[0], rtol=1e-4, atol=1e-4)
    assert (record.outcome, record.fallback_reason) == ("fallback", reason)
    if reason == "timeout":      # waited for the deadline (less the local answer's reserve)
        assert deadline - 0.2 < record.total_seconds < deadline + 0.2
        assert len(at_answer) == 1 and not at_answer[0].ok
        return
    assert record.total_seconds < 0.35 and record.bytes_sent > 0    # well before 2 s
    assert at_answer == []       # the policy learns when the wait it gave up on ends
    assert len(observed) == 1
    if mode == "late":           # the reply came after all: a sample as if it had waited
        assert observed[0].ok and observed[0].bytes_received > 40
        assert observed[0].network_seconds > 0.3 and observed[0].cloud_seconds > 0
    else:                        # nothing by the deadline: the failure, at the deadline
        assert not observed[0].ok and 1.5 < observed[0].network_seconds < 2.1


class SlowLocalCompute(EdgeCompute):
    """The real compute whose whole model takes ``seconds`` (a weak edge), stoppable."""

    seconds = 1.0

    def __init__(self, bundle):
        super().__init__(bundle)
        self.stops = []

    def full(self, x, stop=None):
        self.stops.append(stop)
        for _ in range(int(self.seconds / 0.01)):
            if stop is not None and stop.requested:
                raise StoppedError("stopped")
            time.sleep(0.01)
        return super().full(x)


def _races(metrics):
    return {s.labels["winner"]: s.value for m in metrics.registry.collect()
            if m.name == "tether_edge_races" for s in m.samples if s.name.endswith("_total")}


def test_a_reply_that_beats_the_local_answer_is_the_answer(bundle, served, expected):
    """Overdue at 50 ms, the local answer takes 1 s and the reply comes at ~0.4 s: the
    cloud's answer is the request's and the local run is stopped; the policy observes a
    normal reply."""
    slow, metrics = SlowLocalCompute(bundle), EdgeMetrics(CollectorRegistry())
    result, at_answer, observed = run(_patient_request(served, slow, "late", 0.05, 3.0, 0.3,
                                                       metrics))
    record = result.record
    assert _races(metrics) == {"cloud": 1.0}     # counted: the stopped run cost edge CPU
    # the fp16 split's answer (the cloud's), not the edge's fp32 whole model
    np.testing.assert_allclose(result.logits[0], expected[0], rtol=1e-2, atol=1e-2)
    assert not np.allclose(result.logits[0], expected[0], rtol=1e-6, atol=1e-6)
    assert (record.outcome, record.fallback_reason) == ("cloud", "")
    assert 0.35 < record.total_seconds < 0.9 and record.bytes_received > 40
    assert record.local_seconds == 0.0 and record.network_seconds > 0.3
    assert len(slow.stops) == 1 and slow.stops[0].requested    # the local run was stopped
    assert len(at_answer) == 1 and at_answer[0].ok and at_answer[0].network_seconds > 0.3
    assert observed == at_answer                                # observed once, not again


def test_a_local_answer_that_beats_the_reply_is_the_answer(bundle, served, expected):
    slow, metrics = SlowLocalCompute(bundle), EdgeMetrics(CollectorRegistry())
    slow.seconds = 0.1
    result, at_answer, observed = run(_patient_request(served, slow, "late", 0.05, 3.0, 0.6,
                                                       metrics))
    assert _races(metrics) == {"local": 1.0}
    assert (result.record.outcome, result.record.fallback_reason) == ("fallback", "overdue")
    assert result.record.total_seconds < 0.35
    np.testing.assert_allclose(result.logits[0], expected[0], rtol=1e-4, atol=1e-4)
    assert not slow.stops[0].requested
    assert at_answer == [] and len(observed) == 1 and observed[0].ok   # the late reply


def test_an_overdue_offload_gives_up_those_sent_after_it(served, compute):
    """FIFO uplink: a request sent behind an overdue one is given up with it, not at its own
    patience (a stalled link must not cost each queued request its full patience)."""
    async def scenario():
        cloud = InProcessCloud([served])
        await cloud.start()
        link = InProcessLink(ScriptedPeer(cloud, "slow"), compute.bundle_info(), "edge-t")
        sink = ListSink()
        policy = PatientPolicy(Action.parse(f"split:{SPLITS[0]}:fp16"), 0.4)
        agent = EdgeAgent(compute, policy, replace(CONFIG, deadline_seconds=3.0), link, [sink])
        await agent.start()
        try:
            first = asyncio.ensure_future(agent.infer(IMAGES[0]))
            await asyncio.sleep(0.2)
            second = await agent.infer(IMAGES[1])
            return await first, second
        finally:
            await agent.close()
            await cloud.close()
    first, second = run(scenario())
    assert [r.record.fallback_reason for r in (first, second)] == ["overdue", "overdue"]
    assert first.record.total_seconds > 0.4
    assert second.record.total_seconds < 0.4 - 0.05     # with the first (~0.2 s in), not 0.4


def test_policy_asking_for_an_unknown_codec_still_gets_an_answer(served, compute, expected):
    async def scenario():
        agent, cloud, sink, _ = await _agent_with_cloud(
            served, compute, Action.parse(f"split:{SPLITS[1]}:zstd9"))
        result = await agent.infer(IMAGES[0])
        await agent.close()
        await cloud.close()
        return result
    result = run(scenario())
    assert (result.record.outcome, result.record.fallback_reason) == ("fallback", "error")
    np.testing.assert_allclose(result.logits[0], expected[0], rtol=1e-4, atol=1e-4)


def test_broken_policy_and_bad_input(bundle, compute):
    class Broken(FixedPolicy):
        def decide(self, ctx):
            raise RuntimeError("boom")

    async def scenario():
        agent = EdgeAgent(compute, Broken(LOCAL), CONFIG)
        result = await agent.infer(IMAGES[0])
        with pytest.raises(InputShapeError, match="HWC"):
            await agent.infer(np.zeros((31, 32, 3), np.uint8))
        with pytest.raises(InputShapeError, match="one sample"):
            await agent.infer(np.zeros((2, 3, 32, 32), np.float32))
        await agent.close()
        return result
    assert run(scenario()).record.outcome == "local"


def _with_exit(bundle, tmp_path, threshold):
    """A copy of the bundle with an ONNX early exit (pool + linear) at SPLITS[1]."""
    from tether.partitioner import export_onnx
    copy = tmp_path / f"bundle-exit-{threshold}"
    shutil.copytree(bundle, copy)
    entry = Manifest.load(copy).split(SPLITS[1])
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(entry.shape[1], 10))
    export_onnx(head, torch.zeros(entry.shape), copy / "exits" / "exit.onnx")
    manifest = Manifest.load(copy).with_exit(ExitEntry(SPLITS[1], "exits/exit.onnx", threshold))
    manifest.save(copy)
    return copy, head


@pytest.mark.parametrize("threshold, outcome", [(0.0, "exit"), (1.01, "cloud")])
def test_early_exit_answers_when_confident_else_offloads(bundle, tmp_path, expected,
                                                         threshold, outcome):
    copy, head = _with_exit(bundle, tmp_path, threshold)
    exit_compute = EdgeCompute(copy)

    async def scenario():
        agent, cloud, sink, policy = await _agent_with_cloud(
            ServedBundle.load(copy), exit_compute, Action.parse(f"exit:{SPLITS[1]}:fp32"))
        result = await agent.infer(IMAGES[0])
        await agent.close()
        await cloud.close()
        return result, policy
    result, policy = run(scenario())
    assert result.record.outcome == outcome
    if outcome == "exit":
        features = exit_compute.head(SPLITS[1], exit_compute.prepare(IMAGES[0]))
        with torch.inference_mode():
            ref = head(torch.from_numpy(features)).numpy()
        np.testing.assert_allclose(result.logits, ref, rtol=1e-4, atol=1e-4)
        assert result.record.bytes_sent == 0 and policy.observations[-1].exited
    else:
        np.testing.assert_allclose(result.logits[0], expected[0], rtol=1e-4, atol=1e-4)


def test_exit_fallback_mode_uses_the_exit_head(bundle, tmp_path):
    copy, _ = _with_exit(bundle, tmp_path, 1.01)
    exit_compute = EdgeCompute(copy)

    async def scenario():
        config = replace(CONFIG, fallback="exit")
        agent = EdgeAgent(exit_compute, FixedPolicy(Action.parse(f"split:{SPLITS[0]}:fp32")),
                          config, None)
        result = await agent.infer(IMAGES[1])
        await agent.close()
        return result
    result = run(scenario())
    assert (result.record.outcome, result.record.fallback_reason) == ("fallback", "disconnected")
    assert result.record.head_seconds > 0 and result.record.local_seconds > 0


def test_exit_trained_format_of_tether_codecs_is_used(bundle, served, tmp_path):
    """An exit written by tether.codecs (torch weights + ONNX, calibrated entry) answers."""
    import shutil
    from tether.codecs.exits import Calibration, ExitConfig, ExitHead, load_exit
    from tether.codecs.store import save_exit
    copy = tmp_path / "bundle-k-exit"
    shutil.copytree(bundle, copy)
    shape = Manifest.load(copy).split(SPLITS[0]).shape
    torch.manual_seed(1)
    head = ExitHead(ExitConfig(tuple(shape[1:]), 10)).eval()
    save_exit(copy, SPLITS[0], head, Calibration("entropy", 0.9, 10.0, 1.0, None), {})
    exit_compute = EdgeCompute(copy)

    async def scenario():
        agent = EdgeAgent(exit_compute, FixedPolicy(Action.parse(f"exit:{SPLITS[0]}:fp32")),
                          CONFIG)
        result = await agent.infer(IMAGES[2])
        await agent.close()
        return result
    result = run(scenario())
    assert result.record.outcome == "exit"          # entropy <= 10 nats: always confident
    features = exit_compute.head(SPLITS[0], exit_compute.prepare(IMAGES[2]))
    ref = load_exit(copy, split=SPLITS[0]).logits(features)
    np.testing.assert_allclose(result.logits, ref, rtol=1e-4, atol=1e-4)


def test_no_time_left_for_the_cloud_means_no_send(served, compute):
    """When the deadline minus the local-answer reserve leaves nothing, nothing is sent."""
    async def scenario():
        config = replace(CONFIG, deadline_seconds=0.5, fallback_reserve_seconds=10.0)
        agent, cloud, sink, _ = await _agent_with_cloud(
            served, compute, Action.parse(f"split:{SPLITS[0]}:fp32"), config)
        result = await agent.infer(IMAGES[0])
        await agent.close()
        await cloud.close()
        return result.record
    record = run(scenario())
    assert (record.outcome, record.fallback_reason, record.bytes_sent) == ("fallback", "timeout", 0)


def test_records_feed_prometheus_metrics(compute):
    registry = CollectorRegistry()

    async def scenario():
        agent = EdgeAgent(compute, FixedPolicy(Action.parse(f"split:{SPLITS[0]}:fp32")), CONFIG,
                          metrics=EdgeMetrics(registry))
        for img in IMAGES[:3]:
            await agent.infer(img)
        await agent.close()
    run(scenario())
    value = registry.get_sample_value
    assert value("tether_edge_requests_total", {"action": "split", "outcome": "fallback"}) == 3
    assert value("tether_edge_fallbacks_total", {"reason": "disconnected"}) == 3
    assert value("tether_edge_request_seconds_count", {"outcome": "fallback"}) == 3
    assert value("tether_edge_inflight_requests") == 0


def test_start_encodes_once_with_every_codec_the_edge_can_run(bundle, tmp_path, monkeypatch):
    # an image codec's first use loads its plugin (tens of ms unthrottled, most of a second
    # behind a weak quota): paid at start, not by the first request that picks it
    from tether.core.types import CodecCost, CostTable
    copy = tmp_path / "bundle-codecs"
    shutil.copytree(bundle, copy)
    path = copy / Manifest.load(copy).cost_table
    table = CostTable.load(path)
    measured = [CodecCost(INPUT, "webp75", 900, 1e-3, 1e-3, 0.9),
                CodecCost(INPUT, "jpeg90", 1500, 1e-3, 1e-3, 0.9),
                CodecCost(SPLITS[1], "int8-channel+zlib", 2000, 1e-3, 1e-3, 0.9),
                CodecCost("not-exported", "fp16", 2000, 1e-3, 1e-3, 0.9)]
    replace(table, codecs=tuple(measured)).save(path)
    calls = []
    encode = EdgeCompute.encode
    monkeypatch.setattr(EdgeCompute, "encode",
                        lambda self, s, c, f: calls.append((s, c)) or encode(self, s, c, f))
    EdgeCompute(copy)
    assert calls == [(c.split, c.codec) for c in measured[:3]]   # no head: not runnable


class SlowHeadCompute(SlowLocalCompute):
    """Head 0.1 s, whole model 0.3 s: a local answer can slip between head and encode."""

    seconds = 0.3

    def head(self, split, x):
        time.sleep(0.1)
        return super().head(split, x)


def test_head_and_encode_run_as_one_job(bundle, served):
    """A local answer decided while a split's head runs waits for that split's encode too,
    instead of delaying its send by the whole model (one compute thread, FIFO)."""
    async def scenario():
        cloud = InProcessCloud([served])
        await cloud.start()
        compute = SlowHeadCompute(bundle)
        link = InProcessLink(cloud, compute.bundle_info(), "edge-t")
        actions = [Action.parse(f"split:{SPLITS[0]}:fp16"), LOCAL]
        policy = RecordingPolicy(actions[0])
        policy.decide = lambda ctx: actions.pop(0)
        agent = EdgeAgent(compute, policy, CONFIG, link, [])
        await agent.start()
        try:
            first = asyncio.ensure_future(agent.infer(IMAGES[0]))
            await asyncio.sleep(0.03)                 # its head is running
            second = await agent.infer(IMAGES[1])
            return await first, second
        finally:
            await agent.close()
            await cloud.close()
    split, local = run(scenario())
    assert split.record.outcome == "cloud" and local.record.outcome == "local"
    # the first found the compute thread idle: no wait (its hand-off is the daemon's own time)
    assert split.record.edge_wait_seconds == 0.0 and split.record.total_seconds < 0.25
    assert split.record.head_seconds >= 0.1 and local.record.edge_wait_seconds > 0.05
