"""Discrete-event, trace-driven simulator of one edge client talking to the cloud.

Resources (each FIFO, so back-to-back requests contend): the edge CPU, the uplink and the
downlink (both :class:`~tether.core.traces.Trace` replays). Per request, exactly the model
the testbed measures: edge compute (head / whole model / exit head) + encode, payload and
header bytes through the uplink, half the propagation RTT, the cloud's queue, decode and
tail, result bytes through the downlink, the other half RTT. As in the edge agent, an
offload gets ``deadline - elapsed - reserve`` seconds (reserve: the local answer's time);
without a reply by then the whole model answers on the edge ("fallback"). Once the
policy's patience for the request (:func:`~tether.core.policy.patience_of`, counted from
the send) runs out, the whole model starts on the edge and races the reply: the first
answers (a reply that wins frees what its local run had left of the edge CPU); the
policy observes a losing reply, or the failure at the deadline, as if the edge had waited.
Periodic PINGs share the links and feed RTT samples.

Policies see only :class:`DecisionContext` and :class:`Observation`, as on a real edge;
the :class:`HindsightOracle` alone is given the true latency of each action.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from tether.core.errors import ConfigError
from tether.core.policy import DecisionContext, Observation, Policy, patience_of
from tether.core.traces import Trace
from tether.core.types import LOCAL, Action
from tether.policies.baselines import HindsightOracle
from tether.policies.costmodel import ActionCost, CostModel


@dataclass(frozen=True)
class SimConfig:
    """Workload and network of one simulation run."""

    n_requests: int = 2000
    arrival: str = "poisson"            # "poisson" or "periodic"
    rate_hz: float = 2.0
    seed: int = 0
    rtt_seconds: float = 0.04           # propagation RTT (half each way)
    cloud_queue_seconds: float = 0.0    # constant queue delay the cloud reports
    ping_interval_seconds: float | None = 0.5
    ping_bytes: int = 64
    deadline_seconds: float = 1.0       # per request, as the edge agent's default
    fallback_reserve_seconds: float | None = None  # kept for the local answer; None = local time
    trace_offset_seconds: float = 0.0   # where in the trace t=0 falls
    edge_overhead_seconds: float = 0.0  # the daemon's own edge CPU per request (any action)

    def __post_init__(self) -> None:
        if self.arrival not in ("poisson", "periodic"):
            raise ConfigError(f"arrival {self.arrival!r}: use 'poisson' or 'periodic'")
        if self.n_requests < 1 or not self.rate_hz > 0 or self.rtt_seconds < 0:
            raise ConfigError("n_requests must be >= 1, rate_hz > 0 and rtt_seconds >= 0")
        if not self.deadline_seconds > 0:
            raise ConfigError("deadline_seconds must be > 0")
        if self.edge_overhead_seconds < 0:
            raise ConfigError("edge_overhead_seconds must be >= 0")

    def arrivals(self) -> np.ndarray:
        """Request arrival times (seconds), seeded."""
        if self.arrival == "periodic":
            return np.arange(self.n_requests) / self.rate_hz
        rng = np.random.default_rng(self.seed)
        return np.cumsum(rng.exponential(1.0 / self.rate_hz, self.n_requests))


@dataclass
class RequestOutcome:
    """One simulated request."""

    request_id: int
    arrival: float
    action: str
    outcome: str = "local"          # local | exit | cloud | fallback
    latency: float = math.nan
    accuracy: float = math.nan
    up_bps: float = math.nan        # true uplink capacity at arrival (1 s window)
    send_time: float = math.nan
    done: bool = False


@dataclass
class SimResult:
    """Per-request outcomes of one policy; :meth:`summary` gives the table row."""

    policy: str
    requests: list[RequestOutcome]
    deadline_seconds: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def latencies(self) -> np.ndarray:
        return np.array([r.latency for r in self.requests])

    def summary(self) -> dict[str, float | str]:
        lat = self.latencies
        acc = np.array([r.accuracy for r in self.requests])
        out: dict[str, float | str] = {
            "policy": self.policy, "requests": float(lat.size), "mean_s": float(lat.mean()),
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "p99_s": float(np.percentile(lat, 99)),
            "accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan,
            "fallbacks": float(sum(r.outcome == "fallback" for r in self.requests)),
            "offloaded": float(sum(r.outcome in ("cloud", "fallback") for r in self.requests)),
        }
        if self.deadline_seconds is not None:
            out["deadline_misses"] = float((lat > self.deadline_seconds + 1e-9).sum())
        return out


class _Fifo:
    """A FIFO server; completion times are known at enqueue (jobs arrive in time order)."""

    def __init__(self) -> None:
        self.free_at = 0.0

    def serve(self, t: float, duration: float) -> float:
        start = max(t, self.free_at)
        self.free_at = start + duration
        return self.free_at


class _Link(_Fifo):
    """A FIFO link replaying a trace from ``offset`` seconds."""

    def __init__(self, trace: Trace, offset: float) -> None:
        super().__init__()
        self.trace, self.offset = trace, offset

    def finish_time(self, t: float, nbytes: float, free_at: float | None = None) -> float:
        start = max(t, self.free_at if free_at is None else free_at)
        return start + self.trace.transfer_time(self.offset + start, nbytes)

    def send(self, t: float, nbytes: float) -> float:
        self.free_at = self.finish_time(t, nbytes)
        return self.free_at


class Simulator:
    """Replays one trace and one arrival process through any number of policies."""

    def __init__(self, model: CostModel, uplink: Trace, config: SimConfig | None = None,
                 downlink: Trace | None = None, truth: CostModel | None = None) -> None:
        # ``truth``: the device as it really is (e.g. a throttled edge), when the policies'
        # ``model`` is a profile taken elsewhere; the physics and the oracle use it
        self.model = truth or model
        self.uplink = uplink
        self.downlink = downlink or uplink
        self.cfg = config or SimConfig()
        self.arrival_times = self.cfg.arrivals()
        self.draws = np.random.default_rng(self.cfg.seed + 1).random(self.cfg.n_requests)
        self.local = model.cost(LOCAL)

    # ---- public -----------------------------------------------------------------------
    def run(self, policy: Policy, name: str | None = None) -> SimResult:
        """Simulate every request under ``policy`` (stateful: pass a fresh policy per run)."""
        self._reset(policy)
        while self._heap:
            t, _, kind, data = heapq.heappop(self._heap)
            getattr(self, "_on_" + kind)(t, data)
        return SimResult(name or getattr(policy, "name", "policy"), self._recs,
                         self.cfg.deadline_seconds)

    def hindsight(self, action: Action, ctx: DecisionContext) -> float:
        """True latency of ``action`` for the request arriving now, given the queues now.

        The trace is known; whether an early exit answers is not (that is the data), so an
        exit is priced at its exit rate, like the policies price it.
        """
        cost, t = self.model.cost(action), ctx.now
        cpu_start = max(t, self._cpu.free_at) + self.cfg.edge_overhead_seconds
        local = cpu_start + cost.pre_seconds - t
        if cost.exit_rate >= 1.0:
            return local
        send = cpu_start + cost.pre_seconds + cost.encode_seconds
        give_up = self._give_up_time(t, send)
        remote = self._reply_time(send, cost, free=True) if give_up > send else math.inf
        if remote > give_up:
            remote = max(give_up, send) + self.local.pre_seconds
        remote -= t
        return cost.exit_rate * local + (1.0 - cost.exit_rate) * remote

    # ---- event plumbing -----------------------------------------------------------------
    def _reset(self, policy: Policy) -> None:
        if len(self.draws) < len(self.arrival_times):   # arrival_times replaced by the caller
            self.draws = np.random.default_rng(self.cfg.seed + 1).random(len(self.arrival_times))
        self._policy = policy
        self._cpu = _Fifo()
        self._up = _Link(self.uplink, self.cfg.trace_offset_seconds)
        self._down = _Link(self.downlink, self.cfg.trace_offset_seconds)
        self._heap: list = []
        self._seq = 0
        self._recs: list[RequestOutcome] = []
        self._current = 0
        self._patience: dict[int, float] = {}   # request id -> the policy's patience
        self._late: dict[int, float] = {}       # given up at their patience -> deadline rule
        self._waiting: dict[int, tuple] = {}    # sent, awaited within their patience
        self._racing: dict[int, tuple] = {}     # overdue: local run (start, done) vs reply
        if isinstance(policy, HindsightOracle):
            policy.attach(self.hindsight)
        for i, t in enumerate(self.arrival_times):
            self._push(float(t), "arrive", i)
        if self.cfg.ping_interval_seconds:
            self._push(0.0, "ping", None)

    def _give_up_time(self, arrival: float, send: float) -> float:
        """When the edge stops waiting for the cloud and answers locally (the deadline's rule;
        a policy's patience may end the wait sooner, see :meth:`_on_send`)."""
        reserve = self.cfg.fallback_reserve_seconds
        reserve = self.local.pre_seconds if reserve is None else reserve
        return arrival + self.cfg.deadline_seconds - reserve

    def _push(self, t: float, kind: str, data: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, data))

    def _reply_time(self, send: float, cost: ActionCost, free: bool = False) -> float:
        up_done = self._up.finish_time(send, cost.up_bytes) if free else self._up.send(send, cost.up_bytes)
        at_cloud = up_done + self.cfg.rtt_seconds / 2 + self.cfg.cloud_queue_seconds + cost.cloud_seconds
        if free:
            return self._down.finish_time(at_cloud, cost.down_bytes) + self.cfg.rtt_seconds / 2
        return at_cloud

    # ---- handlers -------------------------------------------------------------------------
    def _on_arrive(self, t: float, i: int) -> None:
        self._current = i
        ctx = DecisionContext(now=t, deadline_seconds=self.cfg.deadline_seconds,
                              cloud_available=True, cloud_queue_seconds=self.cfg.cloud_queue_seconds)
        action = self._policy.decide(ctx)
        patience = patience_of(self._policy, action)
        cost = self.model.cost(action)
        rec = RequestOutcome(i, t, action.key,
                             up_bps=self.uplink.rate_bps_at(self.cfg.trace_offset_seconds + t, 1.0))
        self._recs.append(rec)
        wait = max(0.0, self._cpu.free_at - t)
        overhead = self.cfg.edge_overhead_seconds
        if self.draws[i] < cost.exit_rate:
            done = self._cpu.serve(t, overhead + cost.pre_seconds)
            kind = "local" if action == LOCAL else "exit"
            self._finish(rec, done, kind, cost.accuracy if action == LOCAL else None, cost)
            obs = Observation(now=done, action=action, total_seconds=rec.latency, exited=kind == "exit",
                              edge_seconds=cost.pre_seconds, edge_wait_seconds=wait)
            self._push(done, "observe", obs)
        else:
            if patience is not None:
                self._patience[i] = patience
            work = overhead + cost.pre_seconds + cost.encode_seconds
            self._push(self._cpu.serve(t, work), "send", (rec, cost))

    def _on_send(self, t: float, data: tuple[RequestOutcome, ActionCost]) -> None:
        rec, cost = data
        rec.send_time = t
        patience = self._patience.pop(rec.request_id, None)
        give_up = self._give_up_time(rec.arrival, t)
        if give_up <= t:      # no time left to offload: nothing is sent
            rec.send_time = math.nan
            self._on_timeout(t, data)
            return
        self._push(self._reply_time(t, cost), "cloud_done", data)
        if patience is not None and t + patience < give_up:
            # overdue before the deadline: answered locally then, but the policy still
            # learns at the reply or at the deadline, as if the edge had waited
            self._late[rec.request_id] = give_up
            self._waiting[rec.request_id] = data
            self._push(give_up, "late_timeout", data)
            give_up = t + patience
        self._push(give_up, "timeout", data)

    def _on_cloud_done(self, t: float, data: tuple[RequestOutcome, ActionCost]) -> None:
        self._push(self._down.send(t, data[1].down_bytes) + self.cfg.rtt_seconds / 2, "reply", data)

    def _on_reply(self, t: float, data: tuple[RequestOutcome, ActionCost]) -> None:
        rec, cost = data
        self._waiting.pop(rec.request_id, None)
        awaited = self._late.pop(rec.request_id, None) is not None
        racing = self._racing.pop(rec.request_id, None)
        if racing is not None:   # overdue, but the reply beats the local answer: it is the
            start, done = racing  # answer, and the local run stops: what it had left is freed
            # (work booked later starts that much sooner; work already booked behind it keeps
            # its completion time, a slight pessimism for those requests)
            self._cpu.free_at -= done - max(t, start)
        if rec.done:   # answered by the fallback already; the bytes still used the links
            if awaited:   # given up at its patience: the policy learns as if it had waited
                self._observe(t, rec, cost, t - rec.arrival, ok=True)
            return
        self._finish(rec, t, "cloud", cost.remote_accuracy, cost)
        self._observe(t, rec, cost, rec.latency, ok=True)

    def _on_timeout(self, t: float, data: tuple[RequestOutcome, ActionCost]) -> None:
        rec, cost = data
        overdue = self._waiting.pop(rec.request_id, None) is not None
        if rec.done or rec.request_id in self._racing:
            return
        start = max(t, self._cpu.free_at)
        done = self._cpu.serve(t, self.local.pre_seconds)
        if overdue:   # raced against the reply, as on the edge (see _on_reply)
            self._racing[rec.request_id] = (start, done)
            self._push(done, "race_local", data)
        else:
            self._finish(rec, done, "fallback", self.local.accuracy, cost)
        if rec.request_id not in self._late:   # overdue: observed at its reply or deadline
            self._observe(t, rec, cost, rec.latency, ok=False)
        if overdue:   # FIFO uplink: what was sent after it is overdue too (as on the edge)
            for other in [d for d in self._waiting.values() if d[0].send_time >= rec.send_time]:
                self._on_timeout(t, other)

    def _on_race_local(self, t: float, data: tuple[RequestOutcome, ActionCost]) -> None:
        rec, cost = data
        if self._racing.pop(rec.request_id, None) is not None:   # the local answer won
            self._finish(rec, t, "fallback", self.local.accuracy, cost)

    def _on_late_timeout(self, t: float, data: tuple[RequestOutcome, ActionCost]) -> None:
        rec, cost = data
        if self._late.pop(rec.request_id, None) is not None:
            self._observe(t, rec, cost, t - rec.arrival + self.local.pre_seconds, ok=False)

    def _observe(self, t: float, rec: RequestOutcome, cost: ActionCost, total: float,
                 ok: bool) -> None:
        """The policy's observation of an offload: its reply (``ok``) or its failure at ``t``."""
        action = Action.parse(rec.action)
        if not ok:
            sent = not math.isnan(rec.send_time)
            self._policy.observe(Observation(
                now=t, action=action, bytes_sent=int(cost.up_bytes) if sent else 0,
                network_seconds=t - rec.send_time if sent else 0.0, total_seconds=total, ok=False))
            return
        compute = self.cfg.cloud_queue_seconds + cost.cloud_seconds
        self._policy.observe(Observation(
            now=t, action=action, bytes_sent=int(cost.up_bytes),
            bytes_received=int(cost.down_bytes), network_seconds=t - rec.send_time - compute,
            cloud_queue_seconds=self.cfg.cloud_queue_seconds, total_seconds=total,
            edge_seconds=cost.pre_seconds + cost.encode_seconds, cloud_seconds=cost.cloud_seconds))

    def _on_observe(self, t: float, obs: Observation) -> None:
        self._policy.observe(obs)

    def _on_ping(self, t: float, _: object) -> None:
        at_cloud = self._up.send(t, self.cfg.ping_bytes) + self.cfg.rtt_seconds / 2
        self._push(at_cloud, "pong_out", t)
        if t + self.cfg.ping_interval_seconds <= float(self.arrival_times[-1]):
            self._push(t + float(self.cfg.ping_interval_seconds), "ping", None)

    def _on_pong_out(self, t: float, sent: float) -> None:
        self._push(self._down.send(t, self.cfg.ping_bytes) + self.cfg.rtt_seconds / 2, "pong", sent)

    def _on_pong(self, t: float, sent: float) -> None:
        self._policy.observe(Observation(now=t, rtt_seconds=t - sent))

    def _finish(self, rec: RequestOutcome, t: float, outcome: str, accuracy: float | None,
                cost: ActionCost) -> None:
        rec.done, rec.outcome, rec.latency = True, outcome, t - rec.arrival
        if accuracy is None:   # an exit that answered: the exit head's accuracy
            accuracy = self.model.exit_accuracy(cost.action)
        rec.accuracy = math.nan if accuracy is None else float(accuracy)


class _Scripted:
    """Replays a given list of actions in order (for predicting what a testbed run measured)."""

    name = "replay"

    def __init__(self, actions: Iterable[Action]) -> None:
        self._it = iter(list(actions))

    def decide(self, ctx: DecisionContext) -> Action:
        return next(self._it)

    def observe(self, obs: Observation) -> None:
        return None


def replay(model: CostModel, uplink: Trace, arrivals: Iterable[float], actions: Iterable[Action | str],
           config: SimConfig | None = None, downlink: Trace | None = None) -> list[RequestOutcome]:
    """Predicted outcome of each (arrival time, action) pair: the testbed's predicted column."""
    times = np.asarray(list(arrivals), dtype=np.float64)
    acts = [a if isinstance(a, Action) else Action.parse(a) for a in actions]
    if times.size != len(acts) or times.size == 0 or np.any(np.diff(times) < 0):
        raise ConfigError("replay needs as many sorted arrival times as actions (at least one)")
    cfg = config or SimConfig()
    sim = Simulator(model, uplink, _replace(cfg, n_requests=times.size), downlink)
    sim.arrival_times = times - times[0]
    return sim.run(_Scripted(acts)).requests


def _replace(cfg: SimConfig, **changes: object) -> SimConfig:
    import dataclasses
    return dataclasses.replace(cfg, **changes)
