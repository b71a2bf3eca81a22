"""Shared by bench/runtime_overhead.py and bench/cloud_throughput.py: server processes."""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT_LOGITS = 10


class SliceTail:
    """The cheapest honest tail: the first 10 values of each row as 'logits'."""

    def __call__(self, x: Any) -> Any:
        return x.reshape(x.shape[0], -1)[:, :RESULT_LOGITS] * 1.0


def tether_server(bundles_spec: list[tuple[str, tuple[int, ...]]], config_kw: dict[str, Any],
                  model: tuple[str, str] | None, queue: Any) -> None:
    """Run a CloudServer until a SIGTERM (its endpoint goes to ``queue``). ``model=None``:
    :class:`SliceTail` bundles of the given input shapes; else ``(model_id, split)``."""
    import asyncio
    import signal

    import torch
    import uvloop
    from prometheus_client import CollectorRegistry

    from tether.cloud import CloudConfig, ServedBundle
    from tether.cloud.server import CloudServer
    from tether.core.metrics import CloudMetrics
    from tether.core.types import TensorSpec

    torch.set_num_threads(1)
    bundles = []
    for fingerprint, shape in bundles_spec:
        if model is None:
            bundles.append(ServedBundle("slice", fingerprint, TensorSpec(shape), {},
                                        lambda s: SliceTail()))
        else:
            from tether.partitioner import load_model
            lm = load_model(model[0])
            bundles.append(ServedBundle.from_module(model[0], lm.module, lm.input, fingerprint,
                                                    [model[1]]))

    async def main() -> None:
        server = CloudServer(CloudConfig(bind="tcp://127.0.0.1:*", **config_kw), bundles,
                             CloudMetrics(CollectorRegistry()))
        await server.start()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.request_stop)
        queue.put(server.endpoint)
        await server.wait_stopped()

    uvloop.run(main())


def bare_server(reply_frames: list[bytes], queue: Any) -> None:
    """A bare pyzmq ROUTER answering every message with ``reply_frames``."""
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    queue.put(f"tcp://127.0.0.1:{port}")
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"STOP":
            break
        sock.send_multipart([frames[0], *reply_frames], copy=False)
    sock.close(0)
    ctx.term()


def cpu_seconds(pid: int | str = "self", main_only: bool = False) -> float:
    """CPU time of every thread of a process (ns resolution, from /proc/PID/task/*/schedstat);
    ``main_only``: of its main thread alone (task id = pid)."""
    total = 0
    pattern = f"{pid}/schedstat" if main_only and pid != "self" else "*/schedstat"
    for stat in Path(f"/proc/{pid}/task").glob(pattern):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass                                   # a thread that just ended
    return total / 1e9


def start(target: Any, *args: Any) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue), daemon=True)
    proc.start()
    return proc, queue.get(timeout=120)


def stop(proc: mp.Process) -> None:
    proc.terminate()          # SIGTERM: the tether server drains and exits
    proc.join(15)
    if proc.is_alive():
        proc.kill()
        proc.join()
