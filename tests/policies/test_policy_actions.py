"""The one action space (bundle-aware), accuracy errors, online calibration, planned oracle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tether.core import traces as T
from tether.core.bundle import CodecEntry, ExitEntry, Manifest, SplitEntry
from tether.core.errors import BundleError
from tether.core.policy import DecisionContext, Observation
from tether.core.types import LOCAL, Action, CodecCost, TensorSpec
from tether.policies import PolicyConfig, action_space, build_cost_model, build_policy, scale_edge
from tether.policies.calibration import CLAMP, Calibrator
from tether.policies.evaluate import run_policies
from tether.policies.oracle import lower_bound, plan_sequence
from tether.policies.simulator import SimConfig, Simulator


def _manifest(table, heads=("layer2", "layer3"), codecs=(), exits=()) -> Manifest:
    points = tuple(SplitEntry(s.name, s.index, s.shape, s.dtype, s.bytes,
                              f"heads/{s.name}.onnx" if s.name in heads else None)
                   for s in table.splits)
    m = Manifest("toy", "f" * 64, TensorSpec((1, 3, 32, 32)), points)
    for split, codec in codecs:
        m = m.with_codec(CodecEntry(split, codec, "bottleneck"))
    for split in exits:
        m = m.with_exit(ExitEntry(split, f"exits/{split}.onnx", 0.9))
    return m


def test_action_space_holds_only_what_the_edge_can_run(table):
    learned = CodecCost("layer3", "bottleneck-b0.001", 60, 0.001, 0.001, 0.90, 50)
    orphan = CodecCost("layer2", "bottleneck-b0.01", 40, 0.001, 0.001, 0.85, 50)
    t = replace(table, codecs=table.codecs + (learned, orphan))
    keys = {c.action.key for c in action_space(t, _manifest(t, codecs=[("layer3", "bottleneck-b0.001")]))}
    assert "split:layer3:bottleneck-b0.001" in keys               # trained, listed: runnable
    assert "split:layer2:bottleneck-b0.01" not in keys            # not in the manifest
    assert not any(k.startswith(("split:conv1", "split:layer1")) for k in keys)   # no head
    assert "exit:layer1:fp32" not in keys                         # no exported head, no exit head
    assert {"local", "offload:fp32", "offload:png", "offload:jpeg75", "split:layer2:int8"} <= keys
    every = {c.action.key for c in action_space(t)}                # bare table: everything
    assert "split:conv1:fp32" in every and "exit:layer1:fp32" in every


def test_student_codec_costs_its_encoder_only(table):
    student = CodecCost("layer3", "student-b1", 50, 0.004, 0.001, 0.90, 40, replaces_head=True)
    t = replace(table, codecs=table.codecs + (student,))
    m = _manifest(t, heads=(), codecs=[("layer3", "student-b1")], exits=("layer3",))
    costs = {c.action.key: c for c in action_space(t, m)}
    c = costs["split:layer3:student-b1"]
    assert c.pre_seconds == 0.0 and c.encode_seconds == 0.004     # not head (95 ms) + encoder
    assert "exit:layer3:student-b1" not in costs                  # an exit needs head features
    assert "split:layer3:int8" not in costs                       # no head exported there


def test_missing_accuracy_is_an_error_naming_the_fix(table):
    no_full = replace(table, full_accuracy=None)
    with pytest.raises(BundleError, match="tether codec eval"):
        build_cost_model(PolicyConfig(), no_full)
    unmeasured = replace(table, codecs=table.codecs + (CodecCost("input", "webp50", 300, 0.001, 0.0),))
    with pytest.raises(BundleError, match="offload:webp50"):
        build_policy(PolicyConfig(name="cloud"), unmeasured)
    # no floor asked for: fine; lossless-only tables need no accuracy at all
    build_cost_model(PolicyConfig(max_accuracy_drop=None), no_full)
    build_cost_model(PolicyConfig(), replace(no_full, codecs=(), exits=()))


def test_the_whole_learned_ladder_is_in_the_action_space(table):
    ladder = [CodecCost("layer3", f"bottleneck-b{b}", n, 0.001, 0.001, acc, 50)
              for b, n, acc in (("0.003", 40, 0.80), ("0.001", 60, 0.90), ("0.0003", 90, 0.91))]
    zstd = CodecCost("layer2", "fp32+zstd", 30000, 0.001, 0.0005)       # lossless: no accuracy
    t = replace(table, codecs=table.codecs + tuple(ladder) + (zstd,))
    m = _manifest(t, codecs=[("layer3", c.codec) for c in ladder])
    keys = {c.action.key for c in action_space(t, m)}
    assert {f"split:layer3:{c.codec}" for c in ladder} <= keys       # every trained rate
    model = build_cost_model(PolicyConfig(max_accuracy_drop=None), t, m)
    assert model.cost(Action.parse("split:layer2:fp32+zstd")).accuracy == t.full_accuracy
    # a trained codec never measured by `tether codec eval` cannot be priced: an error
    untested = m.with_codec(CodecEntry("layer3", "bottleneck-b0.0001", "bottleneck"))
    with pytest.raises(BundleError, match="bottleneck-b0.0001 at layer3.*tether codec eval"):
        build_cost_model(PolicyConfig(), t, untested)


def _served_local(policy, now, seconds, action=LOCAL):
    policy.observe(Observation(now=now, action=action, total_seconds=seconds, edge_seconds=seconds))


def test_calibration_learns_a_slow_edge_within_a_few_requests(table):
    model = build_cost_model(PolicyConfig(), table)
    cal = Calibrator(model)
    assert np.allclose(cal.edge_factors(0.0), 1.0)
    for i in range(3):                       # the edge is 17x slower than profiled
        cal.observe(Observation(now=i, action=LOCAL, edge_seconds=17 * table.edge_full_seconds))
    assert cal.edge_speed == pytest.approx(17, rel=0.01)
    assert np.allclose(cal.edge_factors(3.0), 17, rtol=0.01)   # unseen actions: shared factor
    # one outlier (a preempted quantum) counts as the next largest sample; a second counts,
    # at most CLAMP x the shared factor each; an edge that stays that slow is learned in a
    # few more requests (the clamp grows with the shared factor)
    cal.observe(Observation(now=4, action=LOCAL, edge_seconds=1000 * table.edge_full_seconds))
    assert cal.edge_factors(4.0)[model.index(LOCAL)] == pytest.approx(17, rel=0.01)
    cal.observe(Observation(now=5, action=LOCAL, edge_seconds=1000 * table.edge_full_seconds))
    assert 30 < cal.edge_factors(5.0)[model.index(LOCAL)] < 17 * CLAMP
    for k in range(6, 20):
        cal.observe(Observation(now=k, action=LOCAL, edge_seconds=1000 * table.edge_full_seconds))
    assert cal.edge_factors(20.0)[model.index(LOCAL)] > 500
    split = Action.parse("split:layer3:int8")
    cal.observe(Observation(now=21, action=split, edge_seconds=2 * (0.095 + 0.0005),
                            cloud_seconds=3 * (0.0001 + 0.0001)))
    assert cal.cloud_factors(21.0)[model.index(split)] == pytest.approx(3, rel=0.01)


def test_calibration_shared_factor_weighs_jobs_by_their_profiled_time(table):
    """Under a CPU quota a job far shorter than the quota's period is measured with the stall
    it met (a 0.3 ms encode taking 20-470 ms): the shared factor (the price of unseen
    actions) is total measured over total profiled, so the whole model's runs set it; and
    one stalled tiny job counts at most CLAMP x the shared factor for its own action."""
    model = build_cost_model(PolicyConfig(), table)
    cal = Calibrator(model)
    jpeg = Action.parse("offload:jpeg75")                  # a 1 ms encode
    tiny = model.encode[model.index(jpeg)]
    for i in range(4):
        cal.observe(Observation(now=i, action=LOCAL, edge_seconds=17 * table.edge_full_seconds))
    cal.observe(Observation(now=5, action=jpeg, edge_seconds=1500 * tiny))
    assert cal.edge_speed < 17 * 1.1
    assert cal.edge_factors(5.0)[model.index(jpeg)] == pytest.approx(CLAMP * 17, rel=0.01)


def test_calibration_prices_the_mean_of_a_bimodal_service_time(table):
    """Under a CPU quota a small job runs at once or waits for the next period (the demo's
    edge: encodes of 2 and 50 ms in turn); latency is their mean, not the geometric mean
    (10 ms) a log-average would price."""
    model = build_cost_model(PolicyConfig(), table)
    cal = Calibrator(model)
    for i in range(40):                      # 2x and 50x the profile in turn
        ratio = 2.0 if i % 2 else 50.0
        cal.observe(Observation(now=i, action=LOCAL, edge_seconds=ratio * table.edge_full_seconds))
    assert cal.edge_factors(40.0)[model.index(LOCAL)] == pytest.approx(26.0, rel=0.2)


def test_adaptive_prices_a_slow_edge_right(table):
    """A fast profile (local 4 ms wins), a 17x slower device (local 68 ms loses to an offload
    at 8 Mbit/s): calibrated, adaptive finds that out within a few requests."""
    fast = replace(table, edge_full_seconds=0.004)
    slow = scale_edge(fast, 17.0)
    trace = T.constant(8.0, 120)
    cfg = SimConfig(n_requests=200, rate_hz=2.0, seed=2)
    res = run_policies(slow, trace, ("local", "adaptive", "oracle-x"), sim_config=cfg, profile=fast)
    uncal = run_policies(slow, trace, ("adaptive",), PolicyConfig(calibrate=False), cfg, profile=fast)
    means = {k: v.latencies.mean() for k, v in res.items()}
    assert uncal["adaptive"].latencies.mean() == pytest.approx(means["local"])   # fooled
    assert means["adaptive"] < 0.8 * means["local"]
    assert means["adaptive"] <= 1.1 * means["oracle-x"]
    first_offload = next(r.request_id for r in res["adaptive"].requests if r.action != "local")
    assert first_offload <= 3


def test_probe_never_breaks_the_deadline(table):
    cfg = PolicyConfig(name="adaptive", prior_bandwidth_bps=1e4)    # 10 kbit/s: no remote fits
    policy = build_policy(cfg, table)
    assert policy.decide(DecisionContext(0.0, deadline_seconds=0.2)) == LOCAL
    loose = build_policy(cfg, table)
    assert loose.decide(DecisionContext(0.0, deadline_seconds=100.0)) != LOCAL   # probes then


def test_planned_oracle_is_a_bound_and_beats_every_policy(table):
    trace = T.markov([12, 3, 0.3], 2.0, 60, seed=5)
    cfg = SimConfig(n_requests=300, rate_hz=8.0, seed=3)
    res = run_policies(table, trace, ("local", "cloud", "neurosurgeon", "adaptive", "greedy",
                                      "bound", "oracle", "oracle-x"), sim_config=cfg)
    means = {k: v.latencies.mean() for k, v in res.items()}
    assert res["oracle"].meta["exact"]
    assert means["bound"] <= means["oracle"] + 1e-9
    for name in ("local", "cloud", "neurosurgeon", "adaptive", "greedy", "oracle-x"):
        assert means["oracle"] <= means[name] + 1e-4, name
    # per request, nothing beats the bound
    assert np.all(res["bound"].latencies <= res["oracle"].latencies + 1e-6)


def test_planner_matches_the_simulator_and_caps_its_beam(table):
    model = build_cost_model(PolicyConfig(), table)
    trace = T.constant(4.0, 60)
    sim = Simulator(model, trace, SimConfig(n_requests=80, rate_hz=20.0, ping_interval_seconds=None))
    allowed = model.allowed(0.9)
    plan, info = plan_sequence(model, trace, sim.arrival_times, sim.draws, allowed, rtt=0.04,
                               deadline=1.0)
    from tether.policies.simulator import _Scripted
    replayed = sim.run(_Scripted([model.actions[i] for i in plan])).latencies.mean()
    assert replayed == pytest.approx(info["planned_mean_s"], rel=1e-9)
    _, tight = plan_sequence(model, trace, sim.arrival_times, sim.draws, allowed, rtt=0.04,
                             deadline=1.0, beam=1)
    assert tight["truncated_steps"] > 0 and not tight["exact"]
    bound = lower_bound(model, trace, sim.arrival_times, sim.draws, allowed, rtt=0.04, deadline=1.0)
    assert bound.mean() <= info["planned_mean_s"] + 1e-12


def test_a_loaded_edge_offloads_a_share_although_local_is_faster_alone(table):
    """Local 25 ms beats any offload (RTT 40 ms) for one request, but at 32 requests/s the
    edge queue builds up: pricing the queueing it causes, adaptive offloads a share and
    beats both always-local and the best fixed action (always offload)."""
    t = replace(table, edge_full_seconds=0.025)
    trace = T.constant(20.0, 120)
    cfg = SimConfig(n_requests=1500, rate_hz=32.0, seed=4)
    res = run_policies(t, trace, ("local", "static", "neurosurgeon", "adaptive"), sim_config=cfg)
    blind = run_policies(t, trace, ("adaptive",), PolicyConfig(edge_load_weight=0.0), cfg)
    means = {k: v.latencies.mean() for k, v in res.items()}
    assert means["adaptive"] < 0.95 * min(means["static"], means["neurosurgeon"])
    assert means["adaptive"] < 0.7 * means["local"]
    assert means["adaptive"] < 0.7 * blind["adaptive"].latencies.mean()
    shares = np.mean([r.action != "local" for r in res["adaptive"].requests])
    assert 0.05 < shares < 0.95                     # a mix, not a switch
