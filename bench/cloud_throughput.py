"""Cloud throughput with 16 concurrent edges: dynamic batching on vs off, same tail.

    .venv/bin/python bench/cloud_throughput.py [--edges 16] [--seconds 6] [--rounds 2]
                                               [--splits layer1.2 layer3.1]

Per split point of cifar_resnet20 (``layer1.2``: a heavy tail, layer2+layer3+pool+fc, 64 KB
fp32 per request; ``layer3.1``: a light tail, 16 KB), two `CloudServer` processes serve the
same tail, one with ``max_batch_size=16``, one with ``max_batch_size=1``; both with one
compute thread and one torch thread. The load process drives ``--edges`` DEALER sockets in
closed loop (one request outstanding per edge). Rounds alternate between the two servers so
machine noise hits both alike. Besides requests/s it reports requests per CPU-second of the
server process (all threads): on a shared machine that is the load-independent capacity. For
context it first measures the tail alone in this process: per-sample time at batch 1 vs
batch 16 is the most batching can give on this CPU.
Target: batching on >= 3x the requests/s of batching off.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
import zmq

from _cloud_common import cpu_seconds, start, stop, tether_server

from tether.codecs import make_codec
from tether.core import protocol as P

MODEL = "cifar_resnet20"


def drive(endpoint: str, fingerprint: str, split: str, edges: int, seconds: float,
          server_pid: int) -> dict[str, float]:
    """Closed-loop load from ``edges`` DEALERs; returns requests/s, latency and batch sizes."""
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(edges)]
    poller = zmq.Poller()
    for s in socks:
        s.linger = 0
        s.connect(endpoint)
        poller.register(s, zmq.POLLIN)
    enc = make_codec("fp32").encode(crossing(split))
    rid = 0
    sent_at: dict[int, float] = {}

    def send(s: zmq.Socket) -> None:
        nonlocal rid
        rid += 1
        sent_at[rid] = time.perf_counter()
        s.send_multipart(P.encode(P.Infer(rid, fingerprint, split, "fp32", enc.header, 10.0,
                                          tuple(enc.payload))), copy=False)

    for s in socks:
        send(s)
    done, lat, batches, tails, t_end = 0, [], [], [], time.perf_counter() + seconds
    t0, cpu0 = time.perf_counter(), cpu_seconds(server_pid)
    while time.perf_counter() < t_end:
        for s, _ in poller.poll(1000):
            reply = P.decode(s.recv_multipart())
            if not isinstance(reply, P.Result):
                raise RuntimeError(f"unexpected reply {reply}")
            lat.append(time.perf_counter() - sent_at.pop(reply.request_id))
            batches.append(reply.batch_size)
            tails.append(reply.tail_s / reply.batch_size)
            done += 1
            send(s)
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server_pid) - cpu0
    _close(ctx, socks)
    return {"rps": done / elapsed, "per_cpu_s": done / cpu, "p50_ms": float(np.median(lat) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "batch": float(np.mean(batches)),
            "tail_ms_per_request": float(np.mean(tails) * 1e3)}


def _close(ctx: zmq.Context, socks: list[zmq.Socket]) -> None:
    """Wait for each edge's last answer (so the next run starts idle), then close."""
    for s in socks:
        if s.poll(5000):
            s.recv_multipart()
        s.close(0)
    ctx.term()


def crossing(split: str) -> torch.Tensor:
    from tether.partitioner import load_model, split_at
    module = load_model(MODEL).module.eval()
    with torch.inference_mode():
        return split_at(module, torch.zeros(1, 3, 32, 32), split)[0](torch.rand(1, 3, 32, 32))


def compute_ceiling(split: str) -> float:
    """Per-sample tail time at batch 1 over batch 16, measured here (no runtime)."""
    from tether.partitioner import load_model, split_at
    module = load_model(MODEL).module.eval()
    tail = split_at(module, torch.zeros(1, 3, 32, 32), split)[1]
    z = crossing(split)
    per_sample = {}
    with torch.inference_mode():
        for b, n in ((1, 60), (16, 8)):
            x = z.repeat(b, *[1] * (z.dim() - 1))
            for _ in range(3):
                tail(x)
            t0 = time.perf_counter()
            for _ in range(n):
                tail(x)
            per_sample[b] = (time.perf_counter() - t0) / n / b
    return per_sample[1] / per_sample[16]


def run_split(split: str, fp: str, args: argparse.Namespace) -> float:
    common = {"torch_threads": 1, "workers": 1, "max_queue": 1024}
    if args.inline_compute_s is not None:
        common["inline_compute_s"] = args.inline_compute_s
    servers = {
        "batching on (max 16)": start(tether_server, [(fp, ())], {**common, "max_batch_size": 16},
                                      (MODEL, split)),
        "batching off": start(tether_server, [(fp, ())], {**common, "max_batch_size": 1},
                              (MODEL, split)),
    }
    results: dict[str, list[dict[str, float]]] = {k: [] for k in servers}
    print(f"split {split}: tail-only per-sample speed-up batch 16 vs 1 = "
          f"{compute_ceiling(split):.2f}x", flush=True)
    try:
        for _ in range(args.rounds):
            for name, (proc, endpoint) in servers.items():
                drive(endpoint, fp, split, args.edges, 1.0, proc.pid)      # warm up
                r = drive(endpoint, fp, split, args.edges, args.seconds, proc.pid)
                results[name].append(r)
                print(f"  {name:<22} {r['rps']:8.1f} req/s {r['per_cpu_s']:7.1f} req/CPU-s  "
                      f"p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  mean batch {r['batch']:5.2f}  "
                      f"tail/request {r['tail_ms_per_request']:5.2f} ms", flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    on, off = (sum(r["rps"] for r in results[k]) / len(results[k]) for k in servers)
    con, coff = (sum(r["per_cpu_s"] for r in results[k]) / len(results[k]) for k in servers)
    print(f"  mean req/s: on {on:.1f}, off {off:.1f}; ratio on/off = {on / off:.2f}x (target >= 3x)")
    print(f"  requests per server CPU-second: on {con:.1f}, off {coff:.1f}; ratio {con / coff:.2f}x")
    return on / off


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--splits", nargs="+", default=["layer1.2", "layer3.1"])
    ap.add_argument("--inline-compute-s", type=float, default=None,
                    help="CloudConfig.inline_compute_s for both servers (default: the config's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tether.partitioner import load_model
    fp = load_model(MODEL).fingerprint
    print(f"machine: {platform.machine()} cpus={len(os.sched_getaffinity(0))} "
          f"load={os.getloadavg()[0]:.1f} python {platform.python_version()} torch "
          f"{torch.__version__}; {args.edges} edges, {MODEL}")
    for split in args.splits:
        run_split(split, fp, args)


if __name__ == "__main__":
    main()
