"""The Ray pool side by side with the in-process pool (issue 12), real `tether cloud` processes.

Three measurements, one run:

1. Ray hop: 1 edge, closed loop, a 16 KB crossing with a trivial tail (cifar_resnet20 at
   ``layer3.2``: [1, 64, 8, 8] fp32 = 16 KB; the tail is pool + fc). Median latency with
   the in-process pool vs one Ray worker: the difference is what the hop adds per batch
   (front -> dispatcher -> actor -> back). Target: <= 2 ms.
2. Throughput: 16 edges, closed loop, resnet18 @224 tail from ``layer2.1`` ([1,128,28,28]):
   in-process (one compute thread), Ray with 1 worker, Ray with 2 workers (1 CPU each).
   Target: 2 workers >= 1.7x the requests/s of 1 (on a machine with cores to spare).
3. The front's ceiling: 16 edges, the trivial tail, in-process: requests/s the single
   event loop sustains (what one front can feed, however many workers are behind it).

    python bench/ray_scaling.py [--seconds 15] [--edges 16] [--out /tmp/tether-ray-bench]

Ray runs as ``--ray auto``: each Ray front starts its own local cluster. Every process is
limited to one intra-op thread so workers, not threads, are what scales.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tether.codecs import make_codec  # noqa: E402
from tether.core import protocol as P  # noqa: E402

READY = re.compile(r"tether cloud ready on (\S+)")


def bundle(out: Path, model: str, split: str, shape: tuple[int, ...] | None = None) -> Path:
    from tether.partitioner import export_bundle
    target = out / f"{model}_{split}"
    if not (target / "manifest.json").is_file():
        torch.set_num_threads(1)
        export_bundle(model, target, splits=[split], repeats=1, warmup=0, progress=False,
                      profile_all=False, input_shape=shape)
    return target


class Front:
    """One `tether cloud` process (in-process pool or ``--ray auto``)."""

    def __init__(self, bundle_dir: Path, log: Path, *extra: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "tether", "cloud", "--bundle", str(bundle_dir), "--bind",
               "tcp://127.0.0.1:0", "--torch-threads", "1", "--max-batch-size", "16", *extra]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = READY.search(line or "")
            if m:
                self.endpoint = m.group(1)
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"cloud did not start; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def drive(endpoint: str, fingerprint: str, split: str, x: torch.Tensor, edges: int,
          seconds: float) -> dict[str, float]:
    """Closed loop from ``edges`` DEALERs: requests/s, latency percentiles, batch size."""
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(edges)]
    poller = zmq.Poller()
    for s in socks:
        s.linger = 0
        s.connect(endpoint)
        poller.register(s, zmq.POLLIN)
    enc = make_codec("fp32").encode(x)
    rid, sent_at = 0, {}

    def send(s: zmq.Socket) -> None:
        nonlocal rid
        rid += 1
        sent_at[rid] = time.perf_counter()
        s.send_multipart(P.encode(P.Infer(rid, fingerprint, split, "fp32", enc.header, 30.0,
                                          tuple(enc.payload))), copy=False)

    warm_until = time.perf_counter() + min(3.0, seconds / 3)
    for s in socks:
        send(s)
    lat, batches, done, t0 = [], [], 0, None
    end = warm_until + seconds
    while time.perf_counter() < end:
        for s, _ in poller.poll(1000):
            reply = P.decode(s.recv_multipart())
            if not isinstance(reply, P.Result):
                raise RuntimeError(f"unexpected reply {reply}")
            now = time.perf_counter()
            if now >= warm_until:
                t0 = t0 or now
                lat.append(now - sent_at.pop(reply.request_id))
                batches.append(reply.batch_size)
                done += 1
            send(s)
    elapsed = time.perf_counter() - (t0 or end)
    for s in socks:
        if s.poll(10000):
            s.recv_multipart()
        s.close(0)
    ctx.term()
    return {"rps": done / elapsed, "p50_ms": float(np.median(lat) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "batch": float(np.mean(batches))}


def run_case(name: str, bundle_dir: Path, split: str, x: torch.Tensor, edges: int,
             seconds: float, out: Path, *extra: str) -> dict[str, float]:
    import json
    fingerprint = json.loads((bundle_dir / "manifest.json").read_text())["fingerprint"]
    front = Front(bundle_dir, out / f"{name}.log", *extra)
    try:
        result = drive(front.endpoint, fingerprint, split, x, edges, seconds)
    finally:
        front.stop()
    load = os.getloadavg()[0]
    print(f"  {name:<28} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.2f} ms  "
          f"p99 {result['p99_ms']:7.2f} ms  batch {result['batch']:5.2f}  load1 {load:.2f}",
          flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--edges", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tether-ray-bench"))
    ap.add_argument("--skip", nargs="*", default=(), choices=("hop", "throughput", "ceiling"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    ray1 = ("--ray", "auto", "--tail-workers", "1", "--worker-cpus", "1")
    ray2 = ("--ray", "auto", "--tail-workers", "2", "--worker-cpus", "1")
    small = bundle(args.out, "cifar_resnet20", "layer3.2")
    x_small = torch.randn(1, 64, 8, 8)
    if "hop" not in args.skip:
        print("1. Ray hop, 1 edge, 16 KB crossing, trivial tail", flush=True)
        a = run_case("in-process", small, "layer3.2", x_small, 1, args.seconds, args.out)
        b = run_case("ray 1 worker", small, "layer3.2", x_small, 1, args.seconds, args.out, *ray1)
        print(f"  => the Ray hop adds {b['p50_ms'] - a['p50_ms']:.2f} ms per batch (median; "
              "target <= 2 ms)", flush=True)
    if "throughput" not in args.skip:
        print(f"2. throughput, {args.edges} edges, resnet18 @224 tail from layer2.1", flush=True)
        heavy = bundle(args.out, "resnet18", "layer2.1")
        x = torch.randn(1, 128, 28, 28)
        a = run_case("in-process (1 thread)", heavy, "layer2.1", x, args.edges, args.seconds,
                     args.out)
        b = run_case("ray 1 worker", heavy, "layer2.1", x, args.edges, args.seconds, args.out,
                     *ray1)
        c = run_case("ray 2 workers", heavy, "layer2.1", x, args.edges, args.seconds, args.out,
                     *ray2)
        print(f"  => ray 2 / ray 1 workers: {c['rps'] / b['rps']:.2f}x (target >= 1.7x); "
              f"ray 1 / in-process: {b['rps'] / a['rps']:.2f}x", flush=True)
    if "ceiling" not in args.skip:
        print(f"3. the front's ceiling, {args.edges} edges, trivial tail, in-process", flush=True)
        run_case("front ceiling", small, "layer3.2", x_small, args.edges, args.seconds, args.out)


if __name__ == "__main__":
    main()
