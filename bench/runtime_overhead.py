"""Per-request overhead of tether's runtime on loopback vs a bare pyzmq ROUTER/DEALER round trip.

    .venv/bin/python bench/runtime_overhead.py [--rounds 10] [--per-round 100]

Both servers run in their own process; one DEALER client sends requests one at a time.
tether: fp32 codec encode + protocol encode on the client, decode + admission + queue +
compute thread (a trivial tail: 10 values back) + RESULT on the cloud, decode of the logits
on the client (a numpy view, as the edge's link reads them). Bare: the same payload bytes out and a reply of the same frame sizes back,
no parsing. Rounds alternate between the servers so machine noise hits all alike. Besides
wall-clock latency it reports CPU time per request (client + server process, all threads,
from /proc schedstat): on a shared, oversubscribed machine that is the load-independent
part of the overhead.
Targets (issue 13): for payloads <= 16 KB, tether median <= 0.6 ms and median ratio <= 2.0
(stretch 1.5); the last lines say which are met in this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
import zmq

from _cloud_common import bare_server, cpu_seconds, start, stop, tether_server

from tether.codecs import make_codec
from tether.core import protocol as P

SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)


def tether_round(sock: zmq.Socket, fp: str, x: torch.Tensor, n: int, ids: list[int]) -> list[float]:
    codec = make_codec("fp32")
    out = []
    for _ in range(n):
        ids[0] += 1
        t0 = time.perf_counter()
        enc = codec.encode(x)
        sock.send_multipart(P.encode(P.Infer(ids[0], fp, "input", "fp32", enc.header, 5.0,
                                             tuple(enc.payload))), copy=False)
        reply = P.decode(sock.recv_multipart())
        if not isinstance(reply, P.Result):
            raise RuntimeError(f"unexpected reply {reply}")
        desc = reply.tensors[0]
        np.frombuffer(reply.payload[0], dtype=desc.dtype).reshape(desc.shape).astype(np.float32)
        out.append(time.perf_counter() - t0)
    return out


def bare_round(sock: zmq.Socket, x: torch.Tensor, n: int) -> list[float]:
    payload = memoryview(x.numpy()).cast("B")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.send_multipart([payload], copy=False)
        sock.recv_multipart()
        out.append(time.perf_counter() - t0)
    return out


def measure(socks: dict[str, zmq.Socket], pids: dict[str, int], fp: str, x: torch.Tensor,
            per: int, rounds: int, ids: list[int]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Latencies and CPU seconds per configuration; one warm-up round, then alternating rounds."""
    lat: dict[str, list[float]] = {name: [] for name in socks}
    cpu = {name: 0.0 for name in socks}
    for warm in (True,) + (False,) * rounds:
        for name, sock in socks.items():
            c0 = cpu_seconds() + cpu_seconds(pids[name])
            got = bare_round(sock, x, per) if name == "bare" else tether_round(sock, fp, x, per, ids)
            if not warm:
                lat[name] += got
                cpu[name] += cpu_seconds() + cpu_seconds(pids[name]) - c0
    return lat, cpu


def reply_shape() -> list[bytes]:
    logits = P.TensorDesc((1, 10), "float32")
    frames = P.encode(P.Result(1 << 40, (logits,), (bytes(logits.nbytes),), 1e-5, 1e-5, 1e-5, 1))
    return [bytes(f) for f in frames]


def stats(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.median(a)), float(np.percentile(a, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fps = {n: f"{n:064x}" for n in SIZES}
    specs = [(fps[n], (1, n // 4)) for n in SIZES]
    servers = {   # the default config, and the same with every batch on a compute thread
        "tether": start(tether_server, specs, {"torch_threads": 1}, None),
        "thread": start(tether_server, specs, {"torch_threads": 1, "inline_compute_s": 0.0}, None),
    }
    bproc, bend = start(bare_server, reply_shape())
    ctx = zmq.Context()
    socks = {name: ctx.socket(zmq.DEALER) for name in (*servers, "bare")}
    for name, sock in socks.items():
        sock.connect(bend if name == "bare" else servers[name][1])
    ids = [0]
    pids = {"bare": bproc.pid, **{k: v[0].pid for k, v in servers.items()}}
    print(f"machine: {platform.machine()} cpus={len(os.sched_getaffinity(0))} "
          f"load={os.getloadavg()[0]:.1f} python {platform.python_version()} "
          f"pyzmq {zmq.__version__} libzmq {zmq.zmq_version()}")
    print("ms per request; 'tether' = default config (tiny batches inline on the event loop), "
          "'thread' = inline_compute_s=0 (every batch on a compute thread); ratio = median / bare median")
    print("CPU us/request = client + server CPU time per request (all threads); cpu ratio = "
          "tether / bare")
    print(f"{'payload':>8} {'bare med':>9} {'p99':>7} | {'tether med':>10} {'p99':>7} {'ratio':>6} | "
          f"{'thread med':>10} {'p99':>7} {'ratio':>6} | {'cpu us: bare':>6} {'tether':>6} "
          f"{'thread':>6} {'ratio':>6}")
    small: list[tuple[float, float]] = []
    try:
        for n in SIZES:
            per = max(20, args.per_round if n <= 64 << 10 else args.per_round // 4)
            lat, cpu = measure(socks, pids, fps[n], torch.rand(1, n // 4), per, args.rounds, ids)
            (bm, bp), (tm, tp), (hm, hp) = (stats(lat[k]) for k in ("bare", "tether", "thread"))
            us = {k: cpu[k] / len(lat[k]) * 1e6 for k in cpu}
            print(f"{n // 1024:>6}KB {bm:>9.3f} {bp:>7.3f} | {tm:>10.3f} {tp:>7.3f} {tm / bm:>6.2f} | "
                  f"{hm:>10.3f} {hp:>7.3f} {hm / bm:>6.2f} | {us['bare']:>6.0f} {us['tether']:>6.0f} "
                  f"{us['thread']:>6.0f} {us['tether'] / us['bare']:>6.2f}", flush=True)
            if n <= 16 << 10:
                small.append((tm, tm / bm))
    finally:
        for sock in socks.values():
            sock.close(0)
        ctx.term()
        for proc, _ in servers.values():
            stop(proc)
        stop(bproc)
    report_targets(small)


def report_targets(small: list[tuple[float, float]]) -> None:
    """Met / missed for payloads <= 16 KB (median <= 0.6 ms, ratio <= 2.0, stretch 1.5)."""
    if not small:
        return
    worst_ms, worst_ratio = max(m for m, _ in small), max(r for _, r in small)
    print(f"payloads <= 16 KB: worst median {worst_ms:.3f} ms (target <= 0.6: "
          f"{'met' if worst_ms <= 0.6 else 'missed'}), worst ratio {worst_ratio:.2f} "
          f"(target <= 2.0: {'met' if worst_ratio <= 2.0 else 'missed'}; stretch 1.5: "
          f"{'met' if worst_ratio <= 1.5 else 'missed'}); load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
