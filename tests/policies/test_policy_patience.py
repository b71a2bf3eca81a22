"""Patience: a policy that predicts its reply gives up an overdue offload and answers locally."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.core import traces as T
from tether.core.errors import ConfigError
from tether.core.policy import DecisionContext, Observation, patience_of
from tether.core.types import LOCAL, Action
from tether.policies import PolicyConfig, build_cost_model, build_policy
from tether.policies.baselines import StaticPolicy
from tether.policies.simulator import SimConfig, Simulator

PNG = Action.parse("offload:png")
#: 10 Mbit/s for 5 s, then a 1.5 s outage, then 10 Mbit/s again
OUTAGE = T.steps([(5.0, 10.0), (1.5, 0.0), (10.0, 10.0)])


def _served(policy, now: float, bps: float = 10e6) -> None:
    nbytes = 2856
    policy.observe(Observation(now=now, action=PNG, bytes_sent=nbytes, bytes_received=320,
                               network_seconds=0.04 + nbytes * 8 / bps, total_seconds=0.05))


def _warm(table, **kw):
    policy = build_policy(PolicyConfig(**{"name": "adaptive", "calibrate": False, **kw}), table)
    for i in range(5):
        _served(policy, i * 0.2)
    return policy


class _Patient(StaticPolicy):
    def __init__(self, action, value):
        super().__init__(action)
        self.value = value

    def patience(self, action):
        return self.value


def test_patience_of_ignores_absent_and_meaningless_values():
    assert patience_of(StaticPolicy(PNG), PNG) is None
    assert patience_of(_Patient(PNG, 0.25), PNG) == 0.25
    assert patience_of(_Patient(PNG, 0.0), PNG) == 0.0     # race from the send
    for bad in (None, -1.0, math.inf, math.nan):
        assert patience_of(_Patient(PNG, bad), PNG) is None


@pytest.mark.parametrize("factor", [1.0, 1.5, 5.0])
def test_adaptive_patience_is_a_multiple_of_the_prediction(table, factor):
    policy = _warm(table, patience_factor=factor)
    lat = policy.predict(DecisionContext(1.0), policy.bandwidth(1.0))
    action = policy.decide(DecisionContext(1.0))
    assert action == PNG
    i, local = policy.model.index(PNG), lat[policy.model.index(LOCAL)]
    pred = lat[i] - policy.model.pre[i] - policy.model.encode[i]      # send to reply
    # no floor at the local answer's cost: the local answer races the reply
    assert policy.patience(action) == pytest.approx(factor * pred)
    assert (factor * pred > local) == (factor == 5.0)
    assert policy.patience(Action.parse("offload:jpeg75")) is None   # not the one decided


def test_adaptive_patience_none_for_local_and_when_disabled(table):
    policy = _warm(table)
    assert policy.decide(DecisionContext(1.0, cloud_available=False)) == LOCAL
    assert policy.patience(LOCAL) is None
    off = _warm(table, patience_factor=0.0)
    action = off.decide(DecisionContext(1.0))
    assert action == PNG and off.patience(action) is None
    causal = _warm(table, name="causal")     # no in-flight bound: it would re-offload
    action = causal.decide(DecisionContext(1.0))
    assert action == PNG and causal.patience(action) is None


def test_adaptive_patience_of_an_exit_prices_its_offload_path(table):
    exit_ = Action.parse("exit:layer1:fp32")
    policy = _warm(table, patience_factor=5.0, actions=("local", exit_.key))
    lat = policy.predict(DecisionContext(1.0), policy.bandwidth(1.0))
    assert policy.decide(DecisionContext(1.0)) == exit_
    i = policy.model.index(exit_)
    pre, frac, encode = policy.model.pre[i], policy.model.remote_frac[i], policy.model.encode[i]
    # send to reply if the exit is not confident: expected = pre + frac * (encode + remote)
    assert frac == pytest.approx(0.5)
    assert policy.patience(exit_) == pytest.approx(5.0 * ((lat[i] - pre) / frac - encode))


def test_patience_factor_must_be_non_negative_and_finite():
    with pytest.raises(ConfigError, match="patience_factor"):
        PolicyConfig(patience_factor=-0.5)
    with pytest.raises(ConfigError, match="patience_factor"):
        PolicyConfig(patience_factor=math.inf)
    assert PolicyConfig(patience_factor=0.0).patience_factor == 0.0


def _outage_run(table, policy, n=80):
    model = build_cost_model(PolicyConfig(), table)
    sim = Simulator(model, OUTAGE, SimConfig(n_requests=n, arrival="periodic", rate_hz=5.0,
                                             ping_interval_seconds=None))
    return sim.run(policy).requests


def test_simulator_gives_up_at_the_policy_patience(table):
    """A fixed patience: answered at send + patience + the local model, not the deadline."""
    reqs = _outage_run(table, _Patient(PNG, 0.3), n=30)
    stuck = [r for r in reqs if 5.0 <= r.arrival < 6.0]
    assert all(r.outcome == "fallback" for r in stuck)
    assert stuck[0].send_time - stuck[0].arrival == pytest.approx(0.002)    # png encode
    assert stuck[0].latency == pytest.approx(0.002 + 0.3 + 0.1)
    late = _outage_run(table, _Patient(PNG, 5.0), n=30)     # beyond the deadline: the deadline
    assert [r.latency for r in late if r.arrival == 5.0] == pytest.approx([1.0])


def test_adaptive_stops_waiting_for_an_offload_stuck_in_an_outage(table):
    runs = {f: _outage_run(table, build_policy(PolicyConfig(name="adaptive", patience_factor=f),
                                                 table))
            for f in (0.0, 2.0)}
    at = {f: next(r for r in reqs if r.arrival == 5.0) for f, reqs in runs.items()}
    assert at[0.0].action == at[2.0].action == PNG.key     # offloaded as the outage began
    assert (at[0.0].outcome, at[2.0].outcome) == ("fallback", "fallback")
    assert at[0.0].latency == pytest.approx(1.0)            # waited for the deadline
    assert at[2.0].latency < 0.3                            # gave up at ~2x its prediction
    # the rest of the outage is answered locally either way (the bytes still hold the link)
    for reqs in runs.values():
        assert all(r.action == "local" for r in reqs if 5.1 < r.arrival < 6.5)
    mean = {f: np.mean([r.latency for r in reqs]) for f, reqs in runs.items()}
    assert mean[2.0] < mean[0.0]


class _Spy(_Patient):
    def __init__(self, action, value):
        super().__init__(action, value)
        self.seen = []

    def observe(self, obs):
        self.seen.append((obs.now, obs.ok, obs.bytes_sent, obs.network_seconds))


def test_simulator_policy_learns_as_if_it_had_waited(table):
    """Giving up changes when the request is answered, not what the policy observes."""
    model = build_cost_model(PolicyConfig(), table)
    cfg = SimConfig(n_requests=16, arrival="periodic", rate_hz=2.0, ping_interval_seconds=None)
    runs = {}
    for value in (None, 0.3):
        spy = _Spy(PNG, value)
        runs[value] = (Simulator(model, OUTAGE, cfg).run(spy).requests, spy.seen)
    (waited, seen), (patient, seen_patient) = runs[None], runs[0.3]
    assert seen_patient == seen and any(not ok for _, ok, _, _ in seen)
    stuck = [(a.latency, b.latency) for a, b in zip(waited, patient) if b.outcome == "fallback"]
    # answered at send (png: 2 ms) + patience + the local model, not at the deadline
    assert [b for _, b in stuck] == pytest.approx([0.002 + 0.3 + 0.1] * 3)
    assert [a for a, _ in stuck][:2] == pytest.approx([1.0, 1.0])


def test_simulator_gives_up_what_was_sent_behind_an_overdue_offload(table):
    """As on the edge: the FIFO uplink holds a later send behind the overdue one."""
    model = build_cost_model(PolicyConfig(), table)
    cfg = SimConfig(n_requests=4, ping_interval_seconds=None)
    sim = Simulator(model, OUTAGE, cfg)
    sim.arrival_times = np.array([0.0, 1.0, 5.0, 5.25])
    reqs = sim.run(_Patient(PNG, 0.3)).requests
    first, second = reqs[2], reqs[3]
    assert (first.outcome, second.outcome) == ("fallback", "fallback")
    assert first.latency == pytest.approx(0.002 + 0.3 + 0.1)
    # given up with the first at 5.302 (its own patience would end at 5.552), then its local
    # answer behind the first one's on the edge CPU
    assert second.arrival + second.latency == pytest.approx(5.0 + 0.002 + 0.3 + 0.1 + 0.1)


class _Script(_Patient):
    """Decides the given actions in order, with one patience for every offload."""

    def __init__(self, actions, value):
        super().__init__(actions[0], value)
        self.todo = list(actions)

    def decide(self, ctx):
        return self.todo.pop(0)


def test_simulator_races_an_overdue_offload_against_its_local_answer(table):
    """As on the edge: given up at its patience, the local answer starts, but a reply that
    comes first answers, and the local run stops (a request after it finds the CPU free)."""
    model = build_cost_model(PolicyConfig(), table)
    link = T.steps([(10.0, 0.5)])      # a png reply in ~0.1 s, the local model 0.1 s
    cfg = SimConfig(n_requests=1, ping_interval_seconds=None)
    waited = Simulator(model, link, cfg).run(_Patient(PNG, None)).requests[0]
    reply = waited.latency
    assert 0.002 + 0.03 + 0.1 > reply > 0.05
    sim = Simulator(model, link, cfg)
    sim.arrival_times = np.array([0.0, reply + 0.001])
    first, second = sim.run(_Script([PNG, LOCAL], 0.03)).requests
    assert (first.outcome, first.latency) == ("cloud", pytest.approx(reply))
    assert second.latency == pytest.approx(0.1)     # the stopped run does not hold the CPU
    # a 0.1 Mbit/s link: the reply (~0.3 s) loses to the local answer
    lost = Simulator(model, T.steps([(10.0, 0.1)]), cfg).run(_Patient(PNG, 0.03)).requests[0]
    assert (lost.outcome, lost.latency) == ("fallback", pytest.approx(0.002 + 0.03 + 0.1))
