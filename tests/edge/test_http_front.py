"""The edge's HTTP front and probes over real sockets (in-process edge + cloud on 127.0.0.1).

* an image file POSTed to /v1/infer gets the same answer as the ZeroMQ EdgeClient;
* raw .npy tensors, bad input (400), oversized bodies (413), draining (503);
* /readyz: 200 with the cloud, 503 while draining, 503 when neither the cloud nor the local
  fallback can answer; /healthz stays 200; 404 elsewhere on both ports;
* metrics: the first connect is no reconnect, no ``_created`` series, actions by split/codec.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tether.edge.client import EdgeClient  # noqa: E402

from support.background import BackgroundLoop, get_json, http, multipart, wait_for  # noqa: E402
from support.bundles import SPLITS, reference_logits, sample_images  # noqa: E402

PATIENT = 30.0     # seconds: the shared machine is slow; never fall back by accident
IMAGES = sample_images(3)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


async def _start_cloud(bundle):
    from prometheus_client import CollectorRegistry

    from tether.cloud import CloudConfig
    from tether.cloud.bundles import ServedBundle
    from tether.cloud.server import CloudServer
    from tether.core.metrics import CloudMetrics
    cloud = CloudServer(CloudConfig(bind="tcp://127.0.0.1:0", preload=False),
                        [ServedBundle.load(bundle)], CloudMetrics(CollectorRegistry()))
    await cloud.start()
    return cloud


async def _start_edge(**overrides):
    from tether.edge.config import EdgeConfig, EdgeLinkConfig, HttpConfig
    from tether.edge.daemon import EdgeDaemon
    connect = overrides.pop("connect", "")
    config = dict(listen="tcp://127.0.0.1:0", metrics_port=0, http=HttpConfig(port=0),
                  link=EdgeLinkConfig(connect), deadline_seconds=PATIENT) | overrides
    daemon = EdgeDaemon(EdgeConfig(**config))
    endpoint = await daemon.start()
    return daemon, endpoint


@pytest.fixture(scope="module")
def served(bundle):
    """Cloud + edge (split at SPLITS[1], fp32) with metrics and HTTP ports."""
    bg = BackgroundLoop()
    cloud = bg.call(_start_cloud(bundle))
    daemon, endpoint = bg.call(_start_edge(bundle=bundle, connect=cloud.endpoint,
                                           action=f"split:{SPLITS[1]}:fp32"))
    assert bg.call(wait_for(lambda: daemon.agent.cloud_available)), "edge never connected"
    yield bg, daemon, endpoint
    bg.call(daemon.stop())
    bg.call(cloud.stop())
    bg.close()


def _urls(daemon):
    return (f"http://127.0.0.1:{daemon.http_port}", f"http://127.0.0.1:{daemon.metrics_port}")


def test_image_upload_answers_like_edge_client(served, bundle, tmp_path):
    from tether.commands.edge import load_image
    _, daemon, endpoint = served
    front, _ = _urls(daemon)
    expected = reference_logits(bundle, IMAGES)
    for i, image in enumerate(IMAGES):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(_png(image))
        with EdgeClient(endpoint, timeout=PATIENT) as client:
            zmq_answer = client.infer(load_image(path, 32, 32))
        body, ctype = multipart("file", path.name, path.read_bytes(), "image/png")
        status, raw = http("POST", front + "/v1/infer", body, {"Content-Type": ctype})
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["prediction"] == zmq_answer.prediction == int(np.argmax(expected[i]))
        assert answer["label"] == zmq_answer.label
        assert answer["action"] == zmq_answer.action == f"split:{SPLITS[1]}:fp32"
        assert answer["outcome"] == zmq_answer.outcome == "cloud"
        assert answer["fallback_reason"] == ""
        np.testing.assert_allclose(answer["logits"], zmq_answer.logits.reshape(-1), atol=1e-5)
        assert answer["timings"]["total"] > 0 and answer["record"]["bytes_sent"] > 0
        # the same file as a raw image/* body
        status, raw = http("POST", front + "/v1/infer", path.read_bytes(),
                           {"Content-Type": "image/png"})
        assert status == 200 and json.loads(raw)["prediction"] == zmq_answer.prediction


def test_raw_tensor_and_bad_input(served, bundle):
    _, daemon, _ = served
    front, _ = _urls(daemon)
    expected = reference_logits(bundle, IMAGES[:1])
    status, raw = http("POST", front + "/v1/infer?deadline=20", _npy(IMAGES[0]),
                       {"Content-Type": "application/x-npy"})
    assert status == 200, raw
    np.testing.assert_allclose(json.loads(raw)["logits"], expected[0], atol=1e-3)
    wrong = np.zeros((16, 16, 3), dtype=np.uint8)
    status, raw = http("POST", front + "/v1/infer", _npy(wrong),
                       {"Content-Type": "application/x-npy"})
    assert status == 400 and json.loads(raw)["error"]["code"] == "bad_input"
    status, raw = http("POST", front + "/v1/infer", b"not an image", {"Content-Type": "image/png"})
    assert status == 400 and "cannot read" in json.loads(raw)["error"]["message"]
    pickled = np.array([object()], dtype=object)
    status, raw = http("POST", front + "/v1/infer", _npy_object(pickled),
                       {"Content-Type": "application/x-npy"})
    assert status == 400
    assert _declared_too_big(daemon).startswith(b"HTTP/1.1 413")
    status, _ = http("POST", front + "/v1/completions", b"{}",
                     {"Content-Type": "application/json"})
    assert status == 503       # no LLM on this edge
    # the daemon still serves after all that
    status, raw = http("POST", front + "/v1/infer", _png(IMAGES[1]), {"Content-Type": "image/png"})
    assert status == 200


def _declared_too_big(daemon) -> bytes:
    """Announce a body over the limit: the edge answers 413 before reading it."""
    import socket
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=30) as sock:
        sock.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {daemon.config.http.max_body_bytes + 1}\r\n\r\n".encode())
        return sock.recv(4096)


def _npy_object(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def test_probes_ready_draining_and_404(served):
    _, daemon, _ = served
    front, metrics = _urls(daemon)
    for base in (front, metrics):
        status, body = get_json(base + "/readyz")
        assert status == 200 and body["ready"] is True and body["checks"]["cloud_link"] is True
        assert http("GET", base + "/healthz")[0] == 200
        assert http("GET", base + "/nonexistent")[0] == 404
    assert http("GET", front + "/v1/nonexistent")[0] == 404
    daemon.server.draining = True          # what stop() does first
    try:
        status, body = get_json(metrics + "/readyz")
        assert status == 503 and body["checks"]["not_draining"] is False
        assert http("GET", metrics + "/healthz")[0] == 200      # alive while draining
        status, raw = http("POST", front + "/v1/infer", _png(IMAGES[0]),
                           {"Content-Type": "image/png"})
        assert status == 503 and json.loads(raw)["error"]["code"] == "busy"
    finally:
        daemon.server.draining = False
    assert get_json(metrics + "/readyz")[0] == 200


def test_metrics_count_actions_not_the_first_connect(served):
    _, daemon, _ = served
    _, metrics = _urls(daemon)
    http("POST", _urls(daemon)[0] + "/v1/infer", _png(IMAGES[0]), {"Content-Type": "image/png"})
    for _ in range(200):          # heartbeats every 0.5 s: wait for the first RTT sample
        status, raw = http("GET", metrics + "/metrics")
        text = raw.decode()
        if "tether_edge_policy_rtt_seconds{" in text:
            break
        time.sleep(0.05)
    assert status == 200
    assert "tether_edge_reconnects_total 0.0" in text
    assert "_created" not in text
    assert f'tether_edge_actions_total{{codec="fp32",kind="split",split="{SPLITS[1]}"}}' in text
    assert 'tether_edge_policy_rtt_seconds{policy="heartbeat"}' in text


def test_not_ready_when_neither_cloud_nor_local_fallback_can_answer(bundle):
    """Cloud gone and a deadline the whole model cannot meet locally: 503; with a deadline
    the local fallback meets: 200 (it answers alone)."""
    from tether.core.http import Health
    bg = BackgroundLoop()
    dead = "tcp://127.0.0.1:9"          # discard port: nothing answers the handshake
    try:
        strict, _ = bg.call(_start_edge(bundle=bundle, connect=dead, deadline_seconds=1e-6))
        lenient, _ = bg.call(_start_edge(bundle=bundle, connect=dead, deadline_seconds=5.0))
        try:
            status, body = get_json(f"http://127.0.0.1:{strict.metrics_port}/readyz")
            assert status == 503 and body["ready"] is False
            assert body["checks"] == {"loaded": True, "not_draining": True,
                                      "cloud_link": False, "local_fallback": False}
            assert http("GET", f"http://127.0.0.1:{strict.metrics_port}/healthz")[0] == 200
            status, body = get_json(f"http://127.0.0.1:{lenient.http_port}/readyz")
            assert status == 200 and body["checks"]["local_fallback"] is True
            assert isinstance(lenient.health(), Health)
        finally:
            bg.call(strict.stop())
            bg.call(lenient.stop())
        assert strict.health().alive is False and strict.health().ready is False
    finally:
        bg.close()
