"""Metric definitions: names with units, injected registry, records in, samples out."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tether.core.metrics import (
    BatchStats, CloudMetrics, CloudRequestStats, EdgeMetrics, render,
)
from tether.core.types import RequestRecord


def test_cloud_metrics_count_outcomes_batches_and_bytes():
    reg = CollectorRegistry()
    m = CloudMetrics(reg)
    m.observe_request(CloudRequestStats("m", "s", "fp16", "ok", "", 0.002, 0.001, 100))
    m.observe_request(CloudRequestStats("m", "s", "fp16", "busy", "deadline"))
    m.observe_request(CloudRequestStats("unknown", "unknown", "unknown", "error", "bad_payload"))
    m.observe_batch(BatchStats("m", "s", 3, 5, 0.01))
    m.observe_bytes(received=100, sent=40)
    get = reg.get_sample_value
    assert get("tether_cloud_requests_total", {"model": "m", "split": "s", "codec": "fp16",
                                               "outcome": "ok"}) == 1
    assert get("tether_cloud_busy_total", {"reason": "deadline"}) == 1
    assert get("tether_cloud_errors_total", {"code": "bad_payload"}) == 1
    assert get("tether_cloud_batch_size_sum", {"model": "m", "split": "s"}) == 3
    assert get("tether_cloud_queue_seconds_count", {"model": "m", "split": "s"}) == 1
    assert get("tether_cloud_received_bytes_total") == 100 and get("tether_cloud_sent_bytes_total") == 40
    assert b"tether_cloud_tail_seconds_bucket" in render(reg)


def test_edge_metrics_take_request_records():
    reg = CollectorRegistry()
    m = EdgeMetrics(reg)
    m.observe(RequestRecord(1, "e", 0.0, "split:layer2:int8", "cloud", head_seconds=0.003,
                            network_seconds=0.01, total_seconds=0.02, bytes_sent=5000,
                            bytes_received=80))
    m.observe(RequestRecord(2, "e", 0.0, "split:layer2:int8", "fallback", "timeout",
                            local_seconds=0.05, total_seconds=0.2))
    m.observe_rtt(0.004)
    get = reg.get_sample_value
    assert get("tether_edge_requests_total", {"action": "split", "outcome": "cloud"}) == 1
    assert get("tether_edge_fallbacks_total", {"reason": "timeout"}) == 1
    assert get("tether_edge_stage_seconds_count", {"stage": "total"}) == 2
    assert get("tether_edge_stage_seconds_count", {"stage": "head"}) == 1
    assert get("tether_edge_sent_bytes_total") == 5000
    assert get("tether_edge_rtt_seconds_count") == 1


def test_registries_are_independent():
    a, b = CollectorRegistry(), CollectorRegistry()
    CloudMetrics(a).observe_bytes(received=7)
    CloudMetrics(b)
    assert a.get_sample_value("tether_cloud_received_bytes_total") == 7
    assert b.get_sample_value("tether_cloud_received_bytes_total") == 0


def test_actions_estimates_llm_metrics_and_no_created_series():
    reg = CollectorRegistry()
    m = EdgeMetrics(reg)
    for key in ("split:layer2:int8", "local", "offload:fp16", "exit:layer1:fp16"):
        m.observe(RequestRecord(1, "e", 0.0, key, "cloud", total_seconds=0.01))
    get = reg.get_sample_value
    assert get("tether_edge_actions_total", {"kind": "split", "split": "layer2", "codec": "int8"}) == 1
    assert get("tether_edge_actions_total", {"kind": "local", "split": "", "codec": ""}) == 1
    assert get("tether_edge_actions_total", {"kind": "offload", "split": "input", "codec": "fp16"}) == 1
    m.observe_estimates("fixed", None, None)
    assert b"tether_edge_policy_bandwidth_bytes_per_second{" not in render(reg)   # absent, not 0
    m.observe_estimates("adaptive", 1.25e6, 0.02)
    m.observe_rtt(0.004)
    assert get("tether_edge_policy_bandwidth_bytes_per_second", {"policy": "adaptive"}) == 1.25e6
    assert get("tether_edge_policy_rtt_seconds", {"policy": "heartbeat"}) == 0.004
    m.llm.stream_started()
    m.llm.observe_token("cloud", 0.01, 0.05, first=True)
    m.llm.observe_token("exit", 0.002, 0.06, first=False)
    assert get("tether_edge_llm_active_streams") == 1
    m.llm.stream_finished(ok=True)
    assert get("tether_edge_llm_tokens_total", {"source": "cloud"}) == 1
    assert get("tether_edge_llm_time_to_first_token_seconds_count") == 1
    assert get("tether_edge_llm_time_to_first_token_seconds_sum") == 0.05
    assert get("tether_edge_llm_active_streams") == 0
    assert get("tether_edge_llm_generations_total", {"outcome": "ok"}) == 1
    cloud = CloudMetrics(reg)
    cloud.track_llm(lambda: 3, lambda: 4096)
    assert get("tether_cloud_llm_sessions") == 3 and get("tether_cloud_llm_kv_cache_bytes") == 4096
    assert b"_created" not in render(reg)


def test_probe_routing_is_404_outside_the_probes():
    import json

    from tether.core.http import Health, probe_response
    reg = CollectorRegistry()
    EdgeMetrics(reg)
    draining = lambda: Health.from_checks(True, loaded=True, not_draining=False)  # noqa: E731
    status, _, body = probe_response("/readyz", reg, draining)
    assert status == 503 and json.loads(body) == {"ready": False, "checks": {
        "loaded": True, "not_draining": False}}
    assert probe_response("/healthz", reg, draining)[0] == 200
    assert probe_response("/readyz?verbose=1", reg, lambda: (True, True))[0] == 200
    assert probe_response("/metrics", reg, draining)[0] == 200
    for path in ("/", "/nonexistent", "/metrics/x", "/readyz/"):
        assert probe_response(path, reg, draining)[0] == 404
