"""Online bandwidth and RTT estimators (pure, no IO, no clock of their own).

Primitives: :class:`Ewma`, :class:`RobustHarmonic` (RobustMPC: harmonic mean of the last
k samples divided by ``1 + max`` recent relative prediction error), :class:`WindowedExtreme`
(BBR-style windowed max or min over time). :class:`BandwidthEstimator` turns the edge's
:class:`~tether.core.policy.Observation` stream into a throughput estimate with a cold-start
prior and decay of stale estimates toward that prior; :class:`RttEstimator` keeps the
windowed-min (propagation) and smoothed RTT.
"""

from __future__ import annotations

import math
from collections import deque

from tether.core.policy import Observation
from tether.policies.config import PolicyConfig

#: Shortest transfer time a throughput sample may claim (guards tiny payloads).
MIN_TRANSFER_SECONDS = 0.001
#: Cap on RobustMPC's relative error: the discount at most halves the estimate. Small
#: payloads give noisy samples (errors of 10x are common), which would otherwise pin the
#: estimate near zero.
MAX_RELATIVE_ERROR = 1.0


#: A sample this many times the harmonic mean starts a new window (the link recovered from
#: a fade, whose slow samples would otherwise hold the mean down for ``window`` more)...
RECOVERY_JUMP = 4.0
#: ... when it comes at least this long after the previous sample (back-to-back samples
#: scatter by 10x on small payloads: noise, not a new regime).
RECOVERY_GAP_SECONDS = 0.5


class Ewma:
    """Exponentially weighted moving average; ``value`` is None before the first sample."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value
        return self.value


class RobustHarmonic:
    """Harmonic mean of the last ``k`` samples; with ``discount``, divided by 1 + max error.

    The error of each prediction is ``|predicted - actual| / actual`` (RobustMPC).
    """

    def __init__(self, k: int = 5, discount: bool = True) -> None:
        self.samples: deque[float] = deque(maxlen=k)
        self.errors: deque[float] = deque(maxlen=k)
        self.discount = discount
        self._mean: float | None = None     # cached: read on every decision, moved per sample

    @property
    def mean(self) -> float | None:
        return self._mean

    @property
    def value(self) -> float | None:
        hm = self.mean
        if hm is None or not self.discount:
            return hm
        return hm / (1.0 + max(self.errors, default=0.0))

    def clear(self) -> None:
        self.samples.clear()
        self.errors.clear()
        self._mean = None

    def update(self, x: float) -> float:
        predicted = self.mean
        if predicted is not None:
            self.errors.append(min(abs(predicted - x) / max(x, 1e-9), MAX_RELATIVE_ERROR))
        self.samples.append(x)
        self._mean = len(self.samples) / sum(1.0 / max(s, 1e-9) for s in self.samples)
        return self.value  # type: ignore[return-value]


class WindowedExtreme:
    """Max (or min) of the samples of the last ``window_s`` seconds, BBR style."""

    def __init__(self, window_s: float, use_max: bool = True) -> None:
        self.window_s = window_s
        self.sign = 1.0 if use_max else -1.0
        self._q: deque[tuple[float, float]] = deque()   # monotone deque of (t, signed value)

    def update(self, now: float, x: float) -> float:
        v = self.sign * x
        while self._q and self._q[-1][1] <= v:
            self._q.pop()
        self._q.append((now, v))
        return self.value_at(now)  # type: ignore[return-value]

    def value_at(self, now: float) -> float | None:
        while self._q and self._q[0][0] < now - self.window_s:
            self._q.popleft()
        return self.sign * self._q[0][1] if self._q else None


#: PING round trips whose median is the typical round trip (heartbeats: about 4.5 s).
TYPICAL_RTT_SAMPLES = 9


class RttEstimator:
    """RTT samples from PING/PONG: windowed min (propagation), smoothed RTT, and the typical
    round trip (median of the last pings), which holds the edge's own delays as well."""

    def __init__(self, cfg: PolicyConfig) -> None:
        self.prior = cfg.prior_rtt_seconds
        self.min = WindowedExtreme(cfg.window_seconds, use_max=False)
        self.smoothed = Ewma(0.125)
        self.recent: deque[float] = deque(maxlen=TYPICAL_RTT_SAMPLES)
        self._median: float | None = None        # of ``recent``, once it holds three
        self._last_min = cfg.prior_rtt_seconds

    def update(self, now: float, rtt: float, typical: bool = True) -> None:
        """``typical``: False for a ping that may have queued behind the edge's own upload
        (its delay is the link's, priced by the bytes; it would count twice)."""
        if rtt > 0 and math.isfinite(rtt):
            self._last_min = self.min.update(now, rtt)
            self.smoothed.update(rtt)
            if typical:
                self.recent.append(rtt)
                if len(self.recent) >= 3:
                    self._median = sorted(self.recent)[len(self.recent) // 2]

    def typical(self, now: float) -> float:
        """The median of the last pings' round trips (at least the propagation): what every
        message pays besides its bytes. A throttled edge that is computing delays its own
        sends and receives by a quota period or more (measured at 0.09 core with a busy
        compute thread: 19-23 ms mean on the way out, ~30 ms back; 1.2 ms idle), the same
        for any payload, so it belongs here and not in a throughput sample, where it would
        price bytes as slower than the link is (one size's payloads then look cheapest)."""
        base = self.propagation(now)
        return base if self._median is None else max(base, self._median)

    def propagation(self, now: float) -> float:
        """Windowed-min RTT; after the window empties, the last minimum seen (or the prior)."""
        value = self.min.value_at(now)
        if value is not None:
            self._last_min = value
        return self._last_min


class BandwidthEstimator:
    """Uplink throughput (bit/s) from the edge's own transfers, with prior and staleness decay."""

    def __init__(self, cfg: PolicyConfig, kind: str | None = None) -> None:
        self.kind = kind or cfg.estimator
        self.prior = cfg.prior_bandwidth_bps
        self.stale_after = cfg.stale_after_seconds
        self.halflife = cfg.stale_halflife_seconds
        self.ewma = Ewma(cfg.ewma_alpha)
        self.harmonic = RobustHarmonic(cfg.window, discount=self.kind == "robust")
        self.wmax = WindowedExtreme(cfg.window_seconds, use_max=True)
        self.peak = WindowedExtreme(cfg.peak_memory_seconds, use_max=True)
        self.last: float | None = None
        self.last_time: float | None = None
        self.samples: deque[float] = deque(maxlen=max(cfg.window * 4, 8))

    def add_sample(self, now: float, bps: float) -> None:
        if not (bps > 0 and math.isfinite(bps)):
            return
        mean = self.harmonic.mean
        gap = math.inf if self.last_time is None else now - self.last_time
        if gap > self.stale_after or \
                mean is not None and bps > RECOVERY_JUMP * mean and gap >= RECOVERY_GAP_SECONDS:
            # samples older than the staleness horizon say little; nor do those of a fade
            # once a transfer, after a pause, went many times faster (the link came back)
            self.harmonic.clear()
            self.samples.clear()
            self.ewma.value = None
        self.last, self.last_time = bps, now
        self.samples.append(bps)
        self.ewma.update(bps)
        self.harmonic.update(bps)
        self.wmax.update(now, bps)
        self.peak.update(now, bps)

    def observe(self, obs: Observation, rtt_propagation: float,
                queued_seconds: float = 0.0) -> float | None:
        """Turn a finished offload into a throughput sample; returns it (or None).

        ``queued_seconds``: part of the network time spent behind the edge's own earlier
        transfer on the same link (not a property of the link's rate).
        """
        if obs.bytes_sent <= 0 or obs.network_seconds <= 0:
            return None
        transfer = max(obs.network_seconds - queued_seconds - rtt_propagation, MIN_TRANSFER_SECONDS)
        bps = obs.bytes_sent * 8.0 / transfer
        self.add_sample(obs.now, bps)
        return bps

    def raw(self, now: float) -> float | None:
        """The estimator's own value, before staleness handling (None before any sample)."""
        if self.kind == "last":
            return self.last
        if self.kind == "ewma":
            return self.ewma.value
        if self.kind == "windowed_max":
            return self.wmax.value_at(now) or self.last
        return self.harmonic.value

    def estimate(self, now: float) -> float:
        """Current estimate: the prior at cold start; stale values decay toward the prior."""
        value = self.raw(now)
        if value is None or self.last_time is None:
            return self.prior
        age = now - self.last_time - self.stale_after
        if age <= 0:
            return value
        weight = 0.5 ** (age / self.halflife)
        return math.exp(weight * math.log(value) + (1 - weight) * math.log(self.prior))

    def quantile(self, q: float, now: float) -> float:
        """Empirical ``q``-quantile of recent samples, capped by the stale-aware estimate."""
        if not self.samples:
            return self.prior
        ordered = sorted(self.samples)
        pos = min(len(ordered) - 1, max(0, int(math.floor(q * (len(ordered) - 1)))))
        return min(ordered[pos], self.estimate(now)) if self.kind != "last" else ordered[pos]
