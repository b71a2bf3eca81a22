"""Cloud defaults, measured side by side: torch threads under load, and the first request.

1. **Threads under load.** A cifar_resnet20 tail (split ``layer1.2``, batch 1) timed with
   torch's default thread count and with ``torch_threads = 1`` (the new default) while
   ``--load`` busy-loop processes compete for the cores (the situation of a shared server).
2. **First request.** A fresh process starts the in-process cloud twin (the same core as
   ``tether cloud``) on a cifar_resnet20 bundle and sends one request; the reply's
   ``queue_s`` and ``tail_s`` are recorded, with tails only built at start (the old
   behaviour) and with the new warm-up (each tail run once on a dummy batch before ready).
   Each variant runs in ``--runs`` fresh processes.

    python bench/cloud_threads_warmup.py --load 2 --runs 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLIT = "layer1.2"


def _spin() -> None:
    while True:
        pass


def time_tail(threads: int, samples: int) -> list[float]:
    import torch

    from tether.partitioner import load_model, split_at
    if threads:
        torch.set_num_threads(threads)
    module = load_model("cifar_resnet20").module.eval()
    x = torch.rand(1, 3, 32, 32)
    head, tail = split_at(module, x, SPLIT)
    z = head(x)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            tail(z)
        for _ in range(samples):
            t0 = time.perf_counter()
            tail(z)
            times.append(time.perf_counter() - t0)
    return times


def threads_under_load(load: int, samples: int) -> dict[str, float]:
    import torch
    default = torch.get_num_threads()
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
    for p in spinners:
        p.start()
    try:
        out = {}
        for label, threads in ((f"default ({default} threads)", 0), ("torch_threads = 1", 1)):
            cmd = [sys.executable, __file__, "--child-tail", str(threads), "--samples",
                   str(samples)]
            times = json.loads(subprocess.check_output(cmd, text=True).splitlines()[-1])
            out[label] = statistics.median(times) * 1e3
            out[label + " p90"] = sorted(times)[int(0.9 * (len(times) - 1))] * 1e3
        return out
    finally:
        for p in spinners:
            p.terminate()


def first_request(warm: bool) -> dict[str, float]:
    """In this (fresh) process: start the cloud twin, send one request, return its timings."""
    import asyncio

    import torch

    from tether.cloud import CloudConfig, ServedBundle
    from tether.cloud.twin import InProcessCloud
    from tether.codecs import make_codec
    from tether.core import protocol as P
    from tether.partitioner import export_bundle, load_model, split_at

    torch.set_num_threads(1)
    bundle_dir = Path(os.environ["BENCH_BUNDLE"])
    served = ServedBundle.load(bundle_dir)
    if not warm:                               # the old behaviour: build tails, do not run them
        served._run_once = lambda split, tail: None
    x = torch.rand(1, 3, 32, 32)
    module = load_model("cifar_resnet20").module
    z = split_at(module, x, SPLIT)[0](x)
    enc = make_codec("fp32").encode(z)

    infer = P.Infer(2, served.fingerprint, SPLIT, "fp32", enc.header, 10.0, tuple(enc.payload))

    async def twin() -> P.Result:
        cloud = InProcessCloud([served], CloudConfig(max_queue_delay_s=0.0))
        t0 = time.perf_counter()
        await cloud.start()
        start_s = time.perf_counter() - t0
        await cloud.request(P.Hello(1, "bench"))
        reply = await cloud.request(infer)
        await cloud.close()
        return reply, start_s

    async def sockets() -> P.Result:
        import zmq
        import zmq.asyncio
        from prometheus_client import CollectorRegistry

        from tether.cloud.server import CloudServer
        from tether.core.metrics import CloudMetrics
        server = CloudServer(CloudConfig(bind="tcp://127.0.0.1:*", max_queue_delay_s=0.0),
                             [served], CloudMetrics(CollectorRegistry()))
        t0 = time.perf_counter()
        await server.start()
        start_s = time.perf_counter() - t0
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(server.endpoint)
        await sock.send_multipart(P.encode(P.Hello(1, "bench")))
        P.decode(await sock.recv_multipart())
        await sock.send_multipart(P.encode(infer))
        reply = P.decode(await sock.recv_multipart())
        sock.close(0)
        await server.stop()
        return reply, start_s

    reply, start_s = asyncio.run(sockets() if os.environ.get("BENCH_SOCKETS") else twin())
    return {"queue_ms": reply.queue_s * 1e3, "tail_ms": reply.tail_s * 1e3,
            "start_ms": start_s * 1e3}


def first_requests(runs: int, bundle: Path, sockets: bool) -> dict[str, dict[str, float]]:
    out = {}
    env = {**os.environ, "BENCH_BUNDLE": str(bundle)}
    if sockets:
        env["BENCH_SOCKETS"] = "1"
    for label, flag in (("built only (before)", "cold"), ("warmed up (after)", "warm")):
        rows = []
        for _ in range(runs):
            cmd = [sys.executable, __file__, "--child-first", flag]
            text = subprocess.check_output(cmd, text=True, env=env)
            rows.append(json.loads(text.splitlines()[-1]))
        out[label] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes (default 2)")
    ap.add_argument("--samples", type=int, default=200, help="tail timings (default 200)")
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per variant (default 5)")
    ap.add_argument("--skip-threads", action="store_true", help="only the first-request part")
    ap.add_argument("--child-tail", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-first", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_tail is not None:
        print(json.dumps(time_tail(args.child_tail, args.samples)))
        return
    if args.child_first is not None:
        print(json.dumps(first_request(args.child_first == "warm")))
        return
    import tempfile

    from tether.partitioner import export_bundle
    print(f"machine: {os.cpu_count()} CPUs, load average before {os.getloadavg()}")
    if not args.skip_threads:
        res = threads_under_load(args.load, args.samples)
        print(f"resnet20 tail at {SPLIT}, batch 1, under {args.load} busy processes (ms):")
        for k, v in res.items():
            print(f"  {k:32s} {v:8.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "r20"
        export_bundle("cifar_resnet20", bundle, splits=[SPLIT], repeats=2, warmup=0, rounds=1,
                      progress=False)
        for sockets in (False, True):
            first = first_requests(args.runs, bundle, sockets)
            where = "CloudServer over ZeroMQ" if sockets else "in-process twin"
            print(f"first request after start ({where}), median of {args.runs} fresh "
                  f"processes (ms):")
            for label, row in first.items():
                print(f"  {label:22s} queue {row['queue_ms']:7.2f}  tail "
                      f"{row['tail_ms']:7.2f}  start {row['start_ms']:7.1f}")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
