"""Tails on a pool of Ray workers: the front's side of ``tether cloud --ray``.

:class:`RayPool` is a :class:`~tether.cloud.executor.BatchExecutor`: the front keeps its
admission, batching and BUSY; a formed batch goes to the least-loaded live worker, whose
queue is bounded (``ray.worker_queue`` batches), so the front runs ``tail_workers x
worker_queue`` dispatch loops and anything beyond waits in the front's bounded queue, where
admission answers BUSY. Faults:

- a worker that dies mid-batch: the batch is re-run once on another live worker, else its
  requests get ERROR "unavailable" (edges answer locally); the dispatcher places a new
  worker in the slot (``tether_cloud_worker_restarts_total``);
- the cluster goes away: the dispatcher process (:mod:`tether.cloud.ray_dispatch`, the only
  Ray driver) exits or goes silent; every pending batch is answered ERROR, ``live`` turns
  False (the core answers ERROR "unavailable", ``/readyz`` is false) and a fresh dispatcher
  is started every few seconds until the cluster answers again; the front never restarts.

:class:`RaySessions` routes LLM sessions: a PREFILL picks the live worker holding the fewest
sessions, DECODE/CLOSE go to the worker holding that session's KV cache; when that worker
died, the session ends with a SessionError so the edge re-prefills.

No ``ray`` import here: the front needs only ZeroMQ to reach its dispatcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from tether.cloud.config import CloudConfig
from tether.core import protocol as P
from tether.core.sockets import open_socket
from tether.core.errors import ConfigError, PeerUnavailableError, SessionError
from tether.core.metrics import BatchStats, CloudMetrics

log = logging.getLogger(__name__)
SILENCE_S = 3.0            # no word from the dispatcher this long: it is replaced
RESPAWN_S = (1.0, 5.0)     # back-off between dispatcher starts (first, max)


@dataclass
class _Worker:
    index: int
    live: bool = False
    epoch: int = 0
    pid: int = 0
    node: str = ""
    inflight: int = 0
    sessions: int = 0

    @property
    def name(self) -> str:
        return f"w{self.index}"


class RayPool:
    """Decode + tail of formed batches on ``ray.tail_workers`` Ray actors."""

    def __init__(self, config: CloudConfig, metrics: CloudMetrics | None = None,
                 llm: dict[str, Any] | None = None) -> None:
        self.cloud, self.config, self.metrics, self.llm = config, config.ray, metrics, llm
        if not self.config.enabled:
            raise ConfigError("RayPool needs ray.address (--ray auto|HOST:PORT)")
        self.slots = self.config.tail_workers * self.config.worker_queue
        self.parallelism = self.config.tail_workers
        self.workers = [_Worker(i) for i in range(self.config.tail_workers)]
        self.restarts = 0
        self._settings: dict[str, Any] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = iter(range(1, 1 << 62))
        self._changed = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        self._sock: Any = None
        self._child: subprocess.Popen | None = None
        self._heard = 0.0
        self._tasks: list[asyncio.Task] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="tether-ray-")
        self._generation = 0
        self._reported = False
        self._closing = False

    # ---- BatchExecutor ----------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self._child is not None and any(w.live for w in self.workers)

    async def start(self, bundles: list, run_batch: Any = None, preload: bool = True) -> None:
        """Start the dispatcher; return once a worker is live (ConfigError/Unavailable if not)."""
        dirs = [b.bundle_dir for b in bundles]
        if any(d is None for d in dirs):
            raise ConfigError("the Ray pool serves bundle directories (tether partition --out "
                              "DIR); in-memory bundles run on the in-process pool")
        self._settings = {
            "address": self.config.address, "tail_workers": self.config.tail_workers,
            "worker_cpus": self.config.worker_cpus, "worker_gpus": self.config.worker_gpus,
            "device": self.config.device, "torch_threads": self.config.torch_threads,
            "resources": list(self.config.resources),
            "batch_timeout_s": self.config.batch_timeout_s,
            "start_timeout_s": self.config.start_timeout_s,
            "max_restarts_per_minute": self.config.max_restarts_per_minute,
            "bundles": [str(os.path.abspath(d)) for d in dirs],
            "max_request_samples": self.cloud.max_request_samples,
            "max_message_bytes": self.cloud.max_message_bytes, **(self.llm or {})}
        self._spawn()
        deadline = time.monotonic() + self.config.start_timeout_s
        while not self.live and time.monotonic() < deadline and self._child.poll() is None:
            await self._wait_change(0.5)
        if not self.live:
            await self.close()
            raise PeerUnavailableError(
                f"no Ray tail worker became live within {self.config.start_timeout_s:.0f} s at "
                f"ray address {self.config.address!r}: is the cluster running (`ray start "
                "--head`) with free CPUs for ray.worker_cpus? See the log above")
        self._tasks.append(asyncio.ensure_future(self._supervise()))

    async def run(self, group: Any, jobs: list) -> tuple[list, BatchStats | None]:
        now = time.perf_counter()
        messages = [P.encode(j.msg) for j in jobs]
        head = {"op": "batch", "counts": [len(m) for m in messages],
                "meta": [[now - j.received, None if j.deadline is None else j.deadline - now]
                         for j in jobs]}
        frames = [f for m in messages for f in m]
        for _attempt in range(2):                     # a lost batch runs once more elsewhere
            worker, reply, data = await self._call(head, frames)
            if reply["status"] != "lost":
                break
            if worker is not None:     # not that one again until the dispatcher re-places it
                self._lost(worker)
        if reply["status"] != "ok":
            reason = reply.get("message") or "its tail worker was lost"
            err = PeerUnavailableError(f"batch not run ({reason}): answer locally, retry later")
            return [P.Error.from_exception(j.msg.request_id, err) for j in jobs], None
        replies, start = [], 0
        for n in reply["counts"]:
            replies.append(P.decode(data[start:start + n], self.cloud.limits))
            start += n
        inputs, rows, tail_s, busy_s = reply["stats"]
        self._observe(worker, busy_s)
        stats = BatchStats(group.bundle.model_id, group.split, inputs, rows, tail_s) \
            if inputs else None
        return replies, stats

    async def close(self, wait: bool = True) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._sock is not None and self._child is not None:
            try:
                await self._sock.send_multipart([msgpack.packb({"op": "stop"})])
                await asyncio.to_thread(self._child.wait, 15)   # it releases its actors
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                pass
        self._drop_child("the cloud is stopping")
        self._ctx.term()
        self._tmp.cleanup()

    # ---- dispatch ---------------------------------------------------------------------------

    async def _call(self, head: dict[str, Any], frames: list[Any],
                    worker: _Worker | None = None) -> tuple[_Worker | None, dict, list]:
        if worker is None:
            worker = await self._acquire()
        if worker is None or self._sock is None:
            return None, {"status": "none", "message": "no tail worker is live"}, []
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        worker.inflight += 1
        self._gauge(worker)
        try:
            await self._sock.send_multipart(
                [msgpack.packb({**head, "id": rid, "slot": worker.index}), *frames], copy=False)
            reply, data = await future
        finally:
            self._pending.pop(rid, None)
            worker.inflight -= 1
            self._gauge(worker)
            self._changed.set()
        return worker, reply, data

    async def _acquire(self) -> _Worker | None:
        """The least-loaded live worker with room in its queue (waits while all are full)."""
        deadline = time.monotonic() + self.config.batch_timeout_s
        while time.monotonic() < deadline:
            live = [w for w in self.workers if w.live]
            if not live or self._child is None:
                return None
            free = [w for w in live if w.inflight < self.config.worker_queue]
            if free:
                return min(free, key=lambda w: w.inflight)
            await self._wait_change(deadline - time.monotonic())
        return None

    async def _wait_change(self, timeout: float) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass

    # ---- the dispatcher process -------------------------------------------------------------

    def _spawn(self) -> None:
        self._generation += 1
        endpoint = f"ipc://{self._tmp.name}/dispatch-{self._generation}"
        self._sock = open_socket(self._ctx, zmq.PAIR, bind=endpoint)
        cmd = [sys.executable, "-m", "tether", "cloud-ray-dispatcher", "--endpoint", endpoint,
               "--settings", json.dumps(self._settings)]
        self._child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self._heard = time.monotonic()
        self._reported = False
        self._tasks.append(asyncio.ensure_future(self._read(self._sock)))

    async def _read(self, sock: Any) -> None:
        while sock is self._sock:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError:       # closed: this dispatcher was replaced
                return
            head = msgpack.unpackb(frames[0].bytes, raw=False)
            self._heard = time.monotonic()
            if head["op"] == "workers":
                self._reported = True
                self._update_workers(head)
            elif head["op"] == "done":
                future = self._pending.get(head["id"])
                if future is not None and not future.done():
                    future.set_result((head, frames[1:]))

    def _update_workers(self, head: dict[str, Any]) -> None:
        changed = head["restarts"] != self.restarts
        self.restarts = head["restarts"]
        for info in head["slots"]:
            w = self.workers[info["slot"]]
            if (w.live, w.epoch) != (info["live"], info["epoch"]):
                changed = True
                if info["epoch"] != w.epoch:
                    w.sessions = 0
                if w.live and not info["live"] and info["epoch"] == w.epoch:
                    self._lost(w)
                self._info_metric(w, info)
                w.live, w.epoch, w.pid, w.node = (info["live"], info["epoch"], info["pid"],
                                                  info["node"])
        if changed:
            log.info("ray workers: %s", ", ".join(
                f"{w.name}={'live' if w.live else 'down'}" for w in self.workers))
            self._changed.set()
        if self.metrics:
            self.metrics.workers_live.set(sum(w.live for w in self.workers))
            self.metrics.worker_restarts.set(self.restarts)

    async def _supervise(self) -> None:
        """Replace a dispatcher that exited or went silent (the cluster went away)."""
        backoff = RESPAWN_S[0]
        while True:
            await asyncio.sleep(0.25)
            child = self._child
            alive = child is not None and child.poll() is None
            # silent while it connects and places workers: allow start_timeout_s for that
            limit = SILENCE_S if self._reported else self.config.start_timeout_s
            if alive and time.monotonic() - self._heard < limit:
                if self.live:
                    backoff = RESPAWN_S[0]
                continue
            self._drop_child("the Ray cluster stopped answering")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESPAWN_S[1])
            if not self._closing:
                log.warning("starting a new Ray dispatcher for %s", self.config.address)
                self._spawn()

    def _drop_child(self, why: str) -> None:
        child, self._child = self._child, None
        for w in self.workers:
            if w.live:
                log.warning("ray worker %s down: %s", w.name, why)
                self._info_metric(w, {"live": False})
            w.live, w.sessions = False, 0
        if self.metrics:
            self.metrics.workers_live.set(0)
        for future in list(self._pending.values()):
            if not future.done():
                future.set_result(({"status": "none", "message": why}, []))
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(5)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        self._changed.set()

    # ---- metrics ----------------------------------------------------------------------------

    def _observe(self, worker: _Worker | None, busy_s: float) -> None:
        if self.metrics is not None and worker is not None:
            self.metrics.worker_batches.labels(worker.name).inc()
            self.metrics.worker_busy_seconds.labels(worker.name).inc(busy_s)

    def _lost(self, worker: _Worker) -> None:
        if worker.live:
            self._info_metric(worker, {"live": False})
            worker.live = False
            log.warning("ray worker %s lost (pid %d)", worker.name, worker.pid)
            if self.metrics is not None:
                self.metrics.worker_lost.labels(worker.name).inc()

    def _gauge(self, worker: _Worker) -> None:
        if self.metrics is not None:
            self.metrics.worker_queue_depth.labels(worker.name).set(worker.inflight)

    def _info_metric(self, worker: _Worker, info: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        if worker.pid:
            try:
                self.metrics.worker_info.remove(worker.name, worker.node, str(worker.pid))
            except KeyError:
                pass
        if info["live"]:
            self.metrics.worker_info.labels(worker.name, info["node"], str(info["pid"])).set(1)


class RaySessions:
    """LLM sessions on the pool's workers, each pinned to the worker holding its KV cache."""

    def __init__(self, pool: RayPool, bundle: P.BundleInfo, max_tracked: int = 65536) -> None:
        self.pool, self.bundle, self.max_tracked = pool, bundle, max_tracked
        self._where: OrderedDict[str, tuple[int, int]] = OrderedDict()

    async def handle(self, msg: Any) -> Any:
        worker = self._route(msg)
        if worker is None:
            return P.Error.from_exception(msg.request_id, PeerUnavailableError(
                "no tail worker is live: answer locally and retry later"))
        start = time.perf_counter()
        _, reply, data = await self.pool._call({"op": "session"}, P.encode(msg), worker)
        self.pool._observe(worker, time.perf_counter() - start)
        if reply["status"] != "ok":
            self._forget(msg.session_id, worker)
            return P.Error.from_exception(msg.request_id, SessionError(
                f"session {msg.session_id!r} was lost with its worker: re-prefill"))
        answer = P.decode(data, self.pool.cloud.limits)
        if isinstance(msg, P.Prefill) and isinstance(answer, P.Result):
            self._forget(msg.session_id, None)
            self._where[msg.session_id] = (worker.index, worker.epoch)
            worker.sessions += 1
            while len(self._where) > self.max_tracked:      # the oldest, its count too
                self._forget(next(iter(self._where)), None)
        elif isinstance(msg, P.Close):
            self._forget(msg.session_id, worker)
        return answer

    def _route(self, msg: Any) -> _Worker | None:
        live = [w for w in self.pool.workers if w.live]
        if isinstance(msg, P.Prefill):
            return min(live, key=lambda w: (w.sessions, w.inflight)) if live else None
        where = self._where.get(msg.session_id)
        if where is None:
            return live[0] if live else None      # the worker answers "unknown session"
        worker = self.pool.workers[where[0]]
        if not worker.live or worker.epoch != where[1]:
            return live[0] if live else None      # a fresh worker: "unknown session"
        self._where.move_to_end(msg.session_id)
        return worker

    def _forget(self, session_id: str, worker: _Worker | None) -> None:
        where = self._where.pop(session_id, None)
        if where is not None:
            owner = self.pool.workers[where[0]]
            if owner.epoch == where[1] and owner.sessions > 0:
                owner.sessions -= 1
