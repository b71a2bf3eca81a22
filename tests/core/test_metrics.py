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
