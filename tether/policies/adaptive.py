"""tether-adaptive: robust throughput estimate + cost model, per-request choice.

Objective ``latency``: minimise predicted latency subject to the accuracy floor. The
throughput estimate is RobustMPC's harmonic mean of recent samples (the right plug-in for
the expected ``bytes / bandwidth``; ``estimator = "robust"`` adds its error discount, which
measured worse for mean latency, see docs/benchmarks.md), corrected for the edge's
own queueing, capped by what an offload still in flight proves (outages are seen before
any reply), with cold start and staleness decay, and a hysteresis so noise does not flap
between near-equal actions.

When it answers locally it gets no throughput samples, so it probes: one remote request
per ``probe_interval_seconds`` of silence when that could win at the best bandwidth seen
recently (see :meth:`EstimatingPolicy.probe`).

Objective ``accuracy``: maximise expected accuracy subject to the deadline being met with
probability ``deadline_quantile``, pricing actions at the matching low quantile of recent
throughput samples; when nothing meets the deadline, the fastest action.
"""

from __future__ import annotations

import numpy as np

from tether.core.policy import DecisionContext
from tether.core.types import LOCAL, Action
from tether.policies.baselines import EstimatingPolicy
from tether.policies.config import PolicyConfig
from tether.policies.costmodel import CostModel
from tether.policies.estimators import Ewma


class TetherAdaptive(EstimatingPolicy):
    """The default policy of the edge agent."""

    name = "adaptive"
    use_inflight_bound = True

    def __init__(self, model: CostModel, cfg: PolicyConfig) -> None:
        super().__init__(model, cfg)
        self._current: int | None = None
        self._last_arrival: float | None = None
        self._gap = Ewma(0.05)
        self._load = Ewma(0.05)       # edge utilisation: booked compute per inter-arrival gap
        self._edge_free = -np.inf     # when the edge CPU finishes the work already given to it
        self._up_free = -np.inf       # when the uplink finishes the bytes already sent

    def decide(self, ctx: DecisionContext) -> Action:
        if self._last_arrival is not None and ctx.now > self._last_arrival:
            self._gap.update(ctx.now - self._last_arrival)
        self._last_arrival = ctx.now
        if not ctx.cloud_available:
            choice = int(self.model.index(LOCAL))
        elif self.cfg.objective == "accuracy":
            choice = self._max_accuracy(ctx)
        else:
            choice = self._min_latency(ctx)
        self._current = choice
        action = self.model.actions[choice]
        self._book(ctx.now, choice)
        self.remember(ctx.now, action)
        return action

    # ---- the edge's and the link's own queues --------------------------------------------
    def _edge_cpu(self, now: float) -> np.ndarray:
        """Calibrated edge compute of every action (head/exit, plus encode if remote)."""
        edge, _ = self.factors(now)
        return (self.model.pre + self.model.remote_frac * self.model.encode) * edge

    def _book(self, now: float, choice: int) -> None:
        """Account the chosen action's edge compute and uplink bytes (predicted)."""
        start = max(now, self._edge_free)
        cpu = float(self._edge_cpu(now)[choice])
        if self._gap.value is not None:
            self._load.update(cpu / max(self._gap.value, 1e-6))
        self._edge_free = start + cpu
        if not self.model.is_local[choice]:
            send = start + cpu
            bw = max(self.bandwidth(now), 1.0)
            frac = float(self.model.remote_frac[choice])
            self._up_free = max(send, self._up_free) + frac * self.model.up[choice] * 8.0 / bw

    def waits(self, now: float) -> np.ndarray:
        """Predicted wait of every action behind the work this edge already queued."""
        # every action, even a raw offload, passes the edge's one compute queue
        wait = np.full(len(self.model.actions), max(0.0, self._edge_free - now))
        send = now + wait + self._edge_cpu(now)
        link_wait = np.maximum(0.0, self._up_free - send) * self.model.remote_frac
        return wait + link_wait

    def load_penalty(self, now: float) -> np.ndarray:
        """Delay each action's edge compute imposes on the requests arriving behind it.

        ``s`` seconds added to the (FIFO) edge processor delay every request that arrives
        before its queue next empties by ``s``. With ``W`` seconds of work already queued
        and load ``rho``, that busy period lasts about ``(W + s) / (1 - rho)``, so about
        ``rate * (W + s) / (1 - rho)`` requests pay ``s`` each. This is what makes "local"
        costlier than it looks on a loaded edge, and what the greedy oracle ignores.
        """
        if self._gap.value is None or self.cfg.edge_load_weight == 0:
            return np.zeros(len(self.model.actions))
        rate = 1.0 / max(self._gap.value, 1e-3)
        rho = min(self._load.value or 0.0, 0.9)
        cpu = self._edge_cpu(now)
        backlog = max(0.0, self._edge_free - now)
        return self.cfg.edge_load_weight * cpu * rate * (backlog + cpu) / (1.0 - rho)

    # ---- objectives ------------------------------------------------------------------------
    def _min_latency(self, ctx: DecisionContext) -> int:
        _, lat = self.argmin(ctx, self.bandwidth(ctx.now))
        extra = self.waits(ctx.now) + self.load_penalty(ctx.now)
        lat = lat + extra
        best = int(np.argmin(lat))
        cur = self._current
        if cur is not None and np.isfinite(lat[cur]) and lat[cur] <= lat[best] * (1 + self.cfg.hysteresis):
            best = cur
        if self.model.is_local[best]:
            probe = self.probe(ctx, lat[best], extra)
            if probe is not None:
                return probe
        return best

    def _max_accuracy(self, ctx: DecisionContext) -> int:
        bw_low = min(self.bw.quantile(1.0 - self.cfg.deadline_quantile, ctx.now),
                     self.bandwidth(ctx.now))
        _, lat = self.argmin(ctx, bw_low)
        lat = lat + self.waits(ctx.now)
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
              extra: np.ndarray | float = 0.0) -> int | None:
        return None    # it knows the link without probing
