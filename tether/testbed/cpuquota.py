"""A CPU quota without root: CFS bandwidth control done in userspace with SIGSTOP/SIGCONT.

Where no cgroup CPU controller is writable (a normal user), :class:`UserspaceQuota` gives
processes the same budget a ``cpu.cfs_quota_us`` would: every ``period`` seconds they may
use ``cores * period`` seconds of CPU (all their threads together, read from the kernel's
per-process CPU clock at ~0.5 ms intervals); once spent they are stopped until the period
ends. Overshoot between two reads is carried into the next period as debt, so the long-run
share is exact; an idle process is never stopped, so it answers at once, as under a cgroup.
It runs as a daemon thread of the experiment's own process (the controller is not throttled).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from tether.core.errors import ConfigError, PlatformError

log = logging.getLogger(__name__)

#: Period of the budget: like the kernel throttle, short enough to spread the work evenly.
PERIOD_S = 0.02
POLL_S = 0.0005
CPUCLOCK_SCHED = 2


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by every thread of ``pid`` (the kernel's process clock)."""
    return time.clock_gettime(((~pid) << 3) | CPUCLOCK_SCHED)


def supported() -> bool:
    """True where another process's CPU clock can be read (Linux)."""
    try:
        process_cpu_seconds(os.getpid())
        return hasattr(signal, "SIGSTOP")
    except (OSError, AttributeError, ValueError):
        return False


class UserspaceQuota:
    """Throttle a set of processes to ``cores`` CPUs (e.g. 0.05) until :meth:`close`."""

    def __init__(self, cores: float, period_s: float = PERIOD_S, poll_s: float = POLL_S) -> None:
        if not 0 < cores < 64 or not 0 < poll_s < period_s:
            raise ConfigError(f"userspace CPU quota: need 0 < cores ({cores}) and "
                              f"0 < poll ({poll_s}) < period ({period_s})")
        if not supported():
            raise PlatformError("no per-process CPU clock here: a userspace CPU quota needs "
                                "Linux; run without cpu_quota")
        self.cores, self.period, self.poll = cores, period_s, poll_s
        self._pids: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stopped_seconds = 0.0       # time the processes spent stopped (cf. cpu.stat)
        self.periods = self.throttled_periods = 0
        self._thread = threading.Thread(target=self._run, name="cpu-quota", daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        """Put ``pid`` (and all its threads) under the quota."""
        with self._lock:
            self._pids.append(pid)

    def _cpu(self) -> float:
        total = 0.0
        for pid in list(self._pids):
            try:
                total += process_cpu_seconds(pid)
            except OSError:               # exited: it uses no more CPU
                with self._lock:
                    self._pids.remove(pid)
        return total

    def _signal(self, sig: int) -> None:
        for pid in list(self._pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _run(self) -> None:
        debt, used_before = 0.0, self._cpu()
        while not self._stop.is_set():
            end = time.monotonic() + self.period
            budget = self.cores * self.period - debt
            self.periods += 1
            while time.monotonic() < end and not self._stop.is_set():
                if self._cpu() - used_before >= budget:
                    self._pause_until(end)
                    break
                time.sleep(self.poll)
            used_now = self._cpu()
            debt = max(0.0, used_now - used_before - budget)
            used_before = used_now

    def _pause_until(self, end: float) -> None:
        self.throttled_periods += 1
        t0 = time.monotonic()
        self._signal(signal.SIGSTOP)
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                time.sleep(min(self.poll * 4, max(0.0, end - time.monotonic())))
        finally:
            self._signal(signal.SIGCONT)
            self.stopped_seconds += time.monotonic() - t0

    def stats(self) -> dict[str, float]:
        return {"nr_periods": self.periods, "nr_throttled": self.throttled_periods,
                "throttled_seconds": round(self.stopped_seconds, 6)}

    def close(self) -> None:
        """Stop throttling (the processes are resumed)."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._signal(signal.SIGCONT)
