"""Calibration of the userspace link: bulk throughput per second and added one-way delay.

Two phases through a real :class:`~tether.testbed.link.Link` on 127.0.0.1 (the link runs
in its own thread and event loop, like the separate process it is in experiments):

1. **Throughput**: a sender keeps the uplink saturated for ``duration_s``; a sink counts
   the bytes that arrive in each second (arrival time minus the propagation delay, on the
   link's trace clock) and compares them with ``trace.bytes_between(k, k+1)``.
2. **Delay**: on the idle link, small probes carry their send time; the sink records
   their one-way delay. Expected = configured delay + the time the trace needs to carry
   the probe (``transfer_time``); the report gives the error of the measured delay.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tether.core.errors import PlatformError
from tether.testbed.link import Link, LinkConfig, new_event_loop

PROBE_BYTES = 64
_PROBE = struct.Struct("!4sd")          # magic, send time (monotonic)
_MAGIC = b"TPRB"


@dataclass
class CalibrationReport:
    trace: str
    delay_ms: float
    duration_s: float
    start_offset: float = 0.0
    backend: str = "userspace"
    per_second: list[dict[str, float]] = field(default_factory=list)  # second, expected, delivered
    throughput_error_mean: float = 0.0     # mean |delivered/expected - 1| over full seconds
    throughput_error_max: float = 0.0
    within_5pct: float = 0.0               # fraction of seconds within +-5 %
    total_ratio: float = 0.0               # delivered / expected over the whole run
    delay_samples: int = 0
    delay_error_ms_mean: float = 0.0       # measured - expected one-way delay
    delay_error_ms_median: float = 0.0
    delay_error_ms_p95: float = 0.0        # of |error|
    delay_error_ms_max: float = 0.0

    @property
    def passed(self) -> bool:
        """Targets: per-second throughput within 5 % (mean, and 90 % of seconds), added
        delay within 1 ms (median; the mean and p95 are reported beside it)."""
        return bool(self.throughput_error_mean <= 0.05 and self.within_5pct >= 0.9
                    and abs(self.delay_error_ms_median) <= 1.0)

    def to_dict(self) -> dict[str, Any]:
        plain = json.loads(json.dumps(asdict(self), default=float))
        return plain | {"passed": self.passed}

    def summary(self) -> str:
        return (f"trace {self.trace}: throughput per second within 5 % in "
                f"{self.within_5pct:.0%} of {len(self.per_second)} s "
                f"(mean |error| {self.throughput_error_mean:.2%}, "
                f"max {self.throughput_error_max:.2%},"
                f" total {self.total_ratio:.4f}); added delay error mean "
                f"{self.delay_error_ms_mean:+.3f} ms (median {self.delay_error_ms_median:+.3f}), "
                f"p95 |error| {self.delay_error_ms_p95:.3f} ms "
                f"({self.delay_samples} probes, configured {self.delay_ms:g} ms) -> "
                f"{'PASS' if self.passed else 'FAIL'}")


class LinkThread:
    """Runs one :class:`Link` in a background thread with its own (uv)loop."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._loop = new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tether-link", daemon=True)

    def __enter__(self) -> int:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise PlatformError(f"link thread failed to start: {self._error}")
        return self.link.port

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the waiting thread
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        await self.link.start()
        self._ready.set()
        await self._stop.wait()
        await self.link.stop()


class _Sink:
    """TCP sink: the first connection is bulk (binned by arrival time), the second probes."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.probes: list[tuple[float, float]] = []   # (send, arrive) monotonic

    def serve(self, srv: socket.socket) -> threading.Thread:
        def run() -> None:
            bulk, _ = srv.accept()
            with bulk:
                self._bulk(bulk)
            probe, _ = srv.accept()
            with probe:
                self._probes(probe)

        thread = threading.Thread(target=run, name="tether-sink", daemon=True)
        thread.start()
        return thread

    def _bulk(self, conn: socket.socket) -> None:
        while data := conn.recv(1 << 16):
            self.arrivals.append((time.monotonic(), len(data)))

    def _probes(self, conn: socket.socket) -> None:
        buf = b""
        while data := conn.recv(1 << 12):
            now = time.monotonic()
            buf += data
            while len(buf) >= PROBE_BYTES:
                frame, buf = buf[:PROBE_BYTES], buf[PROBE_BYTES:]
                magic, sent = _PROBE.unpack_from(frame)
                if magic == _MAGIC:
                    self.probes.append((sent, now))


def sink_main(host: str, port: int) -> None:
    """A sink process (run inside the kernel backend's namespace): prints JSON results."""
    sink = _Sink()
    srv = socket.create_server((host, port))
    print("ready", flush=True)
    sink.serve(srv).join()
    print(json.dumps({"arrivals": sink.arrivals, "probes": sink.probes}), flush=True)


def calibrate(trace: Any, cfg: LinkConfig = LinkConfig(), duration_s: float = 10.0,
              probes: int = 50, probe_gap_s: float = 0.03,
              backend: str = "userspace") -> CalibrationReport:
    """Push bulk data, then probes, through a link replaying ``trace`` on its uplink.

    The sink runs in its own process (as the cloud would), so its timestamps do not wait
    for this process's GIL while the link thread and the bulk sender are busy.
    """
    if backend == "kernel":
        return _calibrate_kernel(trace, cfg, duration_s, probes, probe_gap_s)
    port = _free_port()
    with _SinkProcess([], "127.0.0.1", port) as sink:
        link = Link(trace, trace, ("127.0.0.1", port), _deep_queue(trace, cfg, duration_s))
        with LinkThread(link) as link_port:
            t0 = link.up.t0 if link.up else time.monotonic()
            with _connect("127.0.0.1", link_port) as conn:
                _bulk(conn, t0 + cfg.start_offset + duration_s)
            _wait_drained(link, timeout=duration_s + 5)
            with _connect("127.0.0.1", link_port) as conn:
                sent = _send_probes(conn, probes, probe_gap_s)
                time.sleep(cfg.delay_ms / 1000 + 0.3)
    return _report(trace, cfg, duration_s, sink.result(), t0, sent, "userspace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _SinkProcess:
    """:func:`sink_main` in a child process (``prefix``: e.g. ``ip netns exec NS``)."""

    def __init__(self, prefix: list[str], host: str, port: int) -> None:
        import subprocess
        import sys
        code = f"from tether.testbed.calibrate import sink_main; sink_main({host!r}, {port})"
        self.proc = subprocess.Popen(prefix + [sys.executable, "-c", code],
                                     stdout=subprocess.PIPE, text=True)
        self._out = ""

    def __enter__(self) -> "_SinkProcess":
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise PlatformError("calibration sink process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._out, _ = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def result(self) -> _Sink:
        if not self._out.strip():
            raise PlatformError("calibration sink process returned nothing")
        data = json.loads(self._out.strip().splitlines()[-1])
        sink = _Sink()
        sink.arrivals = [tuple(a) for a in data["arrivals"]]
        sink.probes = [tuple(p) for p in data["probes"]]
        return sink


def _deep_queue(trace: Any, cfg: LinkConfig, duration_s: float) -> LinkConfig:
    """``cfg`` with a queue of at least 2 s at the trace's peak rate, so that the bulk
    sender's scheduling gaps on a loaded machine never starve the shaper being measured."""
    from dataclasses import replace
    start = cfg.start_offset
    peak = max(trace.bytes_between(start + k, start + k + 1) for k in range(int(duration_s) + 1))
    return replace(cfg, queue_bytes=max(cfg.queue_bytes, int(2 * peak)))


def _report(trace: Any, cfg: LinkConfig, duration_s: float, sink: _Sink, t0: float,
            sent: list[float], backend: str) -> CalibrationReport:
    report = CalibrationReport(getattr(trace, "name", "trace"), cfg.delay_ms, duration_s,
                               cfg.start_offset, backend)
    _throughput(report, trace, sink, t0, cfg.delay_ms / 1000.0, duration_s)
    _delays(report, trace, sink, t0, cfg.delay_ms / 1000.0, len(sent))
    return report


def _connect(host: str, port: int) -> socket.socket:
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.connect((host, port))
    return conn


def _calibrate_kernel(trace: Any, cfg: LinkConfig, duration_s: float, probes: int,
                      probe_gap_s: float) -> CalibrationReport:
    """The same measurement through the kernel backend (sink inside the cloud namespace)."""
    from tether.testbed.kernel import KernelLink, KernelLinkConfig
    queue = _deep_queue(trace, cfg, duration_s).queue_bytes
    kcfg = KernelLinkConfig(queue_bytes=queue, delay_ms=cfg.delay_ms, loss=cfg.loss)
    with KernelLink(trace, trace, kcfg) as link:
        with _SinkProcess(link.netns_command([]), link.cloud_addr, 5999) as sink:
            with _connect(link.cloud_addr, 5999) as conn:
                link.reset_clock()
                t0 = time.monotonic()
                _bulk(conn, t0 + duration_s)
            time.sleep(min(30.0, trace.transfer_time(duration_s, queue + 256 * 1024) + 0.5))
            with _connect(link.cloud_addr, 5999) as conn:
                sent = _send_probes(conn, probes, probe_gap_s)
    return _report(trace, cfg, duration_s, sink.result(), t0, sent, "kernel")


def _bulk(conn: socket.socket, until: float) -> None:
    block = b"\0" * (1 << 16)
    conn.settimeout(0.2)
    while time.monotonic() < until:
        try:
            conn.send(block)
        except socket.timeout:
            continue
    conn.settimeout(None)


def _wait_drained(link: Link, timeout: float) -> None:
    """Wait until the link's uplink queue and delay line are empty."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.1)
        up = link.up
        if up is not None and up.queued == 0 and not up.inflight:
            time.sleep(0.2)
            return
    raise PlatformError(f"calibration: link did not drain within {timeout:.0f} s; "
                        "is the trace rate far below the bulk phase's data?")


def _send_probes(conn: socket.socket, count: int, gap_s: float) -> list[float]:
    sent = []
    pad = b"\0" * (PROBE_BYTES - _PROBE.size)
    for _ in range(count):
        now = time.monotonic()
        conn.sendall(_PROBE.pack(_MAGIC, now) + pad)
        sent.append(now)
        time.sleep(gap_s)
    return sent


def _throughput(report: CalibrationReport, trace: Any, sink: _Sink, t0: float,
                delay: float, duration_s: float) -> None:
    bins: dict[int, int] = {}
    for now, n in sink.arrivals:
        second = int(math.floor(now - delay - t0))
        bins[second] = bins.get(second, 0) + n
    errors = []
    total_exp = total_got = 0.0
    first = int(math.ceil(report.start_offset))
    for k in range(first, first + int(duration_s)):
        expected = trace.bytes_between(k, k + 1)
        got = bins.get(k, 0)
        report.per_second.append({"second": k, "expected": expected, "delivered": got})
        total_exp += expected
        total_got += got
        if expected > 0:
            errors.append(abs(got / expected - 1.0))
    if errors:
        report.throughput_error_mean = sum(errors) / len(errors)
        report.throughput_error_max = max(errors)
        report.within_5pct = sum(e <= 0.05 for e in errors) / len(errors)
    report.total_ratio = total_got / total_exp if total_exp else 0.0


def _delays(report: CalibrationReport, trace: Any, sink: _Sink, t0: float, delay: float,
            sent: int) -> None:
    errors = []
    for send, arrive in sink.probes:
        carry = trace.transfer_time(send - t0, PROBE_BYTES)
        errors.append((arrive - send - delay - carry) * 1000.0)
    report.delay_samples = len(errors)
    if len(errors) < sent:
        raise PlatformError(f"calibration: only {len(errors)} of {sent} probes arrived")
    report.delay_error_ms_mean = sum(errors) / len(errors)
    report.delay_error_ms_median = sorted(errors)[len(errors) // 2]
    absolute = sorted(abs(e) for e in errors)
    report.delay_error_ms_p95 = absolute[min(len(absolute) - 1, int(0.95 * len(absolute)))]
    report.delay_error_ms_max = absolute[-1]
