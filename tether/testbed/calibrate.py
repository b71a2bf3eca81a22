"""Calibration of the userspace link: bulk throughput per second and added one-way delay.

Two phases through a real :class:`~tether.testbed.link.Link` on 127.0.0.1 (the link runs
in its own thread and event loop, like the separate process it is in experiments):

1. **Throughput**: a sender keeps the uplink saturated for ``duration_s``; a sink counts
   the bytes that arrive in each second (arrival time minus the propagation delay, on the
   link's trace clock) and compares them with ``trace.bytes_between(k, k+1)``. A second
   is within tolerance when off by at most 5 % or one 1500-byte segment (mahimahi traces
   deliver whole segments, so a 12 kbit/s second is 1 segment); in an outage second
   (nothing expected) any delivered byte is an error (``outage_leak_bytes``). The backlog
   left at the end of the window is dropped with that link, never waited for (on a stalled
   or 10 kbit/s trace it would take minutes and it is outside the measurement).
2. **Delay**: on a fresh link, small probes carry their send time; the sink records
   their one-way delay. Expected = configured delay + the time the trace needs to carry
   the probe (``transfer_time``, outages included); the report gives the error of the
   measured delay and how many probes did not arrive in the time the trace allows.
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
from tether.testbed.link import Link, LinkConfig, OutageTrace, new_event_loop

PROBE_BYTES = 64
SEGMENT = 1500                          # the link's (and mahimahi's) delivery unit
MAX_PROBE_WAIT_S = 120.0                # probes stuck longer than this count as lost
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
    within_5pct: float = 0.0               # fraction of seconds within +-5 % (or 1 segment)
    outage_seconds: int = 0                # seconds in which the trace carries nothing
    outage_leak_bytes: int = 0             # bytes delivered in those seconds (target 0)
    probes_lost: int = 0                   # probes not delivered in the time the trace allows
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
                    and abs(self.delay_error_ms_median) <= 1.0 and self.probes_lost == 0
                    and self.outage_leak_bytes <= SEGMENT)

    def to_dict(self) -> dict[str, Any]:
        plain = json.loads(json.dumps(asdict(self), default=float))
        return plain | {"passed": self.passed}

    def summary(self) -> str:
        return (f"trace {self.trace}: throughput per second within 5 % in "
                f"{self.within_5pct:.0%} of {len(self.per_second)} s "
                f"(mean |error| {self.throughput_error_mean:.2%}, "
                f"max {self.throughput_error_max:.2%},"
                f" total {self.total_ratio:.4f}; {self.outage_seconds} outage s, "
                f"{self.outage_leak_bytes} bytes leaked); added delay error mean "
                f"{self.delay_error_ms_mean:+.3f} ms (median {self.delay_error_ms_median:+.3f}), "
                f"p95 |error| {self.delay_error_ms_p95:.3f} ms "
                f"({self.delay_samples} probes, {self.probes_lost} lost, configured "
                f"{self.delay_ms:g} ms) -> "
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

    def serve(self, srv: socket.socket) -> list[threading.Thread]:
        """Accept the bulk connection, then the probe one; each is read in its own thread
        (the bulk one may still be open, e.g. cut by a link stopped mid-outage)."""
        threads = []
        for target in (self._bulk, self._probes):
            conn, _ = srv.accept()
            thread = threading.Thread(target=self._read, args=(target, conn), daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    @staticmethod
    def _read(target: Any, conn: socket.socket) -> None:
        with conn:
            try:
                target(conn)
            except OSError:         # reset by a stopped link: what arrived is kept
                pass

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
    for thread in sink.serve(srv):
        thread.join()
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
    # what the link carries: the trace minus the extra outage windows
    expect = OutageTrace(trace, cfg.outages) if cfg.outages else trace
    port = _free_port()
    with _SinkProcess([], "127.0.0.1", port) as sink:
        link = Link(trace, trace, ("127.0.0.1", port), _deep_queue(expect, cfg, duration_s))
        with LinkThread(link) as link_port:
            t0 = link.up.t0 if link.up else time.monotonic()
            with _connect("127.0.0.1", link_port) as conn:
                _bulk(conn, t0 + cfg.start_offset + duration_s)
                time.sleep(cfg.delay_ms / 1000 + 0.2)   # the window's last bytes land
        probe_link = Link(trace, trace, ("127.0.0.1", port), cfg)
        with LinkThread(probe_link) as link_port:
            t1 = probe_link.up.t0 if probe_link.up else time.monotonic()
            with _connect("127.0.0.1", link_port) as conn:
                sent = _send_probes(conn, probes, probe_gap_s)
                _wait_probes(expect, cfg, t1, sent)
    return _report(expect, cfg, duration_s, sink.result(), t0, sent, "userspace", t1)


def _wait_probes(trace: Any, cfg: LinkConfig, t1: float, sent: list[float]) -> None:
    """As long as the trace needs to carry every probe (outages included), bounded."""
    carry = trace.transfer_time(sent[0] - t1, PROBE_BYTES * len(sent)) if sent else 0.0
    until = (sent[0] if sent else time.monotonic()) + carry + cfg.delay_ms / 1000 + 0.3
    time.sleep(max(0.0, min(until - time.monotonic(), MAX_PROBE_WAIT_S)))


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

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        import subprocess
        try:
            if exc_type is None:        # the links closed its connections: it ends now
                self._out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired as err:
            raise PlatformError("calibration sink process did not finish within 30 s of the "
                                "measurement's end (a connection was left open)") from err
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
            sent: list[float], backend: str, probe_t0: float | None = None) -> CalibrationReport:
    """``t0``: clock value at trace time 0 of the bulk phase; ``probe_t0``: of the probes'."""
    report = CalibrationReport(getattr(trace, "name", "trace"), cfg.delay_ms, duration_s,
                               cfg.start_offset, backend)
    _throughput(report, trace, sink, t0, cfg.delay_ms / 1000.0, duration_s)
    _delays(report, trace, sink, t0 if probe_t0 is None else probe_t0,
            cfg.delay_ms / 1000.0, len(sent))
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
    errors: list[float] = []
    within: list[bool] = []
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
            within.append(abs(got - expected) <= max(0.05 * expected, SEGMENT))
        else:
            report.outage_seconds += 1
            report.outage_leak_bytes += got
    if errors:
        report.throughput_error_mean = sum(errors) / len(errors)
        report.throughput_error_max = max(errors)
        report.within_5pct = sum(within) / len(within)
    report.total_ratio = total_got / total_exp if total_exp else 0.0


def _delays(report: CalibrationReport, trace: Any, sink: _Sink, t0: float, delay: float,
            sent: int) -> None:
    errors = []
    for send, arrive in sink.probes:
        carry = trace.transfer_time(send - t0, PROBE_BYTES)
        errors.append((arrive - send - delay - carry) * 1000.0)
    report.delay_samples = len(errors)
    report.probes_lost = max(0, sent - len(errors))
    if not errors:
        return
    report.delay_error_ms_mean = sum(errors) / len(errors)
    report.delay_error_ms_median = sorted(errors)[len(errors) // 2]
    absolute = sorted(abs(e) for e in errors)
    report.delay_error_ms_p95 = absolute[min(len(absolute) - 1, int(0.95 * len(absolute)))]
    report.delay_error_ms_max = absolute[-1]
