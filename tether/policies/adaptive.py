"""tether-adaptive: robust throughput estimate + cost model + edge-queue value, per request.

Objective ``latency``: minimise predicted latency subject to the accuracy floor, plus what
the request's edge work costs the requests behind it. The throughput estimate is
RobustMPC's harmonic mean of recent samples (the right plug-in for the expected ``bytes /
bandwidth``; ``estimator = "robust"`` adds its error discount, which measured worse for
mean latency, see docs/benchmarks.md), corrected for the edge's own queueing, capped by
what an offload still in flight proves (outages are seen before any reply), with cold
start and staleness decay. The edge's FIFO is priced by :mod:`tether.policies.queueing`
(the relative value of backlog under the measured arrival rate, re-solved when the prices
move); its work per request is the calibrated compute plus the daemon's own per-request
edge time measured online (edge total - compute - wait, on local answers). A hysteresis
keeps noise from flapping between near-equal actions.

Patience: an offload whose reply is overdue, ``patience_factor x`` its predicted
send-to-reply time after the send, starts its local answer (:meth:`TetherAdaptive.patience`) instead of waiting for the deadline; the
first of the two answers. The edge still awaits the reply (until the deadline) for the
policy, which learns as if it had waited: the offload stays in flight (the bound) until
its reply or its failure.

When it answers locally it gets no throughput samples, so it probes (see
:meth:`EstimatingPolicy.probe`), hedged: the probe's local answer starts at the send
(patience 0), so a probe costs its encode and bytes, not a wait on a link it fears.

Objective ``accuracy``: maximise expected accuracy subject to the deadline being met with
probability ``deadline_quantile``, pricing actions at the matching low quantile of recent
throughput samples; when nothing meets the deadline, the fastest action.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from tether.core.policy import DecisionContext, Observation
from tether.core.types import LOCAL, Action
from tether.policies.baselines import EstimatingPolicy
from tether.policies.config import PolicyConfig
from tether.policies.costmodel import CostModel
from tether.policies.estimators import Ewma, WindowedExtreme
from tether.policies.queueing import BacklogValue


#: How long one quiet request's overhead measurement stands for the daemon's own edge time.
OVERHEAD_WINDOW_SECONDS = 30.0


class TetherAdaptive(EstimatingPolicy):
    """The default policy of the edge agent."""

    name = "adaptive"
    use_inflight_bound = True
    #: Re-solve the backlog's value at most this often (s), and only when its inputs moved.
    resolve_seconds = 1.0
    #: ... by more than this fraction (arrival rate, any action's latency or work).
    resolve_change = 0.05

    def __init__(self, model: CostModel, cfg: PolicyConfig) -> None:
        super().__init__(model, cfg)
        self._current: int | None = None
        self._last_arrival: float | None = None
        self._gap = Ewma(0.05)
        # the daemon's own edge time per request: the windowed minimum of what local answers
        # took beyond compute and compute wait (the minimum: a request that found the daemon
        # idle shows only that; the others add the wait to be decided at all)
        self._overhead = WindowedExtreme(OVERHEAD_WINDOW_SECONDS, use_max=False)
        self._overhead_value = 0.0
        self._local_decisions: deque[float] = deque(maxlen=512)   # when each was decided
        self._upstream = 0.0          # last measured wait before a request reached the policy
        self._upstream_at = -np.inf
        self._edge_free = -np.inf     # when the edge CPU finishes the work already given to it
        self._up_free = -np.inf       # when the uplink finishes the bytes already sent
        self._value = BacklogValue()
        self._solved: tuple[float, float, np.ndarray, np.ndarray] | None = None
        self._local = int(model.index(LOCAL))
        self._work_key: tuple | None = None
        self._work = model.pre
        self._masked_for: np.ndarray | None = None
        self._masked_fixed = model.pre
        self._lat: np.ndarray = model.pre   # last decision's predictions (+ link waits)
        self._predicted: tuple[int, float, float] | None = None
        self._hedged = False                # the last decision is a probe, raced from the send

    def decide(self, ctx: DecisionContext) -> Action:
        now = ctx.now
        if self._last_arrival is not None and now > self._last_arrival:
            self._gap.update(now - self._last_arrival)
        self._last_arrival = now
        bw = self.bandwidth(now)
        work = self.work(now, ctx.cloud_queue_seconds)
        self._predicted = None
        self._hedged = False
        if not ctx.cloud_available:
            choice = self._local
        elif self.cfg.objective == "accuracy":
            choice = self._max_accuracy(ctx, work)
        else:
            choice = self._min_latency(ctx, bw, work)
        if choice != self._local:
            self._predicted = (choice, now, float(self._lat[choice]))
        self._current = choice
        action = self.model.actions[choice]
        send = self._book(now, choice, work, bw)
        if self._hedged:    # its local answer starts at the send: the edge's work too
            self._edge_free = max(self._edge_free, send) + float(work[self._local])
        self.remember(now, action, send)
        if choice == self._local:
            self._local_decisions.append(now)
        return action

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.action != LOCAL or obs.exited or not obs.ok:
            return
        decided = self._local_decisions.popleft() if self._local_decisions else None
        if decided is not None:
            # received at now - total, decided at `decided`: the time it waited before the
            # policy even saw it (a daemon saturated upstream of the compute queue)
            self._upstream = max(0.0, decided - (obs.now - obs.total_seconds))
            self._upstream_at = obs.now
        if obs.edge_seconds is not None and obs.edge_wait_seconds is not None:
            rest = obs.total_seconds - obs.edge_seconds - obs.edge_wait_seconds - self._upstream
            self._overhead_value = float(self._overhead.update(obs.now, max(rest, 0.0)))

    def patience(self, action: Action) -> float | None:
        """Seconds after the send to wait for the reply to the last decided ``action``
        before starting its local answer: ``patience_factor x`` its predicted send-to-reply
        time. The local answer races the reply (a reply that comes first still answers and
        stops it), so giving up costs only the edge CPU the local run uses until then: no
        floor at the local answer's cost (that floor, from when a given-up reply was lost,
        measured 5-9 ms worse on the demo's process; see docs/benchmarks.md). A probe: 0.
        None for a local or exit-only action, another action than the last decided, or
        ``patience_factor = 0`` (wait until the deadline)."""
        pred, factor = self._predicted, self.cfg.patience_factor
        if pred is None or factor <= 0 or self.model.actions[pred[0]] != action:
            return None
        if self._hedged:     # a probe: answered as a local decision would be, the link
            return 0.0       # measured for free (a reply that comes first answers)
        choice, when, lat = pred
        frac = float(self.model.remote_frac[choice])
        if self.model.is_local[choice] or frac <= 0:
            return None
        edge = float(np.broadcast_to(self.factors(when)[0], self.model.pre.shape)[choice])
        pre, encode = self.model.pre[choice] * edge, self.model.encode[choice] * edge
        # expected = pre + frac * (encode + remote): an exit's remote part if not confident
        remote = (lat - pre) / frac - encode
        value = factor * remote
        return value if math.isfinite(value) else None

    # ---- the edge's and the link's own queues --------------------------------------------
    def work(self, now: float, queue: float = 0.0) -> np.ndarray:
        """Edge CPU every action adds: calibrated compute plus the measured per-request
        overhead of the daemon and the policy (``queue``: the cloud queue of the terms key)."""
        terms, overhead = self.terms(now, queue), self._overhead_value
        if self._work_key is None or self._work_key[0] is not terms or self._work_key[1] != overhead:
            self._work_key, self._work = (terms, overhead), terms[2] + overhead
        return self._work

    def _book(self, now: float, choice: int, work: np.ndarray, bw: float) -> float:
        """Account the chosen action's edge compute and uplink bytes (predicted); returns
        when its bytes are sent (after the work already queued on the edge)."""
        start = max(now, self._edge_free)
        cpu = float(work[choice])
        self._edge_free = start + cpu
        if not self.model.is_local[choice]:
            frac = float(self.model.remote_frac[choice])
            self._up_free = max(start + cpu, self._up_free) + \
                frac * float(self.model.up[choice]) * 8.0 / max(bw, 1.0)
        return start + cpu

    def link_waits(self, now: float, work: np.ndarray) -> np.ndarray | float:
        """Wait of every action's bytes behind the bytes this edge already sent."""
        send = max(now, self._edge_free)
        if self._up_free <= send:
            return 0.0                     # the uplink is idle when anything could be sent
        return np.maximum(0.0, self._up_free - send - work) * self.model.remote_frac

    def backlog_cost(self, now: float, lat: np.ndarray, work: np.ndarray) -> np.ndarray:
        """What each action's edge work costs the requests behind it (:mod:`queueing`),
        the backlog value re-solved when the arrival rate or the prices moved."""
        if self._gap.value is None or self.cfg.edge_load_weight == 0:
            return np.zeros(len(lat))
        rate = 1.0 / max(self._gap.value, 1e-3)
        if self._stale(now, rate, lat, work):
            self._value.solve(rate, lat, work)         # lat: +inf below the accuracy floor
            self._solved = (now, rate, lat.copy(), work.copy())
        # the booked FIFO, plus the wait upstream of the policy last measured (it drains
        # at the edge's speed; what is still queued there will all wait behind this work)
        upstream = max(0.0, self._upstream - (now - self._upstream_at))
        backlog = max(0.0, self._edge_free - now) + upstream
        return self.cfg.edge_load_weight * self._value.cost(backlog, work)

    def _stale(self, now: float, rate: float, lat: np.ndarray, work: np.ndarray) -> bool:
        if self._solved is None:
            return True
        when, r, old_lat, old_work = self._solved
        if now - when < self.resolve_seconds:
            return False
        tol = self.resolve_change
        with np.errstate(invalid="ignore"):
            moved = np.abs(lat - old_lat) > tol * np.abs(old_lat)
        return abs(rate - r) > tol * r or bool(moved.any()) or \
            bool((np.abs(work - old_work) > tol * old_work).any())

    # ---- objectives ------------------------------------------------------------------------
    def _min_latency(self, ctx: DecisionContext, bw: float, work: np.ndarray) -> int:
        now = ctx.now
        fixed, bits, _ = self.terms(now, ctx.cloud_queue_seconds)
        lat = self._masked(fixed) + bits / max(bw, 1.0)
        waits = self.link_waits(now, work)
        self._lat = lat + waits
        extra = waits + self.backlog_cost(now, lat, work)
        score = lat + extra
        best = int(np.argmin(score))
        cur = self._current
        if cur is not None and score[cur] <= score[best] + self.cfg.hysteresis * lat[best]:
            best = cur
        if self.model.is_local[best]:
            probe = self.probe(ctx, float(score[best]), extra,
                               backlog=max(0.0, self._edge_free - now))
            if probe is not None:
                self._hedged = True
                return probe
        else:
            self.chose_remote()
        return best

    def _masked(self, fixed: np.ndarray) -> np.ndarray:
        """``fixed`` with the actions below the accuracy floor at +inf (cached per array)."""
        if self._masked_for is not fixed:
            self._masked_for, self._masked_fixed = fixed, np.where(self.mask, fixed, np.inf)
        return self._masked_fixed

    def _max_accuracy(self, ctx: DecisionContext, work: np.ndarray) -> int:
        bw_low = min(self.bw.quantile(1.0 - self.cfg.deadline_quantile, ctx.now),
                     self.bandwidth(ctx.now))
        _, lat = self.argmin(ctx, bw_low)
        self._lat = lat + self.link_waits(ctx.now, work)
        lat = self._lat + max(0.0, self._edge_free - ctx.now)
        deadlines = [d for d in (self.cfg.deadline_seconds, ctx.deadline_seconds) if d is not None]
        meets = lat <= min(deadlines, default=np.inf)   # the request's own deadline if tighter
        if not meets.any():
            return int(np.argmin(lat))
        acc = np.where(meets, np.nan_to_num(self.model.accuracy, nan=1.0), -np.inf)
        top = np.flatnonzero(acc >= acc.max() - 1e-12)
        return int(top[np.argmin(lat[top])])


class CausalReference(TetherAdaptive):
    """tether-adaptive with a perfect causal estimator: the true uplink capacity over the
    past ``window`` seconds of the trace (evaluation only: the simulator attaches the trace).

    Its regret against the planned oracle is what prediction cannot remove (the future is
    unknown); adaptive's regret against it is what estimation and the policy lose.
    """

    name = "causal"
    window = 1.0

    def __init__(self, model: CostModel, cfg: PolicyConfig) -> None:
        super().__init__(model, cfg)
        self._trace = None
        self._offset = 0.0

    def attach_trace(self, trace, offset: float = 0.0) -> None:   # noqa: ANN001 - core Trace
        self._trace, self._offset = trace, offset

    def bandwidth(self, now: float) -> float:
        if self._trace is None:
            return super().bandwidth(now)
        t = self._offset + now
        return max(self._trace.bytes_between(max(0.0, t - self.window), t) * 8.0
                   / min(self.window, max(t, 1e-3)), 1.0)

    def probe(self, ctx: DecisionContext, local_latency: float,
              extra: np.ndarray | float = 0.0, backlog: float = 0.0) -> int | None:
        return None    # it knows the link without probing

    def patience(self, action: Action) -> float | None:
        # None: without the in-flight bound nothing keeps it from offloading again into a
        # stalled link, and each give-up adds a local answer to the edge's queue (measured:
        # bench/policy_sim.py mean/oracle median 1.125 -> 1.146, spirals on overloaded edges)
        return None
