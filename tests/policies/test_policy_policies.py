"""Every policy: choices at known link states, step changes, outages, TOML config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tether.core import traces as T
from tether.core.errors import ConfigError
from tether.core.policy import DecisionContext, Observation, Policy
from tether.core.types import LOCAL, Action, ActionKind
from tether.policies import POLICIES, PolicyConfig, build_cost_model, build_policy, load_policy_config
from tether.policies.simulator import SimConfig, Simulator

PNG = Action.parse("offload:png")


def _served(policy: Policy, now: float, action: Action, bps: float, rtt: float = 0.04) -> None:
    """Feed the observation a link of ``bps`` would produce for ``action``."""
    nbytes = 2856
    policy.observe(Observation(now=now, action=action, bytes_sent=nbytes, bytes_received=320,
                               network_seconds=rtt + nbytes * 8 / bps, total_seconds=0.05))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_implements_the_interface(table, name):
    policy = build_policy(PolicyConfig(name=name), table)
    assert isinstance(policy, Policy)
    assert policy.name in (name, "static", "cloud")
    if name != "oracle":
        ctx = DecisionContext(now=0.0)
        assert isinstance(policy.decide(ctx), Action)
        assert policy.decide(DecisionContext(now=0.1, cloud_available=False)) == LOCAL
        policy.observe(Observation(now=0.2, rtt_seconds=0.04))


def test_unknown_policy_and_bad_config(table):
    with pytest.raises(ConfigError, match="valid"):
        build_policy(PolicyConfig(name="magic"), table)
    with pytest.raises(ConfigError, match="deadline"):
        PolicyConfig(objective="accuracy")
    with pytest.raises(ConfigError, match="estimator"):
        PolicyConfig(estimator="crystal-ball")


def test_policy_config_from_toml(tmp_path, table):
    path = tmp_path / "p.toml"
    path.write_text('[policy]\nname = "adaptive"\nestimator = "ewma"\nwindow = 8\n'
                    'actions = ["local", "offload:png"]\n')
    cfg = load_policy_config(str(path), hysteresis=0.2)
    assert (cfg.estimator, cfg.window, cfg.hysteresis) == ("ewma", 8, 0.2)
    policy = build_policy(cfg, table)
    assert {a.key for a in policy.model.actions} == {"local", "offload:png"}
    path.write_text('[policy]\nwindow = "big"\n')
    with pytest.raises(ConfigError, match="policy.window"):
        load_policy_config(str(path))


def test_local_cloud_and_static(table):
    assert build_policy(PolicyConfig(name="local"), table).decide(DecisionContext(0)) == LOCAL
    # cloud-only: fastest input codec at the prior within 1 point of full accuracy
    slow = PolicyConfig(name="cloud", prior_bandwidth_bps=0.2e6)
    assert build_policy(slow, table).decide(DecisionContext(0)) == PNG
    lossy = dataclasses.replace(slow, max_accuracy_drop=0.05)     # jpeg75 loses 3.6 points
    assert build_policy(lossy, table).decide(DecisionContext(0)).codec == "jpeg75"
    fixed = PolicyConfig(name="static", static_action="split:layer2:int8")
    assert build_policy(fixed, table).decide(DecisionContext(0)).key == "split:layer2:int8"
    crawl = PolicyConfig(name="static", prior_bandwidth_bps=0.05e6)
    assert build_policy(crawl, table).decide(DecisionContext(0)) == LOCAL


def test_neurosurgeon_follows_last_sample(table):
    ns = build_policy(PolicyConfig(name="neurosurgeon"), table)
    _served(ns, 0.0, PNG, 10e6)
    assert ns.decide(DecisionContext(0.1)).kind is ActionKind.OFFLOAD
    _served(ns, 0.2, PNG, 0.05e6)
    assert ns.decide(DecisionContext(0.3)) == LOCAL
    _served(ns, 0.4, PNG, 10e6)
    assert ns.decide(DecisionContext(0.5)).kind is ActionKind.OFFLOAD


def test_a_busy_edges_own_delay_is_not_read_as_a_slow_link(table):
    """A throttled edge that is computing delays every message it sends or receives (its
    pings show it: 30 ms propagation, 80 ms typical): a 1 KB offload over a 1 Mbit/s link
    is a 1 Mbit/s sample, not 1000 B / (88 - 30) ms = 0.14 Mbit/s, which priced bigger
    payloads as slower than they are and held the demo's adaptive on its smallest one."""
    for name in ("neurosurgeon", "adaptive"):
        policy = build_policy(PolicyConfig(name=name, window_seconds=10.0), table)
        for i, rtt in enumerate((0.03, 0.08, 0.08, 0.08, 0.08)):
            policy.observe(Observation(now=i * 0.5, rtt_seconds=rtt))
        policy.observe(Observation(now=3.0, action=PNG, bytes_sent=1000,
                                   network_seconds=0.080 + 0.008, total_seconds=0.1))
        assert policy.bandwidth(3.0) == pytest.approx(1e6, rel=0.35), name


def test_pings_that_crossed_an_upload_do_not_set_the_typical_round_trip(table):
    """In a fade a ping queues behind the edge's own upload: that delay is the link's (its
    bytes price it); counted in the typical round trip too, the upload's own sample would
    shrink to nothing and read as a fast link."""
    policy = build_policy(PolicyConfig(name="adaptive", window_seconds=10.0), table)
    for i in range(5):
        policy.observe(Observation(now=i * 0.5, rtt_seconds=0.03))
    policy.remember(2.5, PNG, send=2.5)                  # an upload in flight
    for i in range(5):
        policy.observe(Observation(now=2.6 + i * 0.1, rtt_seconds=0.9))
    assert policy.rtt.typical(3.0) == pytest.approx(0.03)
    policy.observe(Observation(now=3.2, action=PNG, bytes_sent=2856, network_seconds=0.7,
                               total_seconds=0.75))
    assert policy.bandwidth(3.2) < 0.1e6                 # 2856 B in ~0.67 s: a slow link
    for i in range(5):                                   # nothing of ours on the link
        policy.observe(Observation(now=4.0 + i * 0.5, rtt_seconds=0.08))
    assert policy.rtt.typical(6.0) == pytest.approx(0.08)


def test_adaptive_reacts_to_an_offload_stuck_in_flight(table):
    policy = build_policy(PolicyConfig(name="adaptive"), table)
    for i in range(5):
        _served(policy, i * 0.2, PNG, 10e6)
    first = policy.decide(DecisionContext(1.0))
    assert first.kind is ActionKind.OFFLOAD
    # no reply yet 0.5 s later: the link is (nearly) down, answer locally
    assert policy.decide(DecisionContext(1.5)) == LOCAL


def test_adaptive_accuracy_objective_spends_deadline_on_accuracy(table):
    cfg = PolicyConfig(name="adaptive", objective="accuracy", deadline_seconds=0.2,
                       max_accuracy_drop=None)
    policy = build_policy(cfg, table)
    for i in range(10):
        _served(policy, i * 0.1, PNG, 20e6)
    best = policy.decide(DecisionContext(1.0))
    assert best.kind is ActionKind.EXIT          # the exit's 0.97 answers raise the expectation
    tight = build_policy(dataclasses.replace(cfg, deadline_seconds=0.03), table)
    for i in range(10):
        _served(tight, i * 0.1, PNG, 20e6)
    # nothing meets 30 ms: the fastest action
    lat = tight.model.latencies(tight.bw.quantile(0.1, 1.0), tight.rtt.propagation(1.0))
    assert tight.decide(DecisionContext(1.0)) == tight.model.actions[int(np.argmin(lat))]


def _sim(table, trace, n=300, rate=5.0):
    model = build_cost_model(PolicyConfig(), table)
    cfg = SimConfig(n_requests=n, arrival="periodic", rate_hz=rate, seed=1)
    return model, Simulator(model, trace, cfg)


def _run(table, trace, name, **kw):
    model, sim = _sim(table, trace, **kw)
    return sim.run(build_policy(PolicyConfig(name=name), table, model)).requests


def test_adaptive_switches_within_bounded_requests_on_step_changes(table):
    trace = T.steps([(20, 10.0), (20, 0.05), (20, 10.0)])
    reqs = _run(table, trace, "adaptive")
    before = [r for r in reqs if 10 <= r.arrival < 20]
    assert all(r.action.startswith("offload") for r in before)
    down = [r for r in reqs if r.arrival >= 20]
    first_local = next(i for i, r in enumerate(down) if r.action == "local")
    assert first_local <= 3                                   # switches within 3 requests
    low = [r for r in down[first_local + 1:] if r.arrival < 40]
    # a few bounded probes in 19 s: after 2 s of silence, the gap doubling up to 10 s
    assert sum(r.action != "local" for r in low) <= 5
    up = [r for r in reqs if r.arrival >= 40]
    back = next(i for i, r in enumerate(up) if r.action.startswith("offload"))
    assert back <= 40                                         # probes back within ~8 s
    assert all(r.action.startswith("offload") for r in up[back + 5:])


def test_adaptive_bounded_fallbacks_in_outages(table):
    trace = T.on_off(10.0, on_s=10.0, off_s=4.0, cycles=4)
    adaptive = _run(table, trace, "adaptive")
    cloud = _run(table, trace, "cloud")
    fallbacks = sum(r.outcome == "fallback" for r in adaptive)
    assert fallbacks <= 2 * 4                                 # at most 2 per outage
    assert sum(r.outcome == "fallback" for r in cloud) > 3 * fallbacks
    assert np.mean([r.latency for r in adaptive]) < np.mean([r.latency for r in cloud])


def test_bandit_learns_the_best_arm_without_a_profile(table):
    trace = T.constant(20.0, 60)
    reqs = _run(table, trace, "bandit", n=600)
    oracle = _run(table, trace, "oracle", n=600)
    lat = np.array([r.latency for r in reqs]) - np.array([r.latency for r in oracle])
    assert lat[-200:].mean() < 0.5 * lat[:100].mean()          # regret flattens
    assert lat[-200:].mean() < 0.003                            # within 3 ms of the oracle
    late = {r.action for r in reqs[-200:]}
    assert late <= {"offload:png", "offload:fp32", "split:conv1:fp32", "exit:layer1:fp32"}


def test_oracle_needs_the_simulator(table):
    oracle = build_policy(PolicyConfig(name="oracle"), table)
    with pytest.raises(ConfigError, match="simulate"):
        oracle.decide(DecisionContext(0.0))


def test_oracle_is_never_worse_on_average(table):
    trace = T.markov([12, 3, 0.3], 2.0, 60, seed=5)
    means = {n: np.mean([r.latency for r in _run(table, trace, n)])
             for n in ("oracle", "adaptive", "local", "cloud", "neurosurgeon")}
    assert means["oracle"] <= min(means.values()) + 1e-9


def test_adaptive_probes_a_pessimistic_cold_start_once_per_interval(table):
    cfg = PolicyConfig(name="adaptive", prior_bandwidth_bps=0.05e6, probe_interval_seconds=10.0)
    policy = build_policy(cfg, table)
    first = policy.decide(DecisionContext(0.0))
    assert first.kind is not ActionKind.LOCAL          # nothing measured yet: worth one probe
    assert policy.decide(DecisionContext(1.0)) == LOCAL   # prior says local; probe rationed
    _served(policy, 1.2, first, 0.05e6)                 # the probe confirms a bad link
    assert [policy.decide(DecisionContext(t)).kind for t in (12.0, 30.0)] == [ActionKind.LOCAL] * 2
    no_probe = build_policy(dataclasses.replace(cfg, probe_interval_seconds=0.0), table)
    assert no_probe.decide(DecisionContext(0.0)) == LOCAL


def test_own_queueing_is_not_mistaken_for_a_slow_link(table):
    policy = build_policy(PolicyConfig(name="adaptive", estimator="last"), table)
    policy.observe(Observation(now=0.0, rtt_seconds=0.04))
    # two 10 kB offloads sent together at t=0 over 8 Mbit/s: replies at 0.05 s and 0.06 s
    first = dict(action=PNG, bytes_sent=10_000, bytes_received=320, total_seconds=0.06)
    policy.observe(Observation(now=0.05, network_seconds=0.05, **first))
    assert policy.bw.last == pytest.approx(8e6)
    policy.observe(Observation(now=0.06, network_seconds=0.06, **first))
    assert policy.bw.last == pytest.approx(8e6)   # naive 10 kB / 20 ms would say 4 Mbit/s


def test_probes_back_off_over_a_dead_link_and_resume_quickly_after_a_fade(table):
    # a dead zone: probes after 2 s of silence, the gap doubling up to probe_interval (10 s)
    dead = _run(table, T.steps([(10, 10.0), (60, 0.02)]), "adaptive", n=350)
    probes = [r.arrival for r in dead if r.arrival > 12 and r.action != "local"]
    gaps = np.diff(probes)
    assert 3 <= len(probes) <= 9 and gaps.max() <= 10 + 2.5     # capped (+ the probe's reply)
    assert gaps[-1] > 2 * gaps[0]                                # backed off
    # a 4 s fade: the link is re-measured within seconds of its return, not after 10 s
    fade = _run(table, T.steps([(10, 10.0), (4, 0.02), (20, 10.0)]), "adaptive", n=170)
    back = next(r.arrival for r in fade if r.arrival > 14 and r.action.startswith("offload"))
    assert back < 14 + 4.5


def test_adaptive_probes_are_hedged_so_a_dead_link_costs_them_no_wait(table):
    """A probe's local answer starts at its send: over a dead link it answers as fast as a
    local decision would (plus its encode), not at a patience or the deadline."""
    dead = _run(table, T.steps([(10, 10.0), (60, 0.02)]), "adaptive", n=350)
    probes = [r for r in dead if r.arrival > 12 and r.action != "local"]
    local = [r.latency for r in dead if r.arrival > 12 and r.action == "local"]
    assert len(probes) >= 3 and all(r.outcome == "fallback" for r in probes)
    assert max(r.latency for r in probes) < min(local) + 0.01
