"""Per-request rows, the summary table and the cost-table scaling, without processes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from tether.core.types import CostTable, SplitCost, TensorSpec
from tether.testbed.analysis import (
    COLUMNS, compute_scales, edge_overhead, flatten, scaled_table, sim_error_by_action, summarize, summary_table,
    write_csv,
)


def _raw(i: int, total: float, outcome: str = "cloud", label: int = 3, pred: int = 3,
         answered: bool = True) -> dict:
    record = {"action": "offload:fp32" if outcome != "local" else "local", "outcome": outcome,
              "fallback_reason": "timeout" if outcome == "fallback" else "",
              "head_seconds": 0.0, "tail_seconds": 0.004, "local_seconds": 0.0,
              "total_seconds": total, "bytes_sent": 12478, "bytes_received": 150}
    return {"policy": "p", "edge": 0, "request": i, "image": i, "label": label,
            "answered": answered, "outcome": outcome if answered else "unanswered", "error": "",
            "trace_time": i * 0.1, "record": record if answered else {},
            "client_seconds": total + 0.001 if answered else None,
            "prediction": pred if answered else None}


def test_flatten_marks_misses_and_correctness():
    row = flatten(_raw(1, 0.4), deadline_s=0.3)
    assert row["deadline_miss"] is True and row["correct"] is True
    assert row["total_s"] == 0.4 and row["bytes_sent"] == 12478
    assert set(COLUMNS) >= set(row)
    lost = flatten(_raw(2, 0.0, answered=False), deadline_s=0.3)
    assert lost["deadline_miss"] is True and lost["correct"] == ""
    wrong = flatten(_raw(3, 0.1, pred=5), deadline_s=0.3)
    assert wrong["correct"] is False and wrong["deadline_miss"] is False


def test_edge_overhead_is_what_local_answers_that_found_the_edge_idle_spend_beyond_compute():
    rows = []
    # (arrival, total, local): the second arrives while the first is still being answered,
    # so its 30 ms beyond compute are queueing, not the daemon's own time
    for i, (at, total, local) in enumerate([(0.0, 0.030, 0.020), (0.01, 0.050, 0.020),
                                            (0.2, 0.034, 0.020), (0.4, 0.030, 0.020)]):
        raw = _raw(i, total, outcome="local")
        raw["trace_time"] = at
        raw["record"].update(local_seconds=local, edge_wait_seconds=0.0)
        rows.append(flatten(raw, deadline_s=1.0))
    offload = _raw(9, 0.5)
    offload["trace_time"] = 0.6
    rows.append(flatten(offload, deadline_s=1.0))                  # offloads do not count
    assert edge_overhead(rows) == pytest.approx(0.0113, abs=1e-4)  # mean of 10, 14, 10 ms
    other = dict(rows[1], policy="q")        # another policy's edge is idle at that time
    assert edge_overhead([other]) == pytest.approx(0.030)
    assert edge_overhead(rows[4:]) == 0.0


def test_summary_is_computed_from_the_rows(tmp_path):
    totals = [0.05, 0.1, 0.2, 0.4, 0.8]
    rows = [flatten(_raw(i, t, pred=3 if i % 2 else 4), 0.3) for i, t in enumerate(totals)]
    rows.append(flatten(_raw(9, 0.0, answered=False), 0.3))
    (s,) = summarize(rows, ["p"])
    assert s["requests"] == 6 and s["answered"] == 5
    # one latency everywhere: the application's (client round trip, 1 ms above the edge's)
    assert s["mean_s"] == pytest.approx(np.mean(totals) + 0.001)
    assert s["edge_mean_s"] == pytest.approx(np.mean(totals))
    assert s["p95_s"] == pytest.approx(np.percentile(totals, 95) + 0.001)
    assert s["deadline_misses"] == 3          # 0.4, 0.8 and the unanswered one
    assert s["accuracy"] == pytest.approx(2 / 5)
    assert math.isnan(s["regret_s"])          # no oracle column in these rows
    write_csv(tmp_path / "r.csv", rows, COLUMNS)
    with open(tmp_path / "r.csv") as fh:
        back = list(csv.DictReader(fh))
    assert len(back) == 6 and list(back[0]) == list(COLUMNS)
    assert "| p | 5/6 |" in summary_table([s])


def test_deadline_miss_is_the_applications_view():
    # the edge answered in 0.299 s but the application got it after 0.300 s: a miss
    row = flatten(_raw(1, 0.2995), deadline_s=0.3)
    assert row["latency_s"] == pytest.approx(0.3005) and row["deadline_miss"] is True


def test_simulator_error_per_action():
    rows = [flatten(_raw(i, 0.05, outcome="local" if i % 2 else "cloud"), 1.0) for i in range(6)]
    for i, r in enumerate(rows):
        r["predicted_error_s"] = -0.002 if r["action"] == "local" else 0.010
    by = {(e["policy"], e["action"]): e for e in sim_error_by_action(rows)}
    assert by[("p", "local")]["requests"] == 3
    assert by[("p", "local")]["mean_error_s"] == pytest.approx(-0.002)
    assert by[("p", "offload:fp32")]["mae_s"] == pytest.approx(0.010)


def _table() -> CostTable:
    split = SplitCost("flatten", 20, (1, 64), "float32", 256, head_seconds=0.002,
                      tail_seconds=0.0001)
    return CostTable("m", TensorSpec((1, 3, 32, 32)), edge_full_seconds=0.002,
                     cloud_full_seconds=0.008, splits=(split,))


def test_compute_scales_from_measured_stages():
    rows = [flatten(_raw(i, 0.006, outcome="local"), 1.0) for i in range(3)]
    rows += [flatten(_raw(i, 0.05), 1.0) for i in range(3)]
    edge, cloud = compute_scales(rows, _table())
    assert edge == pytest.approx(3.0)          # local 6 ms vs 2 ms profiled
    assert cloud == pytest.approx(0.5)         # tail 4 ms vs 8 ms profiled
    scaled = scaled_table(_table(), edge, cloud)
    assert scaled.edge_full_seconds == pytest.approx(0.006)
    assert scaled.cloud_full_seconds == pytest.approx(0.004)
    assert scaled.splits[0].head_seconds == pytest.approx(0.006)
