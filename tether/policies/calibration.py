"""Online self-calibration of the profiled compute times (edge and cloud), per action.

A bundle is profiled once, often on a faster machine than the edge that runs it (a
0.1-core quota makes the edge 16-18x slower than its profile). The edge measures its own
compute per request (head/exit + encode, or the whole model) and the cloud reports its
decode + tail; :class:`Calibrator` turns those into multiplicative factors on the profile:

- per action, the mean ``measured / profiled`` of its last samples (``2 / alpha - 1`` of
  them, an EWMA's span), the largest counted as the second largest once there are three:
  the mean, not a geometric mean, because under a CPU quota a small job's wall time is
  bimodal (its CPU fits what is left of the period or waits for the next one; the demo's
  edge encodes in 2 or 50 ms in turn) and latency is the mean of both; one outlier (a GC
  pause, a preempted quantum) moves it no further than the next largest sample;
- one shared factor per side (edge, cloud), over the last samples of all actions, weighted
  by their profiled time (total measured over total profiled: the whole model's runs weigh
  more than a 0.3 ms encode), used for actions not measured yet: one measured action prices
  every unseen action of that side, so a slow edge is known after the first request;
- once the shared factor rests on a few samples, a sample counts at most ``CLAMP`` times it:
  a job much shorter than a CPU quota's period is measured as its CPU plus whatever stall
  it met (an encode profiled at 0.3 ms took 1 ms, 20 ms or, behind a burst, 470 ms on the
  demo's 0.055-core edge), and one such stall must not price that codec out for a window
  (it pushed the demo's adaptive to a raw fp32 tensor of 49 KB instead of a 2.6 KB JPEG);
- decay: an action's own factor relaxes toward the shared one with half-life
  ``halflife_seconds`` since its last sample (old measurements of a rarely used action
  lose weight to the current device speed).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from tether.core.policy import Observation
from tether.policies.costmodel import CostModel

#: Samples from which the largest of a window counts as the second largest.
TRIM_FROM = 3
#: A sample's ratio counts at most this many times the shared factor (once the shared factor
#: rests on ``TRIM_FROM`` samples).
CLAMP = 4.0


class _RatioWindows:
    """The last ``span`` measured/profiled ratios per action, the last ``span`` (measured,
    profiled) pairs over all actions, with counts, times and each window's factor (updated
    per sample: two rows change)."""

    def __init__(self, n: int, alpha: float) -> None:
        self.span = max(1, int(round(2.0 / alpha - 1.0)))
        self.samples = [deque(maxlen=self.span) for _ in range(n)]
        self.shared: deque[tuple[float, float]] = deque(maxlen=self.span)
        self.count = np.zeros(n + 1, dtype=np.int64)        # row n: shared
        self.when = np.full(n, -np.inf)
        self.mean = np.ones(n + 1)                          # 1.0 for a row without samples

    def update(self, i: int, measured: float, profiled: float, now: float) -> None:
        if self.count[-1] >= TRIM_FROM:
            measured = min(measured, CLAMP * float(self.mean[-1]) * profiled)
        window = self.samples[i]
        window.append(measured / profiled)
        self.mean[i] = _window_mean(window)
        self.shared.append((measured, profiled))
        self.mean[-1] = sum(m for m, _ in self.shared) / sum(p for _, p in self.shared)
        self.count[i] += 1
        self.count[-1] += 1
        self.when[i] = now

    @property
    def shared_count(self) -> int:
        return int(self.count[-1])

    def factors(self, now: float, halflife: float) -> np.ndarray:
        """Per action, its own mean blended (geometrically) into the shared one as its
        last sample ages."""
        own, shared = self.mean[:-1], self.mean[-1]
        seen = self.count[:-1] > 0
        weight = np.where(seen, 0.5 ** (np.maximum(now - self.when, 0.0) / halflife), 0.0)
        return np.exp(weight * np.log(own) + (1.0 - weight) * math.log(shared))


def _window_mean(window: deque[float]) -> float:
    """The mean of ``window`` with its largest sample counted as the second largest (once
    it holds ``TRIM_FROM``)."""
    if len(window) < TRIM_FROM:
        return sum(window) / len(window)
    second, top = sorted(window)[-2:]
    return (sum(window) - top + second) / len(window)


class Calibrator:
    """Per-action correction factors of a :class:`CostModel`'s edge and cloud compute."""

    def __init__(self, model: CostModel, alpha: float = 0.2, halflife_seconds: float = 120.0,
                 min_seconds: float = 1e-4) -> None:
        self.model = model
        self.halflife = halflife_seconds
        self.min_seconds = min_seconds
        n = len(model.actions)
        self._edge = _RatioWindows(n, alpha)
        self._cloud = _RatioWindows(n, alpha)
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

    def _add(self, windows: _RatioWindows, i: int, measured: float, profiled: float,
             now: float) -> None:
        if profiled < self.min_seconds or not measured > 0 or not math.isfinite(measured):
            return   # too small to measure against timer noise (e.g. offload without encode)
        windows.update(i, measured, profiled, now)
        self.version += 1

    def edge_factors(self, now: float) -> np.ndarray:
        return self._edge.factors(now, self.halflife)

    def cloud_factors(self, now: float) -> np.ndarray:
        return self._cloud.factors(now, self.halflife)

    @property
    def edge_speed(self) -> float:
        """The shared edge factor: measured / profiled compute (1.0 before any sample)."""
        return float(self._edge.mean[-1])

    @property
    def samples(self) -> int:
        return self._edge.shared_count
