"""Edge agent runtime costs, measured side by side in one run against a real `tether cloud`.

    .venv/bin/python bench/edge_runtime.py [--requests 300] [--bundle DIR]

One request in flight at a time, cifar_resnet20 split at layer2.2 (fp32, 32 KiB crossing), the
cloud a separate `tether cloud` process (no batching delay). The paths are timed round-robin,
one call each per round, so load drift hits them alike. Prints median / p99 milliseconds and
the ratios that say what the edge agent costs:

- agent split vs its parts (ONNX head + codec encode + bare link round trip, each timed alone),
  with compute in a worker thread (the default) and inline (``compute_threads = 0``)
- local endpoint (EdgeClient -> EdgeServer -> agent) vs calling the agent directly
- agent local answer vs the bare ONNX whole model
- fallback with the cloud down vs the agent's local answer
- reconnect: cloud restarted -> link ready again (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from dataclasses import replace
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.procs import CloudHolder  # noqa: E402  (test helper: real cloud process)

from tether.core.policy import FixedPolicy  # noqa: E402
from tether.core.types import LOCAL, Action  # noqa: E402
from tether.edge.agent import EdgeAgent  # noqa: E402
from tether.edge.client import EdgeClient  # noqa: E402
from tether.edge.compute import EdgeCompute  # noqa: E402
from tether.edge.config import EdgeConfig  # noqa: E402
from tether.edge.link import CloudRequest  # noqa: E402
from tether.edge.records import JsonlSink  # noqa: E402
from tether.edge.server import EdgeServer  # noqa: E402
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink  # noqa: E402

SPLIT = "layer2.2"
TIMING = LinkTiming(heartbeat_interval=0.5, heartbeat_timeout=2.0, handshake_timeout=0.3,
                    reconnect_min=0.05, reconnect_max=0.25)


def stats(samples: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]


async def interleaved(paths: dict[str, Callable[[int], Awaitable[Any]]], n: int,
                      warmup: int = 20) -> dict[str, list[float]]:
    """Time every path once per round, round-robin, so machine load drifts hit all alike."""
    out: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(warmup + n):
        for key, fn in paths.items():
            t = time.perf_counter()
            await fn(i)
            if i >= warmup:
                out[key].append(time.perf_counter() - t)
    return out


async def build_agents(compute: EdgeCompute, endpoint: str,
                       records: Path) -> tuple[ZmqCloudLink, dict[str, EdgeAgent]]:
    """The agents under test: split (thread), split inline, local, split with the cloud down."""
    config = EdgeConfig(deadline_seconds=2.0)
    split_action = FixedPolicy(Action.parse(f"split:{SPLIT}:fp32"))
    link = ZmqCloudLink(endpoint, compute.bundle_info(), "bench", TIMING)
    dead = ZmqCloudLink("tcp://127.0.0.1:9", compute.bundle_info(), "bench-dead", TIMING)
    agents = {
        "split": EdgeAgent(compute, split_action, config, link, [JsonlSink(records)]),
        "inline": EdgeAgent(compute, split_action, replace(config, compute_threads=0), link),
        "local": EdgeAgent(compute, FixedPolicy(LOCAL), config),
        "down": EdgeAgent(compute, split_action, config, dead),
    }
    await agents["split"].start()
    await agents["down"].start()
    if not await link.wait_ready(30):
        raise SystemExit(f"cloud at {endpoint} never became ready")
    return link, agents


async def measure(compute: EdgeCompute, endpoint: str, images: np.ndarray, n: int,
                  records: Path) -> dict[str, list[float]]:
    x = [compute.prepare(img) for img in images]
    m = len(images)
    link, a = await build_agents(compute, endpoint, records)
    feats = compute.head(SPLIT, x[0])
    enc = compute.encode(SPLIT, "fp32", feats)
    server = EdgeServer(a["split"], "tcp://127.0.0.1:0", workers=4)
    client = EdgeClient(await server.start())

    async def now(value: Any) -> Any:
        return value
    paths: dict[str, Callable[[int], Awaitable[Any]]] = {
        "head": lambda i: now(compute.head(SPLIT, x[i % m])),
        "encode": lambda i: now(compute.encode(SPLIT, "fp32", feats)),
        "link": lambda i: link.infer(CloudRequest(i, SPLIT, "fp32", enc.header, enc.payload, 2.0)),
        "agent_split": lambda i: a["split"].infer(images[i % m]),
        "agent_inline": lambda i: a["inline"].infer(images[i % m]),
        "endpoint_split": lambda i: asyncio.to_thread(client.infer, images[i % m]),
        "onnx_full": lambda i: now(compute.full(x[i % m])),
        "agent_local": lambda i: a["local"].infer(images[i % m]),
        "agent_fallback": lambda i: a["down"].infer(images[i % m]),
    }
    r = await interleaved(paths, n)
    check = (await a["down"].infer(images[0])).record
    if check.fallback_reason != "disconnected":
        raise SystemExit(f"expected a 'disconnected' fallback, got {check}")
    client.close()
    await server.stop(1.0)
    for agent in a.values():
        await agent.close()
    return r


async def reconnect_times(compute: EdgeCompute, cloud: CloudHolder, rounds: int) -> list[float]:
    link = ZmqCloudLink(cloud.endpoint, compute.bundle_info(), "bench-rc", TIMING)
    await link.start()
    await link.wait_ready(30)
    out = []
    for _ in range(rounds):
        await asyncio.to_thread(cloud.daemon.kill)
        while link.ready:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(cloud.start)
        t = time.perf_counter()
        await link.wait_ready(30)
        out.append(time.perf_counter() - t)
    await link.close()
    return out


def report(r: dict[str, list[float]], reconnects: list[float]) -> None:
    med = {k: stats(v)[0] for k, v in r.items()}
    print(f"{'path':<16}{'median ms':>11}{'p99 ms':>10}")
    for key, samples in r.items():
        m, p = stats(samples)
        print(f"{key:<16}{m:>11.3f}{p:>10.3f}")
    parts = med["head"] + med["encode"] + med["link"]
    print(f"\nagent split / (head + encode + link)   {med['agent_split'] / parts:6.2f}x  "
          f"(agent overhead {med['agent_split'] - parts:+.3f} ms)")
    print(f"agent inline / (head + encode + link)  {med['agent_inline'] / parts:6.2f}x  "
          f"(compute_threads = 0: no thread handoff)")
    print(f"endpoint split / agent split           {med['endpoint_split'] / med['agent_split']:6.2f}x"
          f"  (local endpoint {med['endpoint_split'] - med['agent_split']:+.3f} ms)")
    print(f"agent local / bare ONNX whole model    {med['agent_local'] / med['onnx_full']:6.2f}x")
    print(f"fallback (cloud down) / agent local    {med['agent_fallback'] / med['agent_local']:6.2f}x")
    print(f"reconnect after cloud restart          "
          f"{', '.join(f'{s:.3f}' for s in reconnects)} s (max {max(reconnects):.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--reconnects", type=int, default=3)
    parser.add_argument("--bundle", type=Path, help="existing cifar_resnet20 bundle with layer2.2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import uvloop
    from support.bundles import pretrained_weights, sample_images
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from tether.partitioner import export_bundle
            bundle = Path(tmp) / "bundle"
            export_bundle("cifar_resnet20", bundle, weights=pretrained_weights(),
                          splits=["layer1.2", SPLIT], repeats=5, progress=False)
        compute = EdgeCompute(bundle)
        cloud = CloudHolder(bundle, Path(tmp), ("--max-queue-delay-ms", "0"))
        try:
            r = uvloop.run(measure(compute, cloud.endpoint, sample_images(64), args.requests,
                                   Path(tmp) / "records.jsonl"))
            reconnects = uvloop.run(reconnect_times(compute, cloud, args.reconnects))
        finally:
            cloud.stop()
    report(r, reconnects)
    return 0


if __name__ == "__main__":
    sys.exit(main())
