"""The userspace trace-driven link over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tether.core import traces
from tether.core.errors import ConfigError
from tether.testbed.calibrate import LinkThread, calibrate
from tether.testbed.link import Link, LinkConfig, OutageTrace


class _Echo:
    """A TCP echo server (the 'cloud') in a thread."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.received = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        with conn:
            while data := conn.recv(65536):
                self.received += data
                conn.sendall(data)

    def close(self) -> None:
        self.srv.close()


def _recv_exactly(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _roundtrip(trace, cfg: LinkConfig, payload: bytes) -> tuple[float, bytes, Link]:
    echo = _Echo()
    link = Link(trace, trace, ("127.0.0.1", echo.port), cfg)
    try:
        with LinkThread(link) as port, socket.create_connection(("127.0.0.1", port)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = time.monotonic()
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            back = _recv_exactly(conn, len(payload))
            elapsed = time.monotonic() - start
            sender.join()
    finally:
        echo.close()
    return elapsed, back, link


def test_bytes_arrive_intact_both_ways():
    payload = os.urandom(300_000)
    _, back, link = _roundtrip(traces.constant(50, 10), LinkConfig(), payload)
    assert back == payload
    assert sum(link.up.delivered.values()) == len(payload)
    assert sum(link.down.delivered.values()) == len(payload)


def test_propagation_delay_is_added_each_way():
    elapsed, back, _ = _roundtrip(traces.constant(100, 10), LinkConfig(delay_ms=40), b"x" * 100)
    assert back == b"x" * 100
    assert 0.080 <= elapsed < 0.200, elapsed


def test_rate_limits_a_bulk_transfer():
    # 400 kB at 8 Mbit/s = 0.4 s each way, the echo makes it ~0.4 s (pipelined)
    elapsed, back, _ = _roundtrip(traces.constant(8, 10), LinkConfig(), b"\1" * 400_000)
    assert len(back) == 400_000
    assert 0.38 <= elapsed < 0.9, elapsed


def test_outage_window_holds_traffic():
    cfg = LinkConfig(outages=((0.0, 0.5),))
    elapsed, back, _ = _roundtrip(traces.constant(50, 10), cfg, b"ping")
    assert back == b"ping"
    assert elapsed >= 0.45, elapsed


def test_loss_costs_retransmission_delay_but_keeps_bytes():
    payload = os.urandom(150_000)
    cfg = LinkConfig(loss=0.2, rto_ms=50, seed=1)
    elapsed, back, link = _roundtrip(traces.constant(100, 10), cfg, payload)
    assert back == payload
    assert link.up.lost_segments > 0 and link.down.lost_segments > 0
    assert elapsed >= 0.05


def test_queue_is_bounded_and_pushes_back_on_the_sender():
    echo = _Echo()
    cfg = LinkConfig(queue_bytes=32 * 1024)
    link = Link(traces.constant(0.5, 10), traces.constant(100, 10), ("127.0.0.1", echo.port), cfg)
    try:
        with LinkThread(link) as port, socket.create_connection(("127.0.0.1", port)) as conn:
            conn.setblocking(False)
            pushed, blocked = 0, False
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    pushed += conn.send(b"\0" * 65536)
                except BlockingIOError:
                    blocked = True
                    time.sleep(0.05)
                    if pushed > 1_000_000:
                        break
            assert blocked, "the sender never saw back-pressure"
            assert link.up.queued <= cfg.queue_bytes + 65536
    finally:
        echo.close()


def test_outage_trace_subtracts_windows():
    base = traces.constant(8, 10)        # 1e6 bytes/s
    with_outage = OutageTrace(base, ((1.0, 0.5),))
    assert with_outage.bytes_between(0, 2) == pytest.approx(1.5e6)
    assert with_outage.bytes_between(1.1, 1.4) == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs", [{"loss": 1.0}, {"delay_ms": -1}, {"queue_bytes": 10},
                                    {"outages": ((1.0, 0.0),)}, {"tick_ms": 0.0}])
def test_link_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        LinkConfig(**kwargs)


def test_calibration_on_a_short_synthetic_trace():
    """The CI calibration check. Targets are 5 % and 1 ms (met on a quiet machine, see
    docs/benchmarks.md); the delay bound here is 3 ms because the relay's wake-ups
    queue behind other processes on a loaded 2-core runner. A broken shaper or delay line
    misses by far more (a lost tick is 1 ms per wake-up, a wrong delay tens of ms)."""
    trace = traces.steps([(1.0, 6.0), (1.0, 2.0), (1.0, 10.0)], name="ci-steps")
    report = calibrate(trace, LinkConfig(delay_ms=15), duration_s=3, probes=20, probe_gap_s=0.02)
    assert len(report.per_second) == 3
    assert report.throughput_error_mean <= 0.05, report.summary()
    assert report.within_5pct >= 2 / 3, report.summary()
    assert abs(report.delay_error_ms_median) <= 3.0, report.summary()
    assert report.delay_samples == 20


def test_calibration_of_a_stalled_slow_trace_reports_instead_of_hanging():
    """Defect: a low-rate trace with outages left a backlog the link never drained: the
    calibration raised, then its sink died with a TimeoutExpired traceback after 30 s."""
    trace = traces.steps([(1.0, 0.1), (3.0, 0.0), (1.0, 0.1), (20.0, 0.0)], name="stall")
    t0 = time.monotonic()
    report = calibrate(trace, LinkConfig(delay_ms=5), duration_s=5, probes=10, probe_gap_s=0.02)
    took = time.monotonic() - t0
    assert took < 20, took
    assert [round(r["expected"]) for r in report.per_second] == [12500, 0, 0, 0, 12500]
    assert report.outage_seconds == 3 and report.outage_leak_bytes <= 1500, report.per_second
    assert report.within_5pct == 1.0, report.per_second
    assert report.delay_samples == 10 and report.probes_lost == 0
    assert "3 outage s" in report.summary()
