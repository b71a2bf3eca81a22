"""Probes, the CPU throttle and the kernel link backend (root-only parts skip otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tether.core import traces
from tether.core.errors import ConfigError, PlatformError
from tether.testbed.calibrate import calibrate
from tether.testbed.link import LinkConfig
from tether.testbed.platform import CpuThrottle, probe

INFO = probe()
needs_cgroup = pytest.mark.skipif(INFO.cgroup == "none", reason="no writable cgroup CPU controller")
needs_kernel_link = pytest.mark.skipif(not (INFO.root and INFO.netns and INFO.tc_tbf),
                                       reason="needs root, network namespaces and tc tbf")


def test_probe_reports_the_machine():
    assert INFO.kernel and INFO.cpus >= 1
    assert INFO.cgroup in ("v1", "v2", "none")
    if not INFO.netem and INFO.root:
        assert any("netem" in note for note in INFO.notes)


def test_throttle_without_quota_does_nothing():
    throttle = CpuThrottle("none", None, info=INFO)
    assert throttle.mode == "none" and throttle.env() == {}
    with pytest.raises(ConfigError):
        CpuThrottle("bad", 0.0, info=INFO)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_pinning_covers_every_thread_of_the_process():
    """A weak edge is one core: every thread already started (the compute pool, ZeroMQ's I/O
    threads) is pinned, not just the main one."""
    code = ("import threading, time, sys\n"
            "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "print('ready', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        cpu = max(os.sched_getaffinity(0))
        CpuThrottle("pin", None, pin=(cpu,), info=INFO).add(proc.pid)
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(tids) >= 2
        assert all(os.sched_getaffinity(tid) == {cpu} for tid in tids)
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.root
@needs_cgroup
def test_cgroup_quota_throttles_a_busy_process():
    throttle = CpuThrottle("test", 0.2, info=INFO)
    try:
        assert throttle.mode.startswith("cgroup") and throttle.path.is_dir()
        busy = "import time\nt = time.time()\nwhile time.time() - t < 0.6: pass\n" \
               "import resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_utime)"
        proc = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True,
                                env=os.environ | throttle.env())
        throttle.add(proc.pid)
        cpu = float(proc.communicate(timeout=30)[0])
        stats = throttle.stats()
        assert stats.get("nr_throttled", 0) > 0 or stats.get("throttled_usec", 0) > 0
        assert cpu < 0.45, f"a 0.2-core quota let a 0.6 s busy loop use {cpu:.2f} s of CPU"
    finally:
        path = throttle.path
        throttle.close()
    assert not path.exists()


@pytest.mark.root
@needs_kernel_link
def test_kernel_backend_follows_a_step_trace():
    trace = traces.steps([(1.0, 8.0), (1.0, 3.0)], name="k-steps")
    report = calibrate(trace, LinkConfig(), duration_s=2, probes=10, probe_gap_s=0.02,
                       backend="kernel")
    assert report.backend == "kernel"
    assert report.throughput_error_mean <= 0.08, report.summary()
    assert report.delay_samples == 10


@pytest.mark.root
@pytest.mark.skipif(INFO.netem or not INFO.root, reason="only where netem is missing")
def test_kernel_backend_refuses_delay_without_netem():
    from tether.testbed.kernel import KernelLink, KernelLinkConfig
    with pytest.raises(PlatformError, match="userspace"):
        KernelLink(traces.constant(5), traces.constant(5), KernelLinkConfig(delay_ms=10), INFO)


def test_small_quotas_lengthen_the_period_instead_of_raising_the_quota():
    from tether.core.errors import ConfigError
    from tether.testbed.platform import quota_period
    for cores in (0.05, 0.02, 0.1, 0.5, 1.5):
        quota, period = quota_period(cores)
        assert quota >= 1000 and period <= 1_000_000
        assert abs(quota / period - cores) < 1e-6, (cores, quota, period)
    assert quota_period(0.05) == (1000, 20000)
    with pytest.raises(ConfigError, match="below what the kernel can enforce"):
        quota_period(0.0005)
