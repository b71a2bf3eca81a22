"""A contextual bandit (disjoint LinUCB, Li et al. 2010) over actions, needing no profile.

Context features ``[1, 1/bandwidth (s per Mbit), RTT, cloud queue]``: the latency of every
action is (nearly) linear in them, so each arm's ridge regression learns its own cost
model online from rewards ``-latency``. Only the cost table's list of actions (and their
accuracies, to honour the floor) is used, never its timings.
"""

from __future__ import annotations

import numpy as np

from tether.core.policy import DecisionContext, Observation
from tether.core.types import LOCAL, Action
from tether.policies.baselines import EstimatingPolicy
from tether.policies.config import PolicyConfig
from tether.policies.costmodel import CostModel

MAX_INV_MBPS = 50.0   # clip 1/bandwidth features (outages) to keep the regression sane


class LinUcbPolicy(EstimatingPolicy):
    """LinUCB with one ridge regression per allowed action."""

    name = "bandit"

    def __init__(self, model: CostModel, cfg: PolicyConfig) -> None:
        super().__init__(model, cfg, estimator="ewma")
        self.arms = [i for i, ok in enumerate(self.mask) if ok]
        d = 4
        self.a_inv = np.stack([np.eye(d) / cfg.bandit_ridge for _ in self.arms])
        self.b = np.zeros((len(self.arms), d))
        self._pending: list[tuple[str, int, np.ndarray]] = []
        self.rng = np.random.default_rng(cfg.seed)
        self.remote_arm = np.array([not model.is_local[i] for i in self.arms])
        self._last_probe = -np.inf

    def _needs_probe(self, now: float) -> bool:
        """No throughput sample for ``probe_interval_seconds``: the context is stale, so
        the next decision explores a remote arm (at most once per interval)."""
        if not self.remote_arm.any():
            return False
        last = self.bw.last_time if self.bw.last_time is not None else -np.inf
        wait = self.cfg.probe_interval_seconds
        if wait <= 0:
            return False
        return now - last > wait and now - self._last_probe > wait

    def features(self, ctx: DecisionContext) -> np.ndarray:
        """Context of a decision. Bandwidth is the last EWMA value without staleness decay:
        decaying toward the prior while the bandit answers locally would move the context
        into a region where offloading looks bad, and it would never try again."""
        raw = self.bw.raw(ctx.now)
        mbps = (raw if raw is not None else self.cfg.prior_bandwidth_bps) / 1e6
        return np.array([1.0, min(1.0 / max(mbps, 1e-6), MAX_INV_MBPS),
                         self.rtt.propagation(ctx.now), ctx.cloud_queue_seconds])

    def decide(self, ctx: DecisionContext) -> Action:
        if not ctx.cloud_available:
            return LOCAL
        x = self.features(ctx)
        theta = np.einsum("aij,aj->ai", self.a_inv, self.b)
        width = np.sqrt(np.einsum("i,aij,j->a", x, self.a_inv, x))
        ucb = theta @ x + self.cfg.bandit_alpha * width
        if self._needs_probe(ctx.now):   # refresh the context with the best-known remote arm
            ucb = np.where(self.remote_arm, theta @ x, -np.inf)
            self._last_probe = ctx.now
        top = np.flatnonzero(ucb >= ucb.max() - 1e-12)
        arm = int(top[self.rng.integers(top.size)]) if top.size > 1 else int(top[0])
        action = self.model.actions[self.arms[arm]]
        self._pending.append((action.key, arm, x))
        del self._pending[:-64]
        return action

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.action is None:
            return
        for k, (key, arm, x) in enumerate(self._pending):
            if key == obs.action.key:
                del self._pending[k]
                self._learn(arm, x, -obs.total_seconds)
                return

    def _learn(self, arm: int, x: np.ndarray, reward: float) -> None:
        a_inv = self.a_inv[arm]
        ax = a_inv @ x
        self.a_inv[arm] = a_inv - np.outer(ax, ax) / (1.0 + x @ ax)   # Sherman-Morrison
        self.b[arm] += reward * x
