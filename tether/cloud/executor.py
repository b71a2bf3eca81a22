"""Where a formed batch runs: the one seam between the cloud's front and its compute.

:class:`~tether.cloud.core.CloudCore` admits requests and forms batches per
``(bundle, split, codec)``; a :class:`BatchExecutor` runs decode + tail for one formed batch
and returns one reply per request (RESULT, BUSY "deadline" or ERROR), never raising for a
request's fault. Two implementations:

- :class:`ThreadPoolBatches` (the default): compute threads in the front's own process;
  batches measured cheaper than ``inline_compute_s`` run on the event loop itself.
- :class:`tether.cloud.ray_pool.RayPool`: tail workers on a Ray cluster (``--ray``).

``slots`` is how many batches the front may hand over at once (the core runs that many
dispatch loops, so nothing piles up beyond it: back-pressure stays at admission);
``parallelism`` how many run truly at the same time (the core's queue-delay estimate);
``live`` is False while no worker can run a batch (the core answers ERROR "unavailable"
and ``/readyz`` is false).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

RunBatch = Callable[[Any, list], tuple[list, Any]]


class BatchExecutor(Protocol):
    """Runs decode + tail for formed batches (see the module docstring)."""

    slots: int
    parallelism: int

    @property
    def live(self) -> bool: ...

    async def start(self, bundles: list, run_batch: RunBatch, preload: bool = True) -> None: ...

    async def run(self, group: Any, jobs: list) -> tuple[list, Any]: ...

    async def close(self, wait: bool = True) -> None: ...


class ThreadPoolBatches:
    """Decode + tail in ``workers`` threads of this process (the single-machine default)."""

    def __init__(self, workers: int = 1, inline_compute_s: float = 0.001) -> None:
        self.slots = self.parallelism = workers
        self.inline_compute_s = inline_compute_s
        self._pool: ThreadPoolExecutor | None = None
        self._run_batch: RunBatch | None = None

    @property
    def live(self) -> bool:
        return self._pool is not None

    async def start(self, bundles: list, run_batch: RunBatch, preload: bool = True) -> None:
        self._run_batch = run_batch
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="tether-tail")
        if preload:
            loop = asyncio.get_running_loop()
            for bundle in bundles:
                await loop.run_in_executor(self._pool, bundle.warm)

    async def run(self, group: Any, jobs: list) -> tuple[list, Any]:
        if 0 < group.costs.batch_s <= self.inline_compute_s:
            return self._run_batch(group, jobs)       # cheaper than a thread hop
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._run_batch, group, jobs)

    async def close(self, wait: bool = True) -> None:
        """Release the threads; ``wait=False`` abandons a batch cut off by a drain timeout
        (its result is discarded: the core has answered its requests already)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
