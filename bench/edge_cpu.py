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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cloud_common import cpu_seconds   # noqa: E402

from tether.edge.client import EdgeClient   # noqa: E402
from tether.testbed.procs import ProcessGroup, free_port, port_open, tether_command  # noqa: E402

POLICIES = ("local", "cloud", "neurosurgeon", "adaptive")
PAUSE_S = 0.02


def _serve(group: ProcessGroup, name: str, config: Path, port: int) -> int:
    """Start ``tether <name> --config``; return its pid once its port accepts."""
    proc = group.start(name, tether_command(name.split("-")[0], "--config", str(config)))
    group.wait_until(name, lambda: port_open("127.0.0.1", port), 120.0, "listening")
    return proc.pid


def _edge_config(tmp: Path, bundle: Path, cloud: str, policy: str) -> tuple[Path, int]:
    port = free_port()
    budget = "\nmax_accuracy_drop = 0.02" if policy != "local" else ""
    path = tmp / f"edge-{policy}.toml"
    path.write_text(f'[edge]\nbundle = "{bundle}"\nlisten = "tcp://127.0.0.1:{port}"\n'
                    f'edge_id = "{policy}"\nrecords = "{tmp / (policy + ".csv")}"\n\n'
                    f'[link]\nconnect = "{cloud}"\n\n[policy]\nname = "{policy}"{budget}\n')
    return path, port


def measure(group: ProcessGroup, tmp: Path, bundle: Path, cloud: str, policy: str,
            requests: int, images: np.ndarray) -> tuple[float, float, dict[str, int]]:
    """(edge CPU ms per request, its event loop's CPU ms per request, actions taken)."""
    config, port = _edge_config(tmp, bundle, cloud, policy)
    name = f"edge-{policy}"
    pid = _serve(group, name, config, port)
    try:
        with EdgeClient(f"tcp://127.0.0.1:{port}", timeout=30.0) as client:
            for i in range(20):                        # warm: sessions, caches, the link
                client.infer(images[i % len(images)])
            actions: dict[str, int] = {}
            cpu0, loop0 = cpu_seconds(pid), cpu_seconds(pid, main_only=True)
            for i in range(requests):
                answer = client.infer(images[i % len(images)])
                actions[answer.action] = actions.get(answer.action, 0) + 1
                time.sleep(PAUSE_S)
            cpu, loop = cpu_seconds(pid) - cpu0, cpu_seconds(pid, main_only=True) - loop0
    finally:
        group.stop(name)
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
    with tempfile.TemporaryDirectory() as d, ProcessGroup(Path(d) / "logs") as group:
        tmp = Path(d)
        port = free_port()
        cloud = f"tcp://127.0.0.1:{port}"
        (tmp / "cloud.toml").write_text(f'[cloud]\nbundles = ["{args.bundle.resolve()}"]\n'
                                        f'bind = "{cloud}"\ntorch_threads = 1\n')
        _serve(group, "cloud", tmp / "cloud.toml", port)
        for _ in range(args.rounds):
            for name in policies:
                cpu, loop, actions = measure(group, tmp, args.bundle.resolve(), cloud, name,
                                             args.requests, images)
                results[name].append((cpu, loop))
                print(f"  {name:13s} {cpu:6.2f} ms CPU/request, event loop {loop:5.2f} ms, "
                      f"other threads {cpu - loop:6.2f} ms  {actions}", flush=True)
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
