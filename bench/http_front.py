"""Edge front-ends side by side: the same edge daemon, the same images, ZeroMQ EdgeClient vs
HTTP ``POST /v1/infer`` (raw .npy body and PNG upload), sequential requests from one client.

    python bench/http_front.py --requests 300 [--bundle DIR]

Prints per-request latency (median, p95) per front and the ratios to ZeroMQ. The edge answers
locally (``action = local``) so the numbers are the front's own cost plus one ONNX run.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bundle(path: Path | None) -> Path:
    if path is not None:
        return path
    from tether.partitioner import export_bundle
    out = Path(tempfile.mkdtemp()) / "r20"
    export_bundle("cifar_resnet20", out, splits=["layer2.2"], repeats=1, warmup=1, progress=False)
    return out


def _serve(bundle: Path, box: dict, ready: threading.Event, stop: threading.Event) -> None:
    from tether.edge.config import EdgeConfig, HttpConfig
    from tether.edge.daemon import EdgeDaemon

    async def main() -> None:
        daemon = EdgeDaemon(EdgeConfig(bundle=bundle, listen="tcp://127.0.0.1:0",
                                       http=HttpConfig(port=0), action="local",
                                       deadline_seconds=10.0))
        box["endpoint"] = await daemon.start()
        box["port"] = daemon.http_port
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await daemon.stop()
    import uvloop
    uvloop.run(main())


def _timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per front (default 300)")
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: export resnet20)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from PIL import Image

    from tether.edge.client import EdgeClient
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    npys, pngs = [], []
    for img in images:
        b = io.BytesIO()
        np.save(b, img, allow_pickle=False)
        npys.append(b.getvalue())
        b = io.BytesIO()
        Image.fromarray(img).save(b, format="PNG")
        pngs.append(b.getvalue())
    box, ready, stop = {}, threading.Event(), threading.Event()
    thread = threading.Thread(target=_serve, args=(_bundle(args.bundle), box, ready, stop))
    thread.start()
    ready.wait(120)
    conn = http.client.HTTPConnection("127.0.0.1", box["port"], timeout=30)

    def post(body: bytes, ctype: str) -> None:
        conn.request("POST", "/v1/infer", body, {"Content-Type": ctype})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status

    with EdgeClient(box["endpoint"], timeout=30) as client:
        for i in range(20):        # warm-up of every path
            client.infer(images[i % 16])
            post(npys[i % 16], "application/x-npy")
            post(pngs[i % 16], "image/png")
        results = {
            "zeromq EdgeClient": _timed(lambda i: client.infer(images[i % 16]), args.requests),
            "HTTP .npy body": _timed(lambda i: post(npys[i % 16], "application/x-npy"),
                                     args.requests),
            "HTTP PNG body": _timed(lambda i: post(pngs[i % 16], "image/png"), args.requests),
        }
    conn.close()
    stop.set()
    thread.join(30)
    base = statistics.median(results["zeromq EdgeClient"])
    print(f"{'front':<20} {'median ms':>10} {'p95 ms':>8} {'x zeromq':>9}")
    for name, xs in results.items():
        xs = sorted(xs)
        med, p95 = statistics.median(xs), xs[int(0.95 * (len(xs) - 1))]
        print(f"{name:<20} {med * 1e3:>10.2f} {p95 * 1e3:>8.2f} {med / base:>9.2f}")


if __name__ == "__main__":
    main()
