"""The Grafana dashboard against a real Prometheus scraping real `tether cloud` and `tether edge`
processes on 127.0.0.1 while images and LLM generations flow: every panel's PromQL returns data.

Needs the distribution's ``prometheus`` binary (Debian: ``apt-get install prometheus``; .ci/run
installs it); skipped with that reason when it is absent.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from support.bundles import sample_images

from support.procs import REPO, Daemon, free_port

pytestmark = pytest.mark.slow
DASHBOARD = REPO / "configs" / "grafana" / "tether.json"
PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus"
                                            if os.path.exists("/usr/bin/prometheus") else None)
RATE_WINDOW = "20s"       # stands for Grafana's $__rate_interval (scrapes every 0.5 s)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", RATE_WINDOW))
            for p in dash["panels"] for t in p["targets"]]


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"] and dash["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for title, expr in panel_queries():
        assert "tether_" in expr, title
        for name in re.findall(r"tether_[a-z_]+", expr):
            assert re.search(r"_(total|seconds|bytes|second|bucket|sum|count|depth|size|ready|"
                             r"requests|sessions|streams)$", name), f"{name}: unit suffix"


def _start_prometheus(tmp: Path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 500ms\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tether\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n")
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return [r for r in body["data"]["result"] if r["value"][1] not in ("NaN", "+Inf", "-Inf")]


def _post(url: str, body: bytes, ctype: str) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _traffic(http: str, images: np.ndarray, seconds: float, start: int = 0) -> int:
    """Images (some with a deadline too short for the cloud: local fallbacks) and generations;
    returns the index to go on from."""
    end, i = time.monotonic() + seconds, start
    completion = json.dumps({"prompt": "Once upon a time", "max_tokens": 6,
                             "stream": True}).encode()
    while time.monotonic() < end:
        buf = io.BytesIO()
        np.save(buf, images[i % len(images)], allow_pickle=False)
        deadline = "?deadline=0.002" if i % 4 == 3 else ""
        assert _post(f"{http}/v1/infer{deadline}", buf.getvalue(), "application/x-npy") == 200
        if i % 8 == 0:
            assert _post(f"{http}/v1/completions", completion, "application/json") == 200
        i += 1
        time.sleep(0.02)
    return i


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_every_panel_returns_data_from_a_real_prometheus(bundle, assets, tmp_path):
    stories = assets / "tinyllm" / "stories260K.bin"
    cloud_port = free_port()
    policy = tmp_path / "edge.toml"
    policy.write_text('[policy]\nname = "bandit"\nprior_bandwidth_bps = 1e9\n'
                      'prior_rtt_seconds = 0.001\n')
    cloud = Daemon(["cloud", "--bundle", str(bundle), "--bind", f"tcp://127.0.0.1:{cloud_port}",
                    "--metrics-port", "0", "--torch-threads", "1", "--llm-checkpoint",
                    str(stories)], tmp_path / "cloud.log")
    edge = Daemon(["edge", "--config", str(policy), "--bundle", str(bundle), "--connect",
                   f"tcp://127.0.0.1:{cloud_port}", "--listen", "tcp://127.0.0.1:0",
                   "--metrics-port", "0", "--http-port", "0", "--deadline", "10",
                   "--llm-checkpoint", str(stories), "--llm-split", "2", "--llm-timeout", "10"],
                  tmp_path / "edge.log")
    prom = None
    try:
        with ThreadPoolExecutor(2) as pool:   # the edge's link connects whenever the cloud is up
            for started in [pool.submit(d.start) for d in (cloud, edge)]:
                started.result()
        http = re.search(r" http (\S+)", edge.ready_line)
        assert http, edge.ready_line
        targets = [urllib.parse.urlparse(d.metrics_url).netloc for d in (cloud, edge)]
        prom, base = _start_prometheus(tmp_path, targets)
        missing = _traffic_until_all_panels(base, http.group(1), sample_images(8),
                                            traffic_s=12.0, timeout=32.0)
        assert not missing, f"panels without data: {missing}"
    finally:
        if prom is not None:
            prom.send_signal(signal.SIGTERM)
            prom.wait(20)
        for d in (edge, cloud):
            d.signal(signal.SIGTERM)          # both at once: each drains on its own
        for d in (edge, cloud):
            try:
                d.wait(30)
            finally:
                d.kill()


def _missing_panels(base: str) -> list[str]:
    return [f"{title}: {expr}" for title, expr in panel_queries() if not _query(base, expr)]


def _traffic_until_all_panels(base: str, http: str, images: np.ndarray, traffic_s: float,
                              timeout: float) -> list[str]:
    """Traffic in 2 s rounds (at most ``traffic_s`` of it), checking the panels after each, then
    polling every second: the panels still without data at ``timeout``."""
    end, sent_s, i = time.monotonic() + timeout, 0.0, 0
    while True:
        if sent_s < traffic_s:
            i = _traffic(http, images, seconds=2.0, start=i)
            sent_s += 2.0
        missing = _missing_panels(base)
        if not missing or time.monotonic() > end:
            return missing
        if sent_s >= traffic_s:
            time.sleep(1.0)
