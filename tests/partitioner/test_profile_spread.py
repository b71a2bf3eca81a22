"""Profiling that can be trusted: interleaved rounds, median and spread stored, busy flagged."""

from __future__ import annotations

import logging

import pytest
import torch

from tether.core.types import CostTable
from tether.partitioner import SplitGraph, load_model, profile_graph
from tether.partitioner.profile import Rounds, _spread_meta, summarize


def test_summarize_gives_median_percentiles_and_relative_spread():
    s = summarize([0.010, 0.011, 0.009, 0.010, 0.050, 0.010, 0.012, 0.008, 0.010, 0.011])
    assert s["median"] == pytest.approx(0.010)
    assert s["p10"] <= s["median"] <= s["p90"] and s["n"] == 10
    assert s["spread"] == pytest.approx((s["p90"] - s["p10"]) / s["median"])


def test_rounds_interleave_every_function():
    calls = []
    rounds = Rounds(repeats=6, warmup=1, rounds=3)
    rounds.add("a", lambda: calls.append("a"))
    rounds.add("b", lambda: calls.append("b"))
    stats = rounds.run()
    assert calls[:2] == ["a", "b"]                       # warm-up once each
    assert calls[2:] == ["a", "a", "b", "b"] * 3         # 3 rounds of 2 samples, interleaved
    assert stats["a"]["n"] == 6 and stats["b"]["n"] == 6


def test_busy_when_a_real_measurement_spreads(caplog):
    steady = {"median": 0.002, "p10": 0.0019, "p90": 0.0021, "spread": 0.1, "n": 9}
    noisy = {"median": 0.002, "p10": 0.001, "p90": 0.009, "spread": 4.0, "n": 9}
    tiny = {"median": 1e-5, "p10": 1e-6, "p90": 1e-4, "spread": 9.9, "n": 9}   # timer jitter
    assert _spread_meta({"head:a": steady, "tail:a": tiny}, [0.1], "m")["busy"] is False
    assert _spread_meta({"head:a": steady}, [1e6], "m")["busy"] is True      # load average
    with caplog.at_level(logging.WARNING):
        meta = _spread_meta({"head:a": steady, "tail:a": noisy}, [0.1], "m")
    assert meta["busy"] is True and "busy" in caplog.text and "tail:a" in caplog.text
    assert meta["spread"]["tail:a"]["p90_seconds"] == 0.009


def test_cost_table_stores_spread_per_measurement_and_stays_readable(tmp_path):
    module = load_model("cifar_resnet20").module
    x = torch.rand(1, 3, 32, 32)
    graph = SplitGraph(module, x)
    only = graph.names()[:2]
    table = profile_graph(graph, x, "cifar_resnet20", repeats=4, warmup=0, rounds=2,
                          progress=False, only=only)
    spread = table.meta["spread"]
    assert set(spread) == {f"{k}:{n}" for n in only for k in ("head", "tail")} | \
        {"edge_full", "cloud_full"}
    for name in only:
        row = spread[f"tail:{name}"]
        assert row["p10_seconds"] <= table.split(name).tail_seconds <= row["p90_seconds"]
    assert isinstance(table.meta["busy"], bool) and table.meta["rounds"] == 2
    path = tmp_path / "costs.json"
    table.save(path)
    assert CostTable.load(path).meta["spread"] == spread
