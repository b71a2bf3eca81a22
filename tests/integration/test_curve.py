"""CurveZMQ: an edge whose key the cloud allows is served; an unknown key gets no service."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tether.cloud.bundles import ServedBundle
from tether.cloud.config import CloudConfig
from tether.cloud.server import CloudServer
from tether.core.metrics import CloudMetrics
from tether.core.policy import FixedPolicy
from tether.core.types import Action
from tether.edge.agent import EdgeAgent
from tether.edge.compute import EdgeCompute
from tether.edge.config import EdgeConfig
from tether.edge.records import ListSink
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink

from support.bundles import SPLITS, reference_logits, sample_images
from support.curve import curve_keys
from support.fakes import run

from support.procs import free_port

TIMING = LinkTiming(heartbeat_interval=0.1, heartbeat_timeout=0.5, handshake_timeout=0.3,
                    reconnect_min=0.05, reconnect_max=0.2)


@pytest.fixture()
def keys(tmp_path):
    return curve_keys(tmp_path)


def test_unknown_client_key_gets_no_service(bundle, keys):
    compute = EdgeCompute(bundle)
    images = sample_images(4)
    expected = reference_logits(bundle, images)
    config = CloudConfig(bind=f"tcp://127.0.0.1:{free_port()}", max_queue_delay_s=0.0,
                         curve=keys.cloud())
    action = FixedPolicy(Action.parse(f"split:{SPLITS[0]}:fp32"))

    def edge(name, cert):
        link = ZmqCloudLink(config.bind, compute.bundle_info(), name, TIMING, keys.client(cert))
        sink = ListSink()
        return EdgeAgent(compute, action, EdgeConfig(edge_id=name, deadline_seconds=5.0), link,
                         [sink]), sink

    async def scenario():
        server = CloudServer(config, [ServedBundle.load(bundle)],
                             CloudMetrics(CollectorRegistry()))
        await server.start()
        (good, good_sink), (bad, bad_sink) = edge("edge-ok", keys.edge_secret), \
            edge("stranger", keys.stranger_secret)
        try:
            await good.start()
            await bad.start()
            assert await good.link.wait_ready(15.0)
            assert not await bad.link.wait_ready(1.5)
            assert "CURVE" in bad.link.last_refusal and bad.link.server is None
            results = [await agent.infer(img) for agent in (good, bad) for img in images]
        finally:
            await good.close()
            await bad.close()
            await server.stop()
        return results, good_sink.records, bad_sink.records
    results, good_records, bad_records = run(scenario(), timeout=60)
    assert {r.outcome for r in good_records} == {"cloud"}
    assert {(r.outcome, r.fallback_reason) for r in bad_records} == {("fallback", "disconnected")}
    assert all(r.bytes_sent == 0 for r in bad_records)      # nothing reached the cloud
    for result, ref in zip(results, np.concatenate([expected, expected])):
        np.testing.assert_allclose(result.logits[0], ref, rtol=1e-4, atol=1e-4)
