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
        self._cpu = model.pre + model.remote_frac * model.encode   # edge compute per action

    def decide(self, ctx: DecisionContext) -> Action:
        if self._last_arrival is not None and ctx.now > self._last_arrival:
            self._gap.update(ctx.now - self._last_arrival)
        self._last_arrival = ctx.now
        if not ctx.cloud_available:
            return LOCAL
        if self.cfg.objective == "accuracy":
            choice = self._max_accuracy(ctx)
        else:
            choice = self._min_latency(ctx)
        self._current = choice
        action = self.model.actions[choice]
        self.remember(ctx.now, action)
        return action

    def load_penalty(self) -> np.ndarray:
        """Delay each action's edge compute imposes on the requests arriving behind it.

        A job of ``s`` seconds on the (FIFO) edge processor delays the ``rate * s`` requests
        expected during it by ``s / 2`` on average: ``rate * s**2 / 2`` in all. The greedy
        oracle ignores this; with a slow edge it is what makes "local" costlier than it looks.
        """
        if self._gap.value is None or self.cfg.edge_load_weight == 0:
            return np.zeros_like(self._cpu)
        rate = 1.0 / max(self._gap.value, 1e-3)
        return self.cfg.edge_load_weight * rate * self._cpu ** 2 / 2.0

    def _min_latency(self, ctx: DecisionContext) -> int:
        _, lat = self.argmin(ctx, self.bandwidth(ctx.now))
        lat = lat + self.load_penalty()
        best = int(np.argmin(lat))
        cur = self._current
        if cur is not None and np.isfinite(lat[cur]) and lat[cur] <= lat[best] * (1 + self.cfg.hysteresis):
            best = cur
        if self.model.is_local[best]:
            probe = self.probe(ctx, lat[best])
            if probe is not None:
                return probe
        return best

    def _max_accuracy(self, ctx: DecisionContext) -> int:
        bw_low = min(self.bw.quantile(1.0 - self.cfg.deadline_quantile, ctx.now),
                     self.bandwidth(ctx.now))
        _, lat = self.argmin(ctx, bw_low)
        deadlines = [d for d in (self.cfg.deadline_seconds, ctx.deadline_seconds) if d is not None]
        meets = lat <= min(deadlines, default=np.inf)   # the request's own deadline if tighter
        if not meets.any():
            return int(np.argmin(lat))
        acc = np.where(meets, np.nan_to_num(self.model.accuracy, nan=1.0), -np.inf)
        top = np.flatnonzero(acc >= acc.max() - 1e-12)
        return int(top[np.argmin(lat[top])])
