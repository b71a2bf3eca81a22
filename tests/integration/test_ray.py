"""`tether cloud --ray` on a real two-node Ray cluster on this machine (issue 12).

One local cluster per module (``ray.cluster_utils.Cluster``: a head and a second node, each
with its own raylet and a custom resource naming it); real `tether cloud` front processes
drive a pool of tail workers on it; edges are real EdgeAgents over ZeroMQ on 127.0.0.1.

- 4 edges x 200 requests equal the whole model, and workers on both nodes served batches;
- kill -9 of a worker mid-stream: every request answered once, the pool is back in 10 s;
- the whole cluster stops: ERROR replies, /readyz 503, edges fall back; it comes back on the
  same address: the same front serves again;
- a split LLM generation with sessions on 2 workers equals the whole model's (affinity).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray pool needs the extra: pip install -e '.[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from tether.core.policy import FixedPolicy  # noqa: E402
from tether.core.types import Action  # noqa: E402
from tether.edge.agent import EdgeAgent  # noqa: E402
from tether.edge.compute import EdgeCompute  # noqa: E402
from tether.edge.config import EdgeConfig  # noqa: E402
from tether.edge.records import ListSink  # noqa: E402
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink  # noqa: E402

from support.bundles import SPLITS, assets_dir, reference_logits, sample_images  # noqa: E402
from support.fakes import run  # noqa: E402

from support.procs import CloudHolder, free_port  # noqa: E402

pytestmark = pytest.mark.slow

IMAGES = sample_images(200)
TIMING = LinkTiming(heartbeat_interval=0.1, heartbeat_timeout=0.5, handshake_timeout=0.3,
                    reconnect_min=0.05, reconnect_max=0.25)
NODE_ARGS = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 80 * 1024 * 1024}


def _start_cluster(port: int) -> Cluster:
    cluster = Cluster(initialize_head=True, head_node_args={
        **NODE_ARGS, "gcs_server_port": port, "resources": {"node_head": 4}})
    cluster.add_node(**NODE_ARGS, resources={"node_second": 4})
    cluster.wait_for_nodes()
    return cluster


class RayHolder:
    """The module's Ray cluster, stoppable and restartable on the same address."""

    def __init__(self) -> None:
        self.port = free_port()
        self.cluster: Cluster | None = _start_cluster(self.port)
        self.address = self.cluster.address

    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.list_all_nodes()}

    def stop(self) -> None:
        """Kill every process of the cluster (a crash, not a shutdown)."""
        if self.cluster is not None:
            session = self.cluster.head_node.session_name
            for node in [*self.cluster.worker_nodes, self.cluster.head_node]:
                self.cluster.remove_node(node, allow_graceful=False)
            self.cluster = None
            _reap(session)

    def restart(self) -> None:
        self.cluster = _start_cluster(self.port)
        assert self.cluster.address.endswith(f":{self.port}")


def _reap(session: str) -> None:
    """SIGKILL what a killed raylet leaves behind (its agents, renamed ``ray::...``, still
    holding log files in the session directory) for ``session``."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"ray::"):
                continue                   # not the dispatcher (a driver holding logs there)
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            if any(session in link for link in links):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def ray_cluster():
    holder = RayHolder()
    yield holder
    holder.stop()


def _stories() -> Path | None:
    found = assets_dir()
    path = None if found is None else found / "tinyllm" / "stories260K.bin"
    return path if path is not None and path.is_file() else None


@pytest.fixture(scope="module")
def ray_cloud(bundle, ray_cluster, tmp_path_factory):
    """One front (the CIFAR bundle, plus stories260K sessions when the assets exist)."""
    logs = tmp_path_factory.mktemp("ray-cloud")
    config = logs / "cloud.toml"
    config.write_text("[cloud]\nmax_batch_size = 8\n[cloud.ray]\nstart_timeout_s = 60\n"
                      "batch_timeout_s = 20\nworker_queue = 2\n")
    llm = ("--llm-checkpoint", str(_stories())) if _stories() else ()
    holder = CloudHolder(bundle, logs, ("--config", str(config), "--ray", ray_cluster.address,
                                        "--tail-workers", "2", "--worker-cpus", "1", *llm))
    yield holder
    holder.stop()


@pytest.fixture(scope="module")
def compute(bundle):
    return EdgeCompute(bundle)


@pytest.fixture(scope="module")
def expected(bundle):
    return reference_logits(bundle, IMAGES)


def _edge(compute, endpoint, split, name, deadline=20.0):
    config = EdgeConfig(edge_id=name, deadline_seconds=deadline)
    link = ZmqCloudLink(endpoint, compute.bundle_info(), name, TIMING)
    sink = ListSink()
    return EdgeAgent(compute, FixedPolicy(Action.parse(f"split:{split}:fp32")), config, link,
                     [sink]), sink


async def _stream(agent, indices, concurrency):
    queue, results = list(indices), {}

    async def worker():
        while queue:
            i = queue.pop(0)
            results[i] = await agent.infer(IMAGES[i])
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _metric(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric in Prometheus text."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def _workers(holder) -> dict[str, tuple[str, int]]:
    """Live workers: slot -> (node id, pid)."""
    info = _metric(holder.daemon.metrics(), "tether_cloud_worker_info")
    out = {}
    for labels, value in info.items():
        if value == 1:
            d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            out[d["worker"]] = (d["node"], int(d["pid"]))
    return out


def _ready(holder) -> bool:
    url = holder.daemon.metrics_url.replace("/metrics", "/readyz")
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 200


def _wait(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held (raises after ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s")


def _edges(compute, endpoint, n, deadline=20.0):
    return [_edge(compute, endpoint, SPLITS[i % 2], f"edge-{i}", deadline) for i in range(n)]


async def _started(edges):
    for agent, _ in edges:
        await agent.start()
    assert all([await agent.link.wait_ready(20.0) for agent, _ in edges])


def test_four_edges_on_two_nodes_equal_the_whole_model(compute, expected, ray_cloud, ray_cluster):
    workers = _workers(ray_cloud)
    assert len(workers) == 2
    assert {node for node, _ in workers.values()} == ray_cluster.node_ids()   # one per node

    async def scenario():
        edges = _edges(compute, ray_cloud.endpoint, 4)
        await _started(edges)
        try:
            return edges, await asyncio.gather(*(_stream(a, range(len(IMAGES)), 4)
                                                 for a, _ in edges))
        finally:
            for agent, _ in edges:
                await agent.close()
    edges, all_results = run(scenario(), timeout=240)
    for (agent, sink), results in zip(edges, all_results):
        assert len(results) == len(IMAGES) == len(sink.records)
        assert {r.outcome for r in sink.records} == {"cloud"}
        got = np.stack([results[i].logits[0] for i in range(len(IMAGES))])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    batches = _metric(ray_cloud.daemon.metrics(), "tether_cloud_worker_batches_total")
    assert set(batches) == {'{worker="w0"}', '{worker="w1"}'}
    assert all(v > 0 for v in batches.values()), batches            # both nodes served


def test_llm_sessions_stay_on_their_worker_and_equal_the_whole_model(ray_cloud):
    import torch

    from tether.core import protocol as P
    from tether.edge.llm import GenerateConfig, LLMEdge
    from tether.edge.zmq_link import ZmqCloudLink
    from tether.partitioner.llm import EdgeLM, full_model, open_llm
    if _stories() is None:
        pytest.skip("stories260K not in the assets")
    torch.set_num_threads(1)
    stories = open_llm(_stories())
    reference = full_model(stories).generate(torch.tensor([[1]]), max_new_tokens=16,
                                             do_sample=False)[0, 1:].tolist()
    before = _metric(ray_cloud.daemon.metrics(), "tether_cloud_worker_batches_total")

    async def main():
        link = ZmqCloudLink(ray_cloud.endpoint, P.BundleInfo("stories260K", stories.fingerprint))
        edges = [LLMEdge(EdgeLM(stories, k), stories.fingerprint, stories.tokenizer(),
                         GenerateConfig(codec="fp32", timeout_s=30.0), link) for k in (1, 2, 1, 2)]

        async def collect(edge):
            return [ev async for ev in edge.generate([1], 16, stop_at_eos=False)]
        try:
            return await asyncio.gather(*(collect(e) for e in edges))
        finally:
            await link.close()
    runs = run(main(), timeout=180)
    for events in runs:
        assert [e.token for e in events] == reference
        assert {e.source for e in events} == {"cloud"}
    text = ray_cloud.daemon.metrics()
    assert _metric(text, "tether_cloud_errors_total").get('{code="session"}', 0) == 0  # affinity
    after = _metric(text, "tether_cloud_worker_batches_total")
    assert all(after[w] - before.get(w, 0) >= 16 for w in after), (before, after)  # both hold some


async def _for(agent, seconds, concurrency):
    """Requests back to back for ``seconds``; returns how many were sent."""
    stop, sent = time.monotonic() + seconds, [0]

    async def worker():
        while time.monotonic() < stop:
            i = sent[0]
            sent[0] += 1
            await agent.infer(IMAGES[i % len(IMAGES)])
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent[0]


def test_worker_killed_mid_stream_loses_nothing_and_is_replaced(compute, expected, ray_cloud):
    before = _workers(ray_cloud)
    victim_slot, (victim_node, victim_pid) = sorted(before.items())[0]
    lost_before = sum(_metric(ray_cloud.daemon.metrics(), "tether_cloud_worker_lost_total")
                      .values())
    events = {}

    async def killer():
        await asyncio.sleep(1.5)
        os.kill(victim_pid, signal.SIGKILL)
        events["killed"] = time.monotonic()

    async def scenario():
        edges = _edges(compute, ray_cloud.endpoint, 2)
        await _started(edges)
        try:
            counts = await asyncio.gather(killer(), *(_for(a, 4.0, 4) for a, _ in edges))
            return edges, counts[1:]
        finally:
            for agent, _ in edges:
                await agent.close()
    edges, counts = run(scenario(), timeout=240)
    for (agent, sink), count in zip(edges, counts):
        ids = [r.request_id for r in sink.records]
        assert len(ids) == len(set(ids)) == count > 0            # every request answered once
        for r in sink.records:                    # cloud or local fallback: the model's answer
            assert r.prediction == int(np.argmax(expected[(r.request_id - 1) % len(IMAGES)]))
    replaced = _wait(lambda: len(_workers(ray_cloud)) == 2 and
                     _workers(ray_cloud)[victim_slot][1] != victim_pid, 30)
    back = time.monotonic() - events["killed"]
    # bounded, not timed: Ray restarts the actor in 7-10 s on a loaded 2-core VM (a target
    # for the replacement time would belong in bench/, not here)
    assert back < 40.0, f"pool back to 2 workers {back:.1f} s after the kill ({replaced:.1f})"
    lost = sum(_metric(ray_cloud.daemon.metrics(), "tether_cloud_worker_lost_total").values())
    assert lost == lost_before + 1                # the killed worker was noticed once


def test_cluster_stops_then_returns_without_restarting_the_front(compute, expected, ray_cloud,
                                                                  ray_cluster):
    starts = ray_cloud.starts
    assert _ready(ray_cloud)
    ray_cluster.stop()
    _wait(lambda: not _ready(ray_cloud), 20)

    async def while_down():
        edges = _edges(compute, ray_cloud.endpoint, 2, deadline=2.0)
        await _started(edges)
        try:
            return edges, await asyncio.gather(*(_stream(a, range(20), 2) for a, _ in edges))
        finally:
            for agent, _ in edges:
                await agent.close()
    edges, _ = run(while_down(), timeout=120)
    for agent, sink in edges:
        assert len(sink.records) == 20
        assert {r.outcome for r in sink.records} == {"fallback"}
        # ERROR "unavailable" is PeerUnavailableError on the edge: fallback "disconnected"
        assert {r.fallback_reason for r in sink.records} <= {"disconnected", "error", "busy"}
    errors = _metric(ray_cloud.daemon.metrics(), "tether_cloud_errors_total")
    assert errors.get('{code="unavailable"}', 0) > 0

    ray_cluster.restart()
    _wait(lambda: _ready(ray_cloud), 120)

    async def after():
        edges = _edges(compute, ray_cloud.endpoint, 1)
        await _started(edges)
        try:
            return await _stream(edges[0][0], range(20), 2), edges
        finally:
            await edges[0][0].close()
    results, edges = run(after(), timeout=120)
    assert {r.record.outcome for r in results.values()} == {"cloud"}
    assert ray_cloud.starts == starts and ray_cloud.daemon.proc.poll() is None   # same front
