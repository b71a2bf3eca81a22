"""Online self-calibration of the profiled compute times (edge and cloud), per action.

A bundle is profiled once, often on a faster machine than the edge that runs it (a
0.1-core quota makes the edge 16-18x slower than its profile). The edge measures its own
compute per request (head/exit + encode, or the whole model) and the cloud reports its
decode + tail; :class:`Calibrator` turns those into multiplicative factors on the profile:

- per action, an EWMA of ``log(measured / profiled)`` (log: a ratio, symmetric in speed-up
  and slow-down), robust to outliers (each innovation clipped to ``+-clip`` once the action
  has a few samples; a GC pause or a preempted quantum moves it by at most ``e**clip``);
- one shared factor per side (edge, cloud), the same EWMA over all actions, used for
  actions not measured yet: one measured action prices every unseen action of that side,
  so a slow edge is known after the first request;
- decay: an action's own factor relaxes toward the shared one with half-life
  ``halflife_seconds`` since its last sample (old measurements of a rarely used action
  lose weight to the current device speed).
"""

from __future__ import annotations

import math

import numpy as np

from tether.core.policy import Observation
from tether.policies.costmodel import CostModel

#: A single sample moves a settled estimate by at most e**CLIP (about 2x).
CLIP = 0.7
#: Samples before an action's innovations are clipped (the first ones set the level).
WARMUP = 2


class _LogEwma:
    """EWMAs of log-ratios: one per action plus a shared one, with counts and times."""

    def __init__(self, n: int, alpha: float) -> None:
        self.alpha = alpha
        self.value = np.zeros(n)
        self.count = np.zeros(n, dtype=np.int64)
        self.when = np.full(n, -np.inf)
        self.shared = 0.0
        self.shared_count = 0

    def update(self, i: int, log_ratio: float, now: float) -> None:
        self.value[i] = self._step(float(self.value[i]), int(self.count[i]), log_ratio)
        self.count[i] += 1
        self.when[i] = now
        self.shared = self._step(self.shared, self.shared_count, log_ratio)
        self.shared_count += 1

    def _step(self, value: float, count: int, x: float) -> float:
        if count == 0:
            return x
        if count >= WARMUP:
            x = value + min(max(x - value, -CLIP), CLIP)
        alpha = max(self.alpha, 1.0 / (count + 1))   # the first samples average plainly
        return value + alpha * (x - value)

    def factors(self, now: float, halflife: float) -> np.ndarray:
        seen = self.count > 0
        weight = np.where(seen, 0.5 ** (np.maximum(now - self.when, 0.0) / halflife), 0.0)
        return np.exp(weight * self.value + (1.0 - weight) * self.shared)


class Calibrator:
    """Per-action correction factors of a :class:`CostModel`'s edge and cloud compute."""

    def __init__(self, model: CostModel, alpha: float = 0.2, halflife_seconds: float = 120.0,
                 min_seconds: float = 1e-4) -> None:
        self.model = model
        self.halflife = halflife_seconds
        self.min_seconds = min_seconds
        n = len(model.actions)
        self._edge = _LogEwma(n, alpha)
        self._cloud = _LogEwma(n, alpha)
        self.version = 0      # bumped by every sample: cached prices depending on it expire

    def observe(self, obs: Observation) -> None:
        """Feed one finished request's measured compute (ignored when not measured)."""
        if obs.action is None or obs.action.key not in self.model._index:
            return
        i = self.model.index(obs.action)
        if obs.edge_seconds is not None:
            profiled = self.model.pre[i] + (0.0 if obs.exited or self.model.is_local[i]
                                            else self.model.encode[i])
            self._add(self._edge, i, obs.edge_seconds, profiled, obs.now)
        if obs.cloud_seconds is not None:
            self._add(self._cloud, i, obs.cloud_seconds, self.model.cloud[i], obs.now)

    def _add(self, ewma: _LogEwma, i: int, measured: float, profiled: float, now: float) -> None:
        if profiled < self.min_seconds or not measured > 0 or not math.isfinite(measured):
            return   # too small to measure against timer noise (e.g. offload without encode)
        ewma.update(i, math.log(measured / profiled), now)
        self.version += 1

    def edge_factors(self, now: float) -> np.ndarray:
        return self._edge.factors(now, self.halflife)

    def cloud_factors(self, now: float) -> np.ndarray:
        return self._cloud.factors(now, self.halflife)

    @property
    def edge_speed(self) -> float:
        """The shared edge factor: measured / profiled compute (1.0 before any sample)."""
        return math.exp(self._edge.shared)

    @property
    def samples(self) -> int:
        return self._edge.shared_count
