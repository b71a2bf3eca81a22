"""Bandwidth traces: loaders, exact mahimahi semantics, queries, generators."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.core import traces as T
from tether.core.errors import TraceError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_mahimahi_counts_opportunities_at_ms_boundaries(tmp_path):
    tr = T.load_mahimahi(_write(tmp_path, "a.up", "1\n1\n3\n10\n"))
    assert tr.period_ms == 10
    assert tr.bytes_between(0, 0.001) == 3000
    assert tr.bytes_between(0, 0.002) == 3000
    assert tr.bytes_between(0, 0.003) == 4500
    assert tr.bytes_between(0, 0.010) == 6000
    # loops: the second period repeats the first
    assert tr.bytes_between(0.010, 0.013) == 4500
    assert tr.bytes_between(0, 0.1) == pytest.approx(60000)
    assert tr.mean_bps() == pytest.approx(6000 * 8 / 0.010)


def test_transfer_time_inverts_bytes_between(tmp_path):
    tr = T.load_mahimahi(_write(tmp_path, "b.up", "2\n5\n5\n9\n20\n"))
    for start in (0.0, 0.0013, 0.0195, 0.037):
        for nbytes in (1, 1500, 4000, 7500, 20000):
            dt = tr.transfer_time(start, nbytes)
            assert tr.bytes_between(start, start + dt) == pytest.approx(nbytes, rel=1e-9)
            if dt > 1e-4:
                assert tr.bytes_between(start, start + dt - 1e-4) < nbytes


def test_transfer_time_waits_through_outage():
    tr = T.steps([(1.0, 8.0), (2.0, 0.0), (1.0, 8.0)])  # 8 Mbit/s = 1000 B/ms
    assert tr.transfer_time(0.0, 500_000) == pytest.approx(0.5)
    # starting at 0.9 s: 100 kB before the outage, the rest after it at 3.0 s
    assert tr.transfer_time(0.9, 200_000) == pytest.approx(2.2)
    assert tr.rate_bps_at(1.5) == 0.0
    assert tr.rate_bps_at(0.5) == pytest.approx(8e6)


def test_transfer_spanning_many_loops():
    tr = T.constant(1.0, duration_s=2.0)   # 125 kB/s
    assert tr.transfer_time(0.3, 125_000 * 7) == pytest.approx(7.0)


def test_real_mahimahi_means_match_readme(assets):
    base = assets / "traces" / "mahimahi"
    expected = {"TMobile-LTE-short.up": 13.3, "Verizon-LTE-short.up": 5.95,
                "TMobile-UMTS-driving.up": 0.94, "Verizon-EVDO-driving.up": 0.84}
    for name, mbps in expected.items():
        assert T.load_mahimahi(base / name).mean_bps() / 1e6 == pytest.approx(mbps, abs=0.025)


def test_real_norway_log_loads(assets):
    path = sorted((assets / "traces" / "norway-hsdpa").glob("*.log"))[0]
    tr = T.load_trace(path)
    rates = [float(line.split()[1]) for line in path.read_text().splitlines() if line.strip()]
    assert 0.3 * np.mean(rates) < tr.mean_bps() / 1e6 < 3 * np.mean(rates)
    assert tr.duration_s > 60


def test_pensieve_rates_hold_until_next_sample(tmp_path):
    tr = T.load_pensieve(_write(tmp_path, "p.log", "0.0 1.0\n1.0 2.0\n2.0 0.0\n"))
    assert tr.duration_s == pytest.approx(3.0)
    assert tr.bytes_between(0, 1) == pytest.approx(125_000)
    assert tr.bytes_between(1, 2) == pytest.approx(250_000)
    assert tr.bytes_between(2, 3) == pytest.approx(0.0)


@pytest.mark.parametrize("text", ["", "abc\n", "5\n3\n", "-1\n", "0\n"])
def test_bad_mahimahi_raises_trace_error(tmp_path, text):
    with pytest.raises(TraceError):
        T.load_mahimahi(_write(tmp_path, "bad.up", text))


@pytest.mark.parametrize("text", ["0 1\n", "0 1\n0 2\n", "0 x\n1 2\n", "0 -1\n1 1\n", "0\n1\n"])
def test_bad_pensieve_raises_trace_error(tmp_path, text):
    with pytest.raises(TraceError):
        T.load_pensieve(_write(tmp_path, "bad.log", text))


def test_missing_file_and_all_zero_trace_raise():
    with pytest.raises(TraceError, match="not found"):
        T.load_trace("/nonexistent/trace.up")
    with pytest.raises(TraceError, match="never delivers"):
        T.steps([(1.0, 0.0)])


def test_slice_scale_and_series():
    tr = T.steps([(1.0, 4.0), (1.0, 12.0)])
    assert tr.slice(1.0, 2.0).mean_bps() == pytest.approx(12e6)
    assert tr.scale(0.5).mean_bps() == pytest.approx(4e6)
    assert tr.scaled_to_mean(2e6).mean_bps() == pytest.approx(2e6)
    t, r = tr.rate_series(0.5)
    assert list(t) == [0.0, 0.5, 1.0, 1.5]
    assert r == pytest.approx([4e6, 4e6, 12e6, 12e6])
    with pytest.raises(TraceError):
        tr.scale(0)


def test_save_mahimahi_roundtrip(tmp_path):
    tr = T.steps([(0.5, 3.0), (0.5, 0.0), (0.5, 6.0)])
    path = tmp_path / "rt.up"
    tr.save_mahimahi(path)
    back = T.load_mahimahi(path)
    assert back.mean_bps() == pytest.approx(tr.mean_bps(), rel=0.01)
    assert back.bytes_between(0.5, 1.0) == 0


def test_generators_are_seeded_and_sane():
    a, b = T.markov([10, 1], 1.0, 30, seed=3), T.markov([10, 1], 1.0, 30, seed=3)
    assert np.array_equal(a.slots, b.slots)
    assert 1e6 < a.mean_bps() < 10e6
    lte = T.lte_like()
    assert lte.duration_s == pytest.approx(120)
    _, rates = lte.rate_series(0.1)
    assert (rates == 0).any() and rates.max() > 5e6      # outages and good periods
    onoff = T.on_off(5.0, 2.0, 1.0, cycles=2)
    assert onoff.duration_s == pytest.approx(6.0)
    assert onoff.bytes_between(2.0, 3.0) == 0


def test_from_spec_forms(tmp_path):
    assert T.from_spec("constant:8:2").mean_bps() == pytest.approx(8e6)
    assert T.from_spec("steps:1@2,1@6").mean_bps() == pytest.approx(4e6)
    assert T.from_spec("onoff:5:2:1:2").duration_s == pytest.approx(6)
    assert T.from_spec("markov:10/1:1:20:4").duration_s == pytest.approx(20)
    assert T.from_spec("lte-like:30").duration_s == pytest.approx(30)
    path = _write(tmp_path, "x.up", "1\n2\n")
    assert T.from_spec(str(path)).period_ms == 2
    with pytest.raises(TraceError, match="bad trace spec"):
        T.from_spec("constant:fast")


def test_transfer_time_rejects_negative_and_handles_zero():
    tr = T.constant(1.0)
    assert tr.transfer_time(3.0, 0) == 0.0
    with pytest.raises(TraceError):
        tr.transfer_time(0, -5)
    assert math.isclose(tr.transfer_time(100.0, 125), 0.001)
