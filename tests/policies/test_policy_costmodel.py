"""The cost model: per-action latency formula, accuracy, pruning, edge scaling."""

from __future__ import annotations

import numpy as np
import pytest

from tether.core.errors import ConfigError
from dataclasses import replace

from tether.core.types import LOCAL, Action, CodecCost, CostTable
from tether.policies.costmodel import CostModel, enumerate_costs, scale_edge


def test_every_action_is_enumerated(table):
    keys = {c.action.key for c in enumerate_costs(table)}
    assert {"local", "offload:fp32", "offload:png", "offload:jpeg75", "split:conv1:fp32",
            "split:layer2:int8", "split:layer3:int8", "exit:layer1:fp32"} <= keys
    assert len(keys) == 1 + 3 + 4 + 2 + 1   # local, 3 offloads, 4 raw splits, 2 int8, 1 exit


def test_latency_formula_matches_hand_computation(table):
    model = CostModel(table, overhead_bytes=200, result_bytes=40, prune=False)
    up, rtt, queue = 4e6, 0.03, 0.005
    lat = model.latencies(up, rtt, queue, down_bps=8e6)
    split = lat[model.index(Action.parse("split:layer2:int8"))]
    expected = 0.070 + 0.001 + (8192 + 200) * 8 / up + rtt + queue + 0.0002 + 0.0006 + 240 * 8 / 8e6
    assert split == pytest.approx(expected)
    offload = lat[model.index(Action.parse("offload:png"))]
    assert offload == pytest.approx(0.002 + 2800 * 8 / up + rtt + queue + 0.0005 + 0.002 + 240 * 8 / 8e6)
    assert lat[model.index(LOCAL)] == pytest.approx(0.100)
    # the exit answers half locally: expected value of the two branches
    ex = lat[model.index(Action.parse("exit:layer1:fp32"))]
    remote = (65536 + 200) * 8 / up + rtt + queue + 0.0012 + 240 * 8 / 8e6
    assert ex == pytest.approx(0.043 + 0.5 * remote)


def test_latency_monotone_in_bandwidth(table):
    model = CostModel(table)
    slow, fast = model.latencies(0.1e6, 0.04), model.latencies(20e6, 0.04)
    assert np.all(fast <= slow)
    assert model.actions[int(np.argmin(slow))] == LOCAL
    assert model.actions[int(np.argmin(fast))].key.startswith("offload")


def test_accuracy_floor_masks_lossy_codecs(table):
    model = CostModel(table, prune=False)
    mask = model.allowed(0.9064)
    assert not mask[model.index(Action.parse("offload:jpeg75"))]
    assert mask[model.index(Action.parse("offload:png"))]
    assert mask[model.index(LOCAL)]
    # an impossible floor keeps the most accurate actions instead of none
    assert model.allowed(0.999).any()


def test_pruning_drops_dominated_and_keeps_local(table):
    worse = CodecCost("layer3", "fp16", 8192, 0.001, 0.0002, 0.90)   # int8 beats it everywhere
    slow_local = replace(table, codecs=table.codecs + (worse,), edge_full_seconds=10.0)
    pruned = CostModel(slow_local)
    keys = {a.key for a in pruned.actions}
    assert "split:layer3:fp16" not in keys
    assert {"local", "split:layer3:int8", "offload:png"} <= keys   # local stays even when slow
    every = {a.key for a in CostModel(slow_local, prune=False).actions}
    # layer2 fp32 loses to the layer1 exit: less edge time, fewer expected bytes, more accurate
    assert every - keys == {"split:layer3:fp16", "split:layer2:fp32"}
    # a pruned action can still be priced (a static config may name it)
    assert pruned.cost(Action.parse("split:layer3:fp16")).up_bytes == 8192 + 256


def test_restricting_actions_and_unknown_action(table):
    model = CostModel(table, actions=("local", "offload:png"))
    assert [a.key for a in model.actions] == ["local", "offload:png"]
    with pytest.raises(ConfigError, match="not in the cost table"):
        CostModel(table, actions=("split:nope:fp32",))
    with pytest.raises(ConfigError, match="valid"):
        model.cost(Action.parse("split:nope:fp32"))


def test_scale_edge_scales_only_edge_side(table):
    slow = scale_edge(table, 10.0)
    assert slow.edge_full_seconds == pytest.approx(1.0)
    assert slow.split("layer2").head_seconds == pytest.approx(0.7)
    assert slow.split("layer2").tail_seconds == pytest.approx(0.0006)
    assert slow.codecs[0].encode_seconds == pytest.approx(0.01)
    assert slow.codecs[0].decode_seconds == pytest.approx(0.0005)
    assert slow.exits[0].exit_seconds == pytest.approx(0.03)
    assert slow.meta["edge_scale"] == 10.0
    assert CostTable.from_dict(slow.to_dict()) == slow
    with pytest.raises(ConfigError):
        scale_edge(table, 0)


def test_best_offload_honours_floor_and_link(table):
    model = CostModel(table)
    assert model.best_offload(None, 0.2e6, 0.04).key == "offload:jpeg75"     # fewest bytes
    assert model.best_offload(0.91, 0.2e6, 0.04).key == "offload:png"        # jpeg75 too lossy
    assert model.best_offload(0.91, 100e6, 0.04).key == "offload:fp32"       # no encode time
