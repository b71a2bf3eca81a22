"""Bandwidth and RTT estimators: EWMA, RobustMPC harmonic mean, windowed extremes, staleness."""

from __future__ import annotations

import pytest

from tether.core.policy import Observation
from tether.core.types import Action
from tether.policies.config import PolicyConfig
from tether.policies.estimators import (BandwidthEstimator, Ewma, RobustHarmonic, RttEstimator,
                                        WindowedExtreme)


def test_ewma():
    e = Ewma(0.5)
    assert e.value is None
    e.update(10)
    e.update(20)
    assert e.value == pytest.approx(15)


def test_harmonic_mean_and_robust_discount():
    plain = RobustHarmonic(k=3, discount=False)
    for x in (1.0, 2.0, 4.0, 4.0):
        plain.update(x)
    assert plain.value == pytest.approx(3 / (1 / 2 + 1 / 4 + 1 / 4))   # last k only
    robust = RobustHarmonic(k=3)
    robust.update(4.0)
    robust.update(2.0)          # predicted 4, actual 2: error 1.0
    assert robust.mean == pytest.approx(2 / (1 / 4 + 1 / 2))
    assert robust.value == pytest.approx(robust.mean / 2.0)
    robust.update(2.0)          # error of the new prediction is smaller, but max is kept
    assert robust.value < robust.mean


def test_windowed_max_and_min_expire():
    wmax = WindowedExtreme(1.0)
    wmax.update(0.0, 5.0)
    wmax.update(0.5, 3.0)
    assert wmax.value_at(0.9) == 5.0
    assert wmax.value_at(1.2) == 3.0          # the 5 left the window
    assert wmax.value_at(3.0) is None
    wmin = WindowedExtreme(1.0, use_max=False)
    wmin.update(0.0, 0.05)
    wmin.update(0.2, 0.08)
    assert wmin.value_at(0.5) == 0.05
    assert wmin.value_at(1.1) == 0.08


def test_cold_start_returns_prior_then_samples():
    cfg = PolicyConfig(prior_bandwidth_bps=2e6, estimator="harmonic")
    bw = BandwidthEstimator(cfg)
    assert bw.estimate(0.0) == 2e6
    bw.add_sample(0.0, 10e6)
    bw.add_sample(0.1, 10e6)
    assert bw.estimate(0.2) == pytest.approx(10e6)


def test_stale_estimate_decays_toward_prior_and_old_samples_reset():
    cfg = PolicyConfig(prior_bandwidth_bps=1e6, estimator="ewma", stale_after_seconds=1.0,
                       stale_halflife_seconds=1.0)
    bw = BandwidthEstimator(cfg)
    bw.add_sample(0.0, 16e6)
    assert bw.estimate(0.5) == pytest.approx(16e6)
    assert bw.estimate(2.0) == pytest.approx(4e6)        # halfway to the prior in log space
    assert bw.estimate(30.0) == pytest.approx(1e6, rel=1e-3)
    bw.add_sample(40.0, 3e6)                              # after staleness: a fresh start
    assert bw.estimate(40.0) == pytest.approx(3e6)


def test_observation_sample_subtracts_propagation_rtt():
    bw = BandwidthEstimator(PolicyConfig(estimator="last"))
    obs = Observation(now=1.0, action=Action.parse("offload:png"), bytes_sent=10_000,
                      network_seconds=0.060)
    assert bw.observe(obs, rtt_propagation=0.040) == pytest.approx(10_000 * 8 / 0.020)
    # a transfer shorter than the RTT estimate is clamped to MIN_TRANSFER_SECONDS
    tiny = Observation(now=1.1, action=Action.parse("offload:png"), bytes_sent=100,
                       network_seconds=0.030)
    assert bw.observe(tiny, 0.040) == pytest.approx(100 * 8 / 0.001)


def test_quantile_is_low_sample_for_high_confidence():
    bw = BandwidthEstimator(PolicyConfig(estimator="harmonic", window=5))
    for i, x in enumerate((1e6, 5e6, 9e6, 10e6, 12e6)):
        bw.add_sample(i * 0.1, x)
    assert bw.quantile(0.0, 0.5) == 1e6
    assert bw.quantile(0.5, 0.5) <= 9e6


def test_rtt_windowed_min_keeps_last_minimum():
    rtt = RttEstimator(PolicyConfig(prior_rtt_seconds=0.1, window_seconds=2.0))
    assert rtt.propagation(0.0) == 0.1
    rtt.update(0.0, 0.05)
    rtt.update(1.0, 0.2)        # queued behind a transfer: not propagation
    assert rtt.propagation(1.5) == 0.05
    assert rtt.propagation(2.5) == 0.2
    assert rtt.propagation(10.0) == 0.2
    rtt.update(10.0, float("nan"))
    assert rtt.propagation(10.0) == 0.2


def test_typical_rtt_is_the_median_of_the_last_pings():
    rtt = RttEstimator(PolicyConfig(prior_rtt_seconds=0.1, window_seconds=10.0))
    rtt.update(0.0, 0.03)
    rtt.update(0.5, 0.08)
    assert rtt.typical(0.6) == 0.03                 # under three pings: the propagation
    for i, x in enumerate((0.07, 0.09, 1.5)):        # one ping behind an upload: not typical
        rtt.update(1.0 + i / 2, x)
    assert rtt.typical(3.0) == pytest.approx(0.08)
    assert rtt.propagation(3.0) == 0.03


def test_a_fast_sample_after_a_pause_ends_a_fade_window():
    """Slow samples of a fade no longer hold the harmonic mean down once a transfer, after
    a pause, goes many times faster; back-to-back scatter does not reset it."""
    bw = BandwidthEstimator(PolicyConfig(estimator="harmonic", window=5))
    bw.add_sample(0.0, 10e3)                 # a fade
    bw.add_sample(1.2, 500e3)                # the link came back, 1.2 s later
    assert bw.estimate(1.2) == 500e3
    noisy = BandwidthEstimator(PolicyConfig(estimator="harmonic", window=5))
    noisy.add_sample(0.0, 10e3)
    noisy.add_sample(0.1, 500e3)             # 0.1 s later: scatter, kept in the mean
    assert noisy.estimate(0.1) == pytest.approx(2 / (1 / 10e3 + 1 / 500e3))
    slow = BandwidthEstimator(PolicyConfig(estimator="harmonic", window=5))
    slow.add_sample(0.0, 400e3)
    slow.add_sample(1.2, 500e3)              # not a jump: averaged
    assert slow.estimate(1.2) == pytest.approx(2 / (1 / 400e3 + 1 / 500e3))
