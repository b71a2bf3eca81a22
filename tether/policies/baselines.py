"""Baseline policies: local-only, cloud-only, static, Neurosurgeon and the hindsight oracle.

Each implements :class:`tether.core.policy.Policy`. :class:`EstimatingPolicy` is the shared
base of the policies that keep bandwidth/RTT estimates from observations.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from tether.core.errors import ConfigError
from tether.core.policy import DecisionContext, Observation
from tether.core.types import LOCAL, Action
from tether.policies.calibration import Calibrator
from tether.policies.config import PolicyConfig
from tether.policies.costmodel import CostModel
from tether.policies.estimators import BandwidthEstimator, RttEstimator


class LocalOnly:
    """Always the whole model on the edge."""

    name = "local"

    def decide(self, ctx: DecisionContext) -> Action:
        return LOCAL

    def observe(self, obs: Observation) -> None:
        return None


class StaticPolicy:
    """One fixed action (local when the cloud is unavailable)."""

    def __init__(self, action: Action, name: str = "static") -> None:
        self.action = action
        self.name = name

    def decide(self, ctx: DecisionContext) -> Action:
        return self.action if ctx.cloud_available else LOCAL

    def observe(self, obs: Observation) -> None:
        return None


def cloud_only(model: CostModel, cfg: PolicyConfig) -> StaticPolicy:
    """Always full offload, with the input codec that is fastest at the prior link."""
    floor = cfg.floor_for(model.table.full_accuracy)
    action = model.best_offload(floor, cfg.prior_bandwidth_bps, cfg.prior_rtt_seconds)
    return StaticPolicy(action, "cloud")


def static_at_prior(model: CostModel, cfg: PolicyConfig) -> StaticPolicy:
    """``cfg.static_action`` if set, else the best action at the prior bandwidth and RTT."""
    if cfg.static_action:
        try:
            action = Action.parse(cfg.static_action)
        except ValueError as exc:
            raise ConfigError(f"policy.static_action {cfg.static_action!r}: {exc}") from exc
        return StaticPolicy(action, "static")
    floor = cfg.floor_for(model.table.full_accuracy)
    lat = model.latencies(cfg.prior_bandwidth_bps, cfg.prior_rtt_seconds)
    lat = np.where(model.allowed(floor), lat, np.inf)
    return StaticPolicy(model.actions[int(np.argmin(lat))], "static")


#: Silence after which a policy with work queued on the edge probes (see
#: :meth:`EstimatingPolicy.probe`): its hedged probe's answer is the local one at worst.
BACKLOG_PROBE_GAP_SECONDS = 0.5


class EstimatingPolicy:
    """Base: keeps RTT and bandwidth estimators fed from observations.

    It also remembers its own offloads still in flight: one outstanding for ``age`` seconds
    proves the uplink delivered fewer than its bytes in that time, an upper bound on the
    bandwidth that reacts to an outage before any reply (or timeout) comes back.
    """

    name = "estimating"
    use_inflight_bound = False

    def __init__(self, model: CostModel, cfg: PolicyConfig, estimator: str | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.bw = BandwidthEstimator(cfg, estimator)
        self.rtt = RttEstimator(cfg)
        self.floor = cfg.floor_for(model.table.full_accuracy)
        self.mask = model.allowed(self.floor)
        self._inflight: deque[tuple[str, float, float]] = deque(maxlen=256)
        self._last_probe = -np.inf
        self._probe_gap = cfg.stale_after_seconds   # backs off to probe_interval_seconds
        self._last_reply = -np.inf
        self.calibration = (Calibrator(model, cfg.calibration_alpha,
                                       cfg.calibration_halflife_seconds) if cfg.calibrate else None)
        self._terms_key: tuple | None = None
        self._cal_version, self._cal_time = -1, -np.inf
        self._terms: tuple[np.ndarray, np.ndarray, np.ndarray] = (model.pre, model.pre, model.pre)

    def factors(self, now: float) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Calibrated (edge, cloud) compute factors per action (1.0 without calibration)."""
        if self.calibration is None:
            return 1.0, 1.0
        return self.calibration.edge_factors(now), self.calibration.cloud_factors(now)

    def _calibration_epoch(self, now: float) -> tuple[int, int]:
        cal = self.calibration
        if cal is None:
            return (0, int(now))
        if cal.samples <= 20:
            return (cal.version, int(now))
        if cal.version != self._cal_version and now - self._cal_time >= 0.25:
            self._cal_version, self._cal_time = cal.version, now
        return (self._cal_version, int(now))

    def predict(self, ctx: DecisionContext, up_bps: float | np.ndarray) -> np.ndarray:
        """Predicted latency of every action (calibrated compute, current RTT and queue):
        ``fixed + bits / bandwidth`` from per-action constants cached between samples."""
        fixed, bits, _ = self.terms(ctx.now, ctx.cloud_queue_seconds)
        return fixed + bits / np.maximum(up_bps, 1.0)

    def terms(self, now: float, queue: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per action: latency without the link's transfer time, bits on the link (up and
        down, weighted by the remote fraction), calibrated edge compute. Recomputed only
        when the RTT or the cloud queue changed, after new calibration samples (at once for
        the first ones, then at most every 0.25 s) or once a second (the factors decay
        slowly), so a decision costs a few vector operations."""
        rtt = self.rtt.typical(now)
        key = (rtt, round(queue, 4), self._calibration_epoch(now))
        if key != self._terms_key:
            m = self.model
            edge, cloud = self.factors(now)
            remote = m.encode * edge + rtt + queue + m.cloud * cloud
            fixed = m.pre * edge + m.remote_frac * remote
            bits = m.remote_frac * (m.up + m.down) * 8.0
            work = (m.pre + m.remote_frac * m.encode) * edge
            self._terms, self._terms_key = (fixed, bits, work), key
        return self._terms

    def observe(self, obs: Observation) -> None:
        if obs.rtt_seconds is not None:
            # a ping that crossed an upload of ours may have queued behind it (a fade):
            # only those that did not tell the edge's own delay
            alone = not self._inflight and self._last_reply < obs.now - obs.rtt_seconds
            self.rtt.update(obs.now, obs.rtt_seconds, typical=alone)
        if obs.action is None:
            return
        if self.calibration is not None:
            self.calibration.observe(obs)
        self._settle(obs.action.key)
        if obs.bytes_sent <= 0:
            return
        if obs.ok:
            rtt = self.rtt.typical(obs.now)
            # Sent while an earlier offload was still in flight: its bytes went first, until
            # about one RTT before that earlier reply came back.
            sent = obs.now - obs.network_seconds
            queued = max(0.0, min(self._last_reply - rtt, obs.now) - sent)
            self.bw.observe(obs, rtt, queued)
            self._last_reply = obs.now
        elif obs.network_seconds > 0:
            # Did not finish in time: the link delivered less than bytes_sent in that time.
            self.bw.add_sample(obs.now, obs.bytes_sent * 8.0 / obs.network_seconds / 2.0)

    def remember(self, now: float, action: Action, send: float | None = None) -> None:
        """Note a decision; offloads stay in flight until their observation arrives.

        ``send``: when its bytes leave (after the edge's own queue), if the caller knows;
        else right after its own profiled edge work. A send time too early would make an
        offload still queued on the edge look like a stalled link."""
        cost = self.model.cost(action)
        if cost.exit_rate == 0.0:
            if send is None:
                send = now + cost.pre_seconds + cost.encode_seconds
            self._inflight.append((action.key, send, cost.up_bytes))

    def _settle(self, key: str) -> None:
        for k, item in enumerate(self._inflight):
            if item[0] == key:
                del self._inflight[k]
                return

    def estimates(self, now: float) -> dict[str, float]:
        """Current uplink estimates for metrics: bytes/s and round-trip seconds."""
        smoothed = self.rtt.smoothed.value
        return {"bandwidth_bytes_per_second": self.bandwidth(now) / 8.0,
                "rtt_seconds": smoothed if smoothed is not None else self.rtt.propagation(now)}

    def bandwidth(self, now: float) -> float:
        """The estimate, capped by what the oldest offload still in flight proves."""
        est = self.bw.estimate(now)
        horizon = max(self.cfg.stale_after_seconds * 5, 10.0)
        while self._inflight and now - self._inflight[0][1] > horizon:
            self._inflight.popleft()   # never answered (lost): forget it
        if not self.use_inflight_bound or not self._inflight:
            return est
        _, sent, nbytes = self._inflight[0]
        waited = now - sent - self.rtt.propagation(now)
        if waited > 0 and nbytes * 8.0 / waited < est:
            return nbytes * 8.0 / waited
        return est

    def probe(self, ctx: DecisionContext, local_latency: float,
              extra: np.ndarray | float = 0.0, backlog: float = 0.0) -> int | None:
        """A remote action worth one request to re-measure the link, or None.

        Answering locally yields no throughput samples, so without probes a policy that
        once saw a bad link (or starts with a pessimistic prior) would never offload again.
        One probe per ``stale_after_seconds`` of silence (the estimate says little after that),
        the gap doubling with every probe up to ``probe_interval_seconds`` and reset when
        the link wins on its estimate again (a fading uplink recovers within seconds, an
        outage or a dead zone costs geometrically fewer probes); and only when the
        remote action would win at the best bandwidth seen in ``peak_memory_seconds``
        (any bandwidth, before the first sample). The probe itself is the remote action
        cheapest at the *current* estimate (bounded cost), never one whose predicted latency
        there breaks the request's deadline. ``extra``: what the caller added to
        ``local_latency``'s side (queue waits), added here alike. ``backlog``: seconds of work
        already queued on the edge (a caller whose probes are hedged, their local answer
        started at the send): answering locally is slow then, so with no offload in flight a
        probe is due after :data:`BACKLOG_PROBE_GAP_SECONDS` of silence, without backing off.
        """
        interval = self.cfg.probe_interval_seconds
        last = max(self.bw.last_time if self.bw.last_time is not None else -np.inf, self._last_probe)
        gap = min(self._probe_gap, interval)
        backed_up = backlog > 0 and not self._inflight
        if backed_up:
            gap = min(gap, BACKLOG_PROBE_GAP_SECONDS)
        if interval <= 0 or ctx.now - last < gap:
            return None
        peak = self.bw.peak.value_at(ctx.now)
        optimistic = peak if peak is not None else np.inf
        ok = self.mask & ~self.model.is_local
        best_case = np.where(ok, self.predict(ctx, optimistic) + extra, np.inf)
        if not best_case.min() < local_latency * (1 - self.cfg.hysteresis):
            return None
        now_lat = self.predict(ctx, self.bandwidth(ctx.now)) + extra
        deadline = min((d for d in (ctx.deadline_seconds, self.cfg.deadline_seconds) if d), default=None)
        if deadline is not None:
            ok &= now_lat <= deadline
        now_lat = np.where(ok, now_lat, np.inf)
        choice = int(np.argmin(now_lat))
        if not np.isfinite(now_lat[choice]):
            return None
        self._last_probe = ctx.now
        if not backed_up:
            self._probe_gap = min(2.0 * self._probe_gap, interval)
        return choice

    def chose_remote(self) -> None:
        """The link won on its estimate (not a probe): the next silence is probed soon again."""
        self._probe_gap = self.cfg.stale_after_seconds

    def argmin(self, ctx: DecisionContext, up_bps: float) -> tuple[int, np.ndarray]:
        lat = np.where(self.mask, self.predict(ctx, up_bps), np.inf)
        return int(np.argmin(lat)), lat


class Neurosurgeon(EstimatingPolicy):
    """Last measured bandwidth, argmin predicted latency (Kang et al., ASPLOS 2017).

    Shares the cold-start prior, staleness decay and probing of tether-adaptive (so it
    does not stay local forever once it saw a bad link); it lacks the robust estimate,
    the in-flight bound and the hysteresis.
    """

    name = "neurosurgeon"

    def __init__(self, model: CostModel, cfg: PolicyConfig) -> None:
        super().__init__(model, cfg, estimator="last")

    def decide(self, ctx: DecisionContext) -> Action:
        if not ctx.cloud_available:
            return LOCAL
        best, lat = self.argmin(ctx, self.bw.estimate(ctx.now))
        if self.model.is_local[best]:
            probe = self.probe(ctx, lat[best])
            best = best if probe is None else probe
        else:
            self.chose_remote()
        return self.model.actions[best]


#: What the simulator gives the oracle: the true latency of ``action`` for this request.
Hindsight = Callable[[Action, DecisionContext], float]


class HindsightOracle:
    """Knows the future trace (through the simulator's :data:`Hindsight`): evaluation only."""

    name = "oracle"

    def __init__(self, model: CostModel, cfg: PolicyConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.mask = model.allowed(cfg.floor_for(model.table.full_accuracy))
        self._bounds = np.where(self.mask, model.lower_bounds(0.0), np.inf)
        self._order = [int(i) for i in np.argsort(self._bounds, kind="stable") if self.mask[i]]
        self._hindsight: Hindsight | None = None

    def attach(self, hindsight: Hindsight) -> None:
        self._hindsight = hindsight

    def decide(self, ctx: DecisionContext) -> Action:
        if self._hindsight is None:
            raise ConfigError("the oracle needs the future: run it inside tether.policies.simulate")
        if not ctx.cloud_available:
            return LOCAL
        lat = self._true_latencies(self._hindsight, ctx)
        if self.cfg.objective == "accuracy" and self.cfg.deadline_seconds is not None:
            meets = lat <= self.cfg.deadline_seconds
            if meets.any():
                acc = np.where(meets, np.nan_to_num(self.model.accuracy, nan=1.0), -np.inf)
                best = np.flatnonzero(acc >= acc.max() - 1e-12)
                return self.model.actions[int(best[np.argmin(lat[best])])]
        return self.model.actions[int(np.argmin(lat))]

    def observe(self, obs: Observation) -> None:
        return None

    def _true_latencies(self, hindsight: Hindsight, ctx: DecisionContext) -> np.ndarray:
        """True latency per allowed action; for the latency objective, actions whose
        lower bound cannot beat the best found so far are skipped (left at +inf)."""
        lat = np.full(len(self.model.actions), np.inf)
        prune = self.cfg.objective == "latency"
        best = np.inf
        for i in self._order:
            if prune and self._bounds[i] >= best:
                break                      # sorted by bound: nothing later can win
            lat[i] = hindsight(self.model.actions[i], ctx)
            best = min(best, lat[i])
        return lat
