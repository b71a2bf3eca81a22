"""The backlog value of the edge queue (relative value iteration) and its use by adaptive."""

from __future__ import annotations

import numpy as np
import pytest

from tether.policies.queueing import BacklogValue, _arrival_matrix, _frontier


def test_arrival_matrix_rows_are_distributions():
    m = _arrival_matrix(rate=30.0, step=0.01, points=40)
    assert np.allclose(m.sum(axis=1), 1.0)
    assert np.allclose(np.triu(m, 1), 0.0)          # the backlog only drains between arrivals
    assert m[0, 0] == 1.0


def test_warm_resolves_reuse_the_arrival_matrix_and_converge_to_the_cold_solution():
    lat, work = np.array([0.27, 0.12, 0.15]), np.array([0.27, 0.01, 0.04])
    warm = BacklogValue()
    warm.solve(2.0, lat * 1.3, work)                 # solved first for other prices
    for k in range(80):                             # rates within one quantisation step
        warm.solve(2.0 * (1 + 0.0001 * (k % 10)), lat, work)
    assert len(warm._matrices) == 1 and warm.solves == 81
    cold = BacklogValue()
    cold.solve(2.0, lat, work)
    np.testing.assert_allclose(warm.values, cold.values, atol=2e-3)
    assert cold.values[-1] > 0.1                     # a real backlog value, not zeros


def test_frontier_drops_actions_slower_and_heavier_than_another():
    lat, work = _frontier(np.array([0.025, 0.060, 0.070, 0.030]),
                          np.array([0.025, 0.0, 0.010, 0.030]))
    assert sorted(zip(work.tolist(), lat.tolist())) == [(0.0, 0.06), (0.025, 0.025)]


def test_local_on_an_idle_edge_offload_behind_a_long_queue():
    """Local 25 ms vs an offload of 60 ms that puts no work on the edge, 32 requests/s
    (local-only would load the edge to 80 %): local when the queue is empty, offload once
    the backlog is long, and the value of backlog grows faster than linearly."""
    lat, work = np.array([0.025, 0.060]), np.array([0.025, 0.0])
    value = BacklogValue()
    value.solve(32.0, lat, work)
    choice = lambda w: int(np.argmin(lat + value.cost(w, work)))  # noqa: E731
    assert choice(0.0) == 0 and choice(0.2) == 1
    grid = np.linspace(0.0, 0.5, 26)
    u = value.cost(0.0, grid)
    assert np.all(np.diff(u) > 0) and np.all(np.diff(u, 2) > -1e-9)
    # warm re-solve at a slightly different rate keeps the decision boundary nearby
    switch = min(w for w in np.linspace(0, 0.2, 81) if choice(w) == 1)
    value.solve(33.0, lat, work)
    later = min(w for w in np.linspace(0, 0.2, 81) if choice(w) == 1)
    assert abs(later - switch) <= 0.01
    assert value.solves == 2


def test_adaptive_learns_the_daemons_per_request_edge_time(table):
    from tether.core.policy import Observation
    from tether.core.types import LOCAL
    from tether.policies import PolicyConfig, build_policy
    policy = build_policy(PolicyConfig(), table)
    before = policy.work(0.0).copy()
    for i in range(30):   # local answers: 100 ms compute, 40 ms queued, 160 ms in all
        policy.observe(Observation(now=0.1 * i, action=LOCAL, total_seconds=0.16,
                                   edge_seconds=0.1, edge_wait_seconds=0.04))
    added = policy.work(3.0) - before
    assert np.allclose(added, added[0]) and abs(added[0] - 0.02) < 0.002


def test_adaptive_sees_requests_waiting_before_they_reach_it(table):
    """A daemon saturated upstream of the policy (requests wait to be decided at all):
    received at now - total, decided later; that wait counts as backlog in front of
    every action's work, so offloading becomes worth more."""
    from tether.core.policy import DecisionContext, Observation
    from tether.core.types import LOCAL
    from tether.policies import PolicyConfig, build_policy
    policy = build_policy(PolicyConfig(probe_interval_seconds=0.0), table)
    for i in range(5):
        policy.decide(DecisionContext(now=0.2 * i))
    fixed, bits, _ = policy.terms(1.0)
    lat = fixed + bits / 8e6
    calm = policy.backlog_cost(1.0, lat, policy.work(1.0))
    n = len(policy._local_decisions)
    assert n >= 1
    decided = policy._local_decisions[0]
    policy.observe(Observation(now=decided + 0.5, action=LOCAL, total_seconds=0.9,
                               edge_seconds=0.1, edge_wait_seconds=0.0))
    assert abs(policy._upstream - 0.4) < 1e-9            # received 0.4 s before it was decided
    busy = policy.backlog_cost(decided + 0.5, lat, policy.work(decided + 0.5))
    assert (busy - busy.min()).max() > (calm - calm.min()).max()


def test_daemon_overhead_is_edge_work_in_the_simulator_and_the_planner(table):
    from tether.core import traces as T
    from tether.policies import PolicyConfig, build_cost_model
    from tether.policies.oracle import plan_sequence
    from tether.policies.simulator import SimConfig, Simulator, _Scripted
    model = build_cost_model(PolicyConfig(), table)
    trace = T.constant(4.0, 60)
    cfgs = [SimConfig(n_requests=60, rate_hz=8.0, ping_interval_seconds=None,
                      edge_overhead_seconds=o) for o in (0.0, 0.02)]
    means = []
    for cfg in cfgs:
        sim = Simulator(model, trace, cfg)
        plan, info = plan_sequence(model, trace, sim.arrival_times, sim.draws,
                                   model.allowed(0.9), rtt=0.04, deadline=1.0,
                                   overhead=cfg.edge_overhead_seconds)
        replayed = sim.run(_Scripted([model.actions[i] for i in plan])).latencies.mean()
        assert replayed == pytest.approx(info["planned_mean_s"], rel=1e-9)
        means.append(replayed)
    assert means[1] > means[0] + 0.02 * 0.5       # every request pays it, queues grow
