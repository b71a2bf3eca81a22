"""CPU the edge daemon spends per request beyond the model, per policy, on a real `tether cloud`.

    .venv/bin/python bench/edge_cpu.py --bundle tether-demo/bundle [--requests 300]

On a CPU-quota'd edge every millisecond of the daemon's own CPU (parsing, the policy, the
record, the sockets) costs ``1 / quota`` milliseconds of wall time (x11 at the demo's 0.09
core) before or between the model's work. One `tether cloud` and, per policy, one `tether edge`
process on 127.0.0.1 (unthrottled, no link emulation); one client sends ``--requests`` images one
at a time, 20 ms apart. Per policy it prints the edge process's CPU per request (all threads,
from /proc schedstat), that of its main thread (the event loop: parsing, the policy, the
records, the replies) and the rest (the compute thread's ONNX Runtime and codecs, ZeroMQ's I/O
threads). Policies alternate in rounds (``--rounds``)
so machine drift hits them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from tether.testbed.procs import free_port   # noqa: E402
from tether.edge.client import EdgeClient   # noqa: E402

POLICIES = ("local", "cloud", "neurosurgeon", "adaptive")
PAUSE_S = 0.02
def thread_cpu(pid: int) -> tuple[float, float]:
    """(all threads, the main thread) CPU seconds of ``pid``, from /proc/PID/task/*/schedstat.
    The main thread (task id = pid) runs the event loop: parsing, the policy, the records,
    the replies; the others are the compute thread and ZeroMQ's I/O threads."""
    total = main = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue                                   # a thread that just ended
        total += ns
        main += ns if task.name == str(pid) else 0
    return total / 1e9, main / 1e9


def _start(args: list[str], log: Path, ready: str, timeout: float = 120.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tether", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready in log.read_text():
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"{args[0]} exited: see {log}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{args[0]} not ready after {timeout:.0f} s: see {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _edge_config(tmp: Path, bundle: Path, cloud: str, policy: str) -> tuple[Path, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    budget = "\nmax_accuracy_drop = 0.02" if policy != "local" else ""
    path = tmp / f"edge-{policy}.toml"
    path.write_text(f'[edge]\nbundle = "{bundle}"\nlisten = "{endpoint}"\nedge_id = "{policy}"\n'
                    f'records = "{tmp / (policy + ".csv")}"\n\n[link]\nconnect = "{cloud}"\n\n'
                    f'[policy]\nname = "{policy}"{budget}\n')
    return path, endpoint


def measure(tmp: Path, bundle: Path, cloud: str, policy: str, requests: int,
            images: np.ndarray) -> tuple[float, float, dict[str, int]]:
    """(edge CPU ms per request, its event loop's CPU ms per request, actions taken)."""
    config, endpoint = _edge_config(tmp, bundle, cloud, policy)
    edge = _start(["edge", "--config", str(config)], tmp / f"edge-{policy}.log", "serving")
    try:
        with EdgeClient(endpoint, timeout=30.0) as client:
            for i in range(20):                        # warm: sessions, caches, the link
                client.infer(images[i % len(images)])
            actions: dict[str, int] = {}
            cpu0, loop0 = thread_cpu(edge.pid)
            for i in range(requests):
                answer = client.infer(images[i % len(images)])
                actions[answer.action] = actions.get(answer.action, 0) + 1
                time.sleep(PAUSE_S)
            cpu1, loop1 = thread_cpu(edge.pid)
            cpu, loop = cpu1 - cpu0, loop1 - loop0
    finally:
        _stop(edge)
    # the client's pauses leave the daemon idle: its heartbeats' CPU counts too (a real edge
    # pays them), a few microseconds per request
    return cpu / requests * 1e3, loop / requests * 1e3, actions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--requests", type=int, default=300, help="per policy and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--policies", default=",".join(POLICIES))
    args = p.parse_args()
    policies = [x for x in args.policies.split(",") if x]
    from tether.core.bundle import Manifest
    shape = Manifest.load(args.bundle).input.shape      # (1, C, H, W)
    images = np.random.default_rng(0).integers(0, 256, (16, shape[2], shape[3], shape[1]),
                                               dtype=np.uint8)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in policies}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        (tmp / "cloud.toml").write_text(f'[cloud]\nbundles = ["{args.bundle.resolve()}"]\n'
                                        f'bind = "tcp://127.0.0.1:{port}"\ntorch_threads = 1\n')
        cloud = _start(["cloud", "--config", str(tmp / "cloud.toml")], tmp / "cloud.log", "ready")
        try:
            for _ in range(args.rounds):
                for name in policies:
                    cpu, loop, actions = measure(tmp, args.bundle.resolve(),
                                                 f"tcp://127.0.0.1:{port}", name,
                                                 args.requests, images)
                    results[name].append((cpu, loop))
                    print(f"  {name:13s} {cpu:6.2f} ms CPU/request, event loop {loop:5.2f} ms, "
                          f"other threads {cpu - loop:6.2f} ms  {actions}", flush=True)
        finally:
            _stop(cloud)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; {args.requests} requests x {args.rounds} rounds")
    print(f"{'policy':13s} {'edge CPU ms':>11s} {'event loop ms':>13s} {'other ms':>8s}  "
          "(per request, median of rounds)")
    for name, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        loop = statistics.median(r[1] for r in rows)
        print(f"{name:13s} {cpu:11.2f} {loop:13.2f} {cpu - loop:8.2f}")


if __name__ == "__main__":
    main()
