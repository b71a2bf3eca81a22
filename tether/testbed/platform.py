"""What this machine can do (probed at start) and the weak-edge CPU throttle.

:func:`probe` checks root, network namespaces, ``tc`` tbf and netem (by trying them in a
throw-away namespace), and the cgroup CPU controller. :class:`CpuThrottle` puts edge
processes under a CPU quota: cgroup v1 ``cpu.cfs_quota_us`` or cgroup v2 ``cpu.max`` where
writable, plus CPU pinning; without one (not root) the same budget is enforced in userspace
(:class:`tether.testbed.cpuquota.UserspaceQuota`, SIGSTOP/SIGCONT), else only thread limits
(one intra-op thread); :attr:`CpuThrottle.mode` says which.
"""

from __future__ import annotations

import logging
import math
import os
import platform as _platform
import shutil
import subprocess
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tether.core.errors import ConfigError, PlatformError

log = logging.getLogger(__name__)

#: A short period spreads the quota finely, so a throttled edge is uniformly slower (like a
#: weaker CPU) instead of running at full speed and then stalling for most of 100 ms.
CFS_PERIOD_US = 10_000
#: Environment that limits a process's math libraries to one thread (the fallback).
#: The kernel's limits on ``cpu.cfs_quota_us`` (min 1 ms) and ``cpu.cfs_period_us`` (max 1 s).
MIN_QUOTA_US, MAX_PERIOD_US = 1000, 1_000_000
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class PlatformInfo:
    """Capabilities found at start; every testbed result records them."""

    kernel: str
    root: bool
    cpus: int
    netns: bool
    tc_tbf: bool
    netem: bool
    cgroup: str                 # "v1", "v2" or "none" (a writable CPU controller)
    cgroup_cpu_path: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(cmd: list[str], timeout: float = 5.0) -> bool:
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _probe_qdiscs() -> tuple[bool, bool, bool]:
    """(netns, tbf, netem) by trying them on ``lo`` inside a throw-away namespace."""
    if not shutil.which("ip") or not shutil.which("tc"):
        return False, False, False
    ns = f"tether-probe-{uuid.uuid4().hex[:8]}"
    if not _run(["ip", "netns", "add", ns]):
        return False, False, False
    try:
        exec_ns = ["ip", "netns", "exec", ns]
        tbf = _run(exec_ns + ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit",
                              "burst", "32kbit", "latency", "50ms"])
        _run(exec_ns + ["tc", "qdisc", "del", "dev", "lo", "root"])
        netem = _run(exec_ns + ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        return True, tbf, netem
    finally:
        _run(["ip", "netns", "del", ns])


def _cgroup_cpu() -> tuple[str, str]:
    """The writable CPU controller: ("v1", path), ("v2", path) or ("none", "")."""
    mounts = Path("/proc/mounts").read_text().splitlines() if Path("/proc/mounts").exists() else []
    v2_path = ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[2] == "cgroup" and "cpu" in parts[3].split(","):
            if os.access(parts[1], os.W_OK):
                return "v1", parts[1]
        if parts[2] == "cgroup2":
            v2_path = parts[1]
    if v2_path:
        controllers = Path(v2_path, "cgroup.controllers")
        if controllers.exists() and "cpu" in controllers.read_text().split() \
                and os.access(v2_path, os.W_OK):
            return "v2", v2_path
    return "none", ""


def probe(network: bool = True) -> PlatformInfo:
    """Probe the machine once at start (``network=False`` skips the netns/tc checks)."""
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
    netns = tbf = netem = False
    if network and root:
        netns, tbf, netem = _probe_qdiscs()
    cgroup, path = _cgroup_cpu() if root else ("none", "")
    notes = []
    if not root:
        notes.append("not root: no kernel link backend, CPU quota enforced in userspace "
                     "(SIGSTOP/SIGCONT on the process CPU clock)")
    elif network and not netem:
        notes.append("tc netem unavailable in this kernel: delay/loss/trace replay use the "
                     "userspace link; the kernel backend shapes rate only (tbf)")
    if root and cgroup == "none":
        notes.append("no writable cgroup CPU controller: CPU throttle falls back to thread limits")
    return PlatformInfo(kernel=_platform.release(), root=root, cpus=os.cpu_count() or 1,
                        netns=netns, tc_tbf=tbf, netem=netem, cgroup=cgroup,
                        cgroup_cpu_path=path, notes=tuple(notes))


def quota_period(cores: float) -> tuple[int, int]:
    """CFS ``(quota_us, period_us)`` enforcing exactly ``cores`` (to 1 us).

    The kernel refuses quotas under 1 ms and periods over 1 s, so a small share lengthens
    the period (0.05 core: 1 ms every 20 ms) instead of silently raising the quota; below
    what a 1 s period can express it is an error, never a different quota than requested.
    """
    period = max(CFS_PERIOD_US, math.ceil(MIN_QUOTA_US / cores))
    if period > MAX_PERIOD_US:
        raise ConfigError(f"cpu quota {cores} cores is below what the kernel can enforce "
                          f"({MIN_QUOTA_US / MAX_PERIOD_US} cores: 1 ms per 1 s period)")
    quota = int(round(cores * period))
    if abs(quota / period - cores) > 1e-3 * cores:
        raise ConfigError(f"cpu quota {cores} cores cannot be expressed as a CFS quota/period")
    return quota, period


def _threads(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (just ``pid`` where /proc cannot tell)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")] or [pid]
    except OSError:
        return [pid]


class CpuThrottle:
    """A CPU quota (in cores, e.g. 0.5) and optional pinning for a group of processes."""

    def __init__(self, name: str, cores: float | None, pin: tuple[int, ...] = (),
                 info: PlatformInfo | None = None) -> None:
        if cores is not None and cores <= 0:
            raise ConfigError(f"cpu quota must be > 0 cores (or unset), got {cores}")
        if cores is not None:
            quota_period(cores)   # refuse what the kernel cannot enforce before anything starts
        self.cores, self.pin = cores, tuple(pin)
        self.info = info or probe(network=False)
        self.mode = "none"
        self.path: Path | None = None
        self.applied_cores: float | None = None   # what the kernel enforces (cgroup modes)
        self._userspace = None                     # a UserspaceQuota (mode "userspace")
        if cores is not None:
            self.mode = self._create(name, cores)

    def _create(self, name: str, cores: float) -> str:
        kind, base = self.info.cgroup, self.info.cgroup_cpu_path
        if kind == "none":
            from tether.testbed.cpuquota import UserspaceQuota, supported
            if supported():
                self._userspace = UserspaceQuota(cores)
                self.applied_cores = cores
                return "userspace"
            log.warning("no writable cgroup CPU controller: throttling by thread limits only")
            return "threads"
        path = Path(base) / f"tether-{name}-{os.getpid()}"
        try:
            path.mkdir(exist_ok=True)
            quota, period = quota_period(cores)
            if kind == "v1":
                (path / "cpu.cfs_period_us").write_text(str(period))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (path / "cpu.max").write_text(f"{quota} {period}")
            self.applied_cores = quota / period
        except OSError as exc:
            raise PlatformError(f"cannot set up cgroup {path}: {exc}; run without cpu_quota "
                                "or as root") from exc
        self.path = path
        return f"cgroup-{kind}"

    def env(self) -> dict[str, str]:
        """Environment for throttled processes (thread limits always apply)."""
        return dict(THREAD_ENV) if self.cores is not None or self.pin else {}

    def add(self, pid: int) -> None:
        """Put process ``pid`` under the quota and pinning."""
        if self.pin:
            try:   # every thread it has started (later ones inherit from their creator)
                for tid in _threads(pid):
                    os.sched_setaffinity(tid, set(self.pin))
            except (OSError, AttributeError) as exc:
                raise PlatformError(f"cannot pin pid {pid} to CPUs {self.pin}: {exc}") from exc
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))
        if self._userspace is not None:
            self._userspace.add(pid)

    def stats(self) -> dict[str, float]:
        """The group's ``cpu.stat`` counters (periods, throttled periods and time), if any."""
        if self._userspace is not None:
            return self._userspace.stats()
        if self.path is None or not (self.path / "cpu.stat").exists():
            return {}
        pairs = (line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return {k: int(v) for k, v in pairs}

    def describe(self) -> dict[str, Any]:
        return {"cpu_quota_cores": self.cores, "cpu_quota_applied_cores": self.applied_cores,
                "cpu_pin": list(self.pin), "throttle": self.mode}

    def close(self) -> None:
        """Remove the cgroup (its processes must have exited) or stop the userspace quota."""
        if self._userspace is not None:
            self._userspace.close()
            self._userspace = None
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", self.path, exc)
            self.path = None
