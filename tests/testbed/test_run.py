"""End to end: a short scenario with real cloud, link and edge processes (seconds)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tether.testbed.load import arrival_times
from tether.testbed.runner import reanalyze, run_scenario
from tether.testbed.scenario import load_scenario

from support.bundles import shared_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The session's cifar_resnet20 bundle (tests/support/bundles.py), exported once and shared
    with the edge and integration tests: the scenario's local and cloud policies need only the
    whole model, which every bundle holds."""
    return shared_bundle(tmp_path_factory)


def _read(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_short_scenario_end_to_end(bundle, tmp_path):
    scenario = load_scenario(REPO / "scenarios" / "ci-short.toml")
    scenario = dataclasses.replace(scenario, bundle=str(bundle))
    out = run_scenario(scenario, tmp_path / "out", progress=False)

    rows = _read(out / "requests.csv")
    expected = len(arrival_times(scenario.arrival, scenario.rate_hz, scenario.duration_s,
                                 scenario.seed * 1000))
    labels = scenario.policy_labels
    for label in labels:
        mine = [r for r in rows if r["policy"] == label]
        assert len(mine) == expected, f"{label}: {len(mine)} rows, {expected} requests sent"
        assert all(r["answered"] == "True" for r in mine), "every request must be answered"
        assert all(r["action"] and r["outcome"] and float(r["total_s"]) > 0 for r in mine)
        assert all(r["predicted_s"] and r["oracle_s"] for r in mine)
        times = [float(r["trace_time"]) for r in mine]
        assert 0.0 <= min(times) and max(times) < scenario.duration_s + 0.5
    local = [r for r in rows if r["policy"] == "local"]
    cloud = [r for r in rows if r["policy"] == "cloud"]
    assert {r["outcome"] for r in local} == {"local"}
    assert {r["action"] for r in cloud} == {"offload:fp32"}
    assert all(int(r["bytes_sent"]) > 12288 for r in cloud if r["outcome"] == "cloud")

    summary = {s["policy"]: s for s in _read(out / "summary.csv")}
    assert list(summary) == labels
    for label in labels:
        lat = np.array([float(r["latency_s"]) for r in rows if r["policy"] == label])
        s = summary[label]
        assert int(s["requests"]) == int(s["answered"]) == lat.size
        assert float(s["mean_s"]) == pytest.approx(lat.mean(), rel=1e-4)
        assert float(s["p95_s"]) == pytest.approx(np.percentile(lat, 95), rel=1e-4)
        misses = sum(r["deadline_miss"] == "True" for r in rows if r["policy"] == label)
        assert int(s["deadline_misses"]) == misses
    # the 1 s fade to 0.3 Mbit/s must show in the offloads' network time
    fade = [float(r["network_s"]) for r in cloud if 2.0 <= float(r["trace_time"]) < 2.8]
    fast = [float(r["network_s"]) for r in cloud if float(r["trace_time"]) < 1.8]
    if fade and fast:
        assert np.median(fade) > 3 * np.median(fast)

    errors = _read(out / "sim_error.csv")      # the simulator's error, per action
    assert {(e["policy"], e["action"]) for e in errors} <= {(r["policy"], r["action"]) for r in rows}
    assert sum(int(e["requests"]) for e in errors) == sum(1 for r in rows if r["predicted_error_s"])
    for name in ("latency_cdf.png", "timeline.png", "accuracy_latency.png"):
        assert (out / name).stat().st_size > 5000
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backend"] == "userspace" and meta["kernel"]
    assert "steps" in meta["traces"]["up"]
    assert set(meta["runs"]) == set(labels)

    # `tether testbed report` re-derives the same summary from the saved raw rows
    before = (out / "summary.csv").read_text()
    (out / "summary.csv").unlink()
    reanalyze(out)
    assert (out / "summary.csv").read_text() == before
