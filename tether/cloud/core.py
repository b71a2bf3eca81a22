"""The cloud's compute core: admission, dynamic batching, decode and tail. No sockets.

:meth:`CloudCore.handle` takes a decoded protocol message and returns a future of the
reply message. INFER requests are admitted (bounded queue; BUSY at once when full, when
draining or when the deadline cannot be met), queued per group ``(bundle, split, codec)``
and pulled by worker loops that run decode + tail for a whole batch in a compute thread,
so the event loop (and the socket IO on it) stays responsive; only batches measured
cheaper than ``inline_compute_s`` (default 1 ms: less than two thread wake-ups on a busy
machine, short enough not to stall IO) run on the loop itself. Triton's knobs: a group is
dispatched when it holds ``max_batch_size`` requests or its oldest request has waited
``max_queue_delay_s``; the group with the oldest request goes first.

LLM session steps (PREFILL/DECODE/CLOSE) pass the :class:`~tether.cloud.sessions.SessionGate`:
the same kind of admission (bounded sessions, KV memory and step queue; BUSY when full),
drain and metrics; the session handler batches decode steps.

What one formed batch does (decode, tail, one reply per request) is
:func:`tether.cloud.batch.run_batch`; this class decides which requests form it and when.

The socket server (:mod:`tether.cloud.server`) and the in-process twin
(:class:`tether.cloud.twin.InProcessCloud`) both drive this class.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Callable, Iterable

from tether.cloud.admission import completion_estimate
from tether.cloud.batch import Group, Job, Reply, Running, expired, run_batch
from tether.cloud.bundles import ServedBundle
from tether.cloud.config import CloudConfig
from tether.cloud.executor import BatchExecutor, ThreadPoolBatches
from tether.cloud.sessions import SESSION_MESSAGES, SessionGate, SessionHandler
from tether.core import protocol as P
from tether.core.errors import (
    BundleError, PeerUnavailableError, ProtocolError, SessionError, TetherError,
)
from tether.core.metrics import BatchStats, CloudMetrics, CloudRequestStats

log = logging.getLogger(__name__)


class CloudCore:
    """Admission, batching and compute for the bundles it serves."""

    def __init__(self, bundles: Iterable[ServedBundle], config: CloudConfig = CloudConfig(),
                 metrics: CloudMetrics | None = None,
                 sessions: SessionHandler | None = None,
                 compute: BatchExecutor | None = None) -> None:
        self.config = config
        self.bundles = {b.fingerprint: b for b in bundles}
        if not self.bundles and sessions is None:
            raise BundleError("the cloud needs at least one bundle: pass --bundle DIR "
                              "(create one with `tether partition MODEL --out DIR`)")
        self.metrics = metrics
        self.sessions = sessions
        self.gate = SessionGate(sessions, metrics) if sessions is not None else None
        self.server_id = config.server_id or f"{socket.gethostname()}:{os.getpid()}"
        self._groups: dict[tuple[str, str, str], Group] = {}
        self._queued = 0
        self._queued_bytes = 0
        self._inflight = 0
        self._running: dict[int, Running] = {}   # worker index -> the batch it computes
        self._accepting = True
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task] = []
        # where formed batches run (tether.cloud.executor): threads here, or a Ray pool
        self.compute = compute or ThreadPoolBatches(config.workers, config.inline_compute_s)
        if metrics is not None:
            metrics.track_queue(lambda: self._queued, lambda: self._queued_bytes,
                                lambda: self._inflight)

    # ---- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker loops (and build every tail first when ``preload``)."""
        if self._workers:
            return
        await self.compute.start(list(self.bundles.values()), self._run_batch, self.config.preload)
        self._workers = [asyncio.create_task(self._worker(i), name=f"tether-cloud-worker-{i}")
                         for i in range(self.compute.slots)]
        if self.metrics:
            self.metrics.ready.set(1)

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting INFER and session steps (BUSY "draining") and wait for queued work;
        True if all done."""
        self._accepting = False
        if self.metrics:
            self.metrics.ready.set(0)
        self._wakeup.set()
        waits = [self._idle.wait()] + ([self.gate.drain()] if self.gate is not None else [])
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        """Cancel the workers and release the compute threads (after :meth:`drain`).

        Every admitted request still unanswered, queued or in a batch being computed, gets
        BUSY "draining" now: exactly one reply each, even when the drain timed out; so does
        every open session step, and the sessions are closed.
        """
        self._accepting = False
        if self.gate is not None:
            await self.gate.close()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        running, self._running = list(self._running.values()), {}
        for batch in running:
            for job in batch.jobs:
                self._finish(job, P.Busy(job.msg.request_id, "draining", self._queued))
        for group in self._groups.values():
            while group.jobs:
                job = self._pop(group)
                self._finish(job, P.Busy(job.msg.request_id, "draining", self._queued))
        # a batch cut off above may still run in its thread: its result is discarded
        await self.compute.close(wait=not running)

    @property
    def accepting(self) -> bool:
        return self._accepting and bool(self._workers) and self.compute.live

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def inflight(self) -> int:
        """Requests and session steps admitted, not answered."""
        return self._inflight + (self.gate.queue_depth if self.gate is not None else 0)

    @property
    def queue_estimate_s(self) -> float:
        """Seconds until the work queued and running now is done (reported in PONG; 0 idle)."""
        return self._backlog(time.perf_counter())

    def info(self) -> tuple[P.BundleInfo, ...]:
        session = (self.sessions.bundle,) if self.sessions is not None else ()
        return tuple(b.info() for b in self.bundles.values()) + session

    # ---- messages -------------------------------------------------------------------------

    def handle(self, msg: Any, received: float | None = None, bytes_in: int = 0,
               on_reply: Callable[[Reply], None] | None = None) -> asyncio.Future:
        """The reply to ``msg`` as a future (already done for everything but INFER/sessions).

        ``on_reply``: an admitted INFER's reply is also passed to it the moment it is ready
        (a socket server sends from there, a loop turn earlier than a done-callback)."""
        received = time.perf_counter() if received is None else received
        if type(msg) is P.Infer:
            return self.submit(msg, received, bytes_in, on_reply)
        if isinstance(msg, P.Hello):
            return _done(self.hello(msg))
        if isinstance(msg, P.Ping):
            return _done(P.Pong(msg.request_id, msg.t, self.queue_estimate_s))
        if isinstance(msg, SESSION_MESSAGES):
            return self._session(msg, received)
        if self.metrics:
            self.metrics.errors.labels(ProtocolError.code).inc()
        return _done(P.Error(msg.request_id, ProtocolError.code,
                             f"a cloud does not accept {type(msg).__name__.upper()} messages"))

    def hello(self, msg: P.Hello) -> Reply:
        """READY listing what is served, or ERROR naming each wanted bundle that is not."""
        served_info = self.info()
        fingerprints = {b.fingerprint for b in served_info}
        missing = [b for b in msg.bundles if b.fingerprint not in fingerprints]
        if missing:
            served = ", ".join(f"{b.model_id}@{b.fingerprint[:12]}" for b in served_info)
            wanted = ", ".join(f"{b.model_id}@{b.fingerprint[:12]}" for b in missing)
            return P.Error(msg.request_id, BundleError.code,
                           f"this cloud does not serve {wanted}; it serves {served}: deploy the "
                           "same bundle (same weights fingerprint) on edge and cloud")
        return P.Ready(msg.request_id, self.server_id, served_info, self.config.max_message_bytes)

    def submit(self, msg: P.Infer, received: float, bytes_in: int = 0,
               on_reply: Callable[[Reply], None] | None = None) -> asyncio.Future:
        """Admit one INFER: its future resolves to RESULT, BUSY or ERROR."""
        try:
            group = self._group_for(msg)
        except TetherError as exc:
            return self._reject(msg, P.Error.from_exception(msg.request_id, exc), bytes_in)
        if self._workers and not self.compute.live:
            return self._reject(msg, P.Error.from_exception(msg.request_id, PeerUnavailableError(
                "no tail worker is live (the compute cluster is unreachable): answer locally "
                "and retry later")), bytes_in)
        if not self.accepting:
            return self._reject(msg, P.Busy(msg.request_id, "draining", self._queued), bytes_in)
        if self._queued >= self.config.max_queue or \
                self._queued_bytes + bytes_in > self.config.max_queue_bytes:
            return self._reject(msg, self._busy(msg, "queue_full", group), bytes_in)
        nbytes = P.wire_size(msg.payload)
        deadline = None
        if msg.deadline_s is not None:
            estimate = self._estimate(group, nbytes) if self._may_miss(group, msg.deadline_s) \
                else 0.0
            if msg.deadline_s <= estimate:
                return self._reject(msg, P.Busy(msg.request_id, "deadline", self._queued,
                                                estimate), bytes_in)
            deadline = received + msg.deadline_s
        job = Job(msg, received, deadline, asyncio.get_running_loop().create_future(), bytes_in,
                   nbytes, on_reply=on_reply)
        group.jobs.append(job)
        group.queued_bytes += nbytes
        self._queued += 1
        self._queued_bytes += bytes_in
        self._inflight += 1
        self._idle.clear()
        self._wakeup.set()
        return job.future

    def _group_for(self, msg: P.Infer) -> Group:
        key = (msg.fingerprint, msg.split, msg.codec)
        group = self._groups.get(key)
        if group is None:
            bundle = self.bundles.get(msg.fingerprint)
            if bundle is None:
                raise BundleError(f"fingerprint {msg.fingerprint[:16]!r} is not served here; "
                                  f"served: {[b.model_id for b in self.bundles.values()]}: "
                                  "handshake (HELLO) first and use a served bundle")
            codec = bundle.codec(msg.split, msg.codec)   # SplitError / UnknownCodecError
            group = self._groups[key] = Group(bundle, msg.split, msg.codec, codec)
        return group

    def _backlog(self, now: float, own_s: float = 0.0) -> float:
        """Seconds until the queued and running work is done (see :mod:`.admission`)."""
        queued_s = sum(g.costs.cost(len(g.jobs), g.queued_bytes, self.config.max_batch_size, now)
                       for g in self._groups.values() if g.jobs)
        return completion_estimate([r.until for r in self._running.values()], queued_s, own_s,
                                   self.compute.parallelism, now)

    def _may_miss(self, group: Group, deadline_s: float) -> bool:
        """False when ``deadline_s`` surely exceeds the estimate: on an idle cloud the estimate
        is the request's own cost, which never exceeds its group's batch time."""
        return bool(self._queued or self._running) or deadline_s <= group.costs.batch_s

    def _estimate(self, group: Group, nbytes: int) -> float:
        """Seconds until a request of ``nbytes`` admitted now would be answered (0: unknown).

        On an idle cloud this is the request's own compute time, which decays toward zero
        while nothing refreshes it: a refusal for "deadline" can never stick.
        """
        now = time.perf_counter()
        return self._backlog(now, group.costs.cost(1, nbytes, self.config.max_batch_size, now))

    def _busy(self, msg: P.Infer, reason: str, group: Group, nbytes: int = 0) -> P.Busy:
        return P.Busy(msg.request_id, reason, self._queued, self._estimate(group, nbytes))

    def _reject(self, msg: P.Infer, reply: Reply, bytes_in: int) -> asyncio.Future:
        self._record(msg, reply, bytes_in)
        return _done(reply)

    def _session(self, msg: Any, received: float) -> asyncio.Future:
        if self.gate is None:
            return _done(P.Error(msg.request_id, SessionError.code,
                                 "this cloud serves no LLM sessions: start it with an LLM bundle"))
        return self.gate.submit(msg, received)

    # ---- compute --------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        while True:
            group = await self._next_group()
            jobs = self._take_batch(group)
            if not jobs:
                continue
            now = time.perf_counter()
            nbytes = sum(j.nbytes for j in jobs)
            self._running[index] = Running(jobs, now + group.costs.cost(
                len(jobs), nbytes, self.config.max_batch_size, now))
            replies, batch = await self._compute(group, jobs)   # cancelled: close() answers
            del self._running[index]
            if batch is not None:
                self._learn(group, jobs, replies, batch)
            for job, reply in zip(jobs, replies):
                self._finish(job, reply)
            if self._queued:
                await asyncio.sleep(0)  # let the replies go out and IO run between batches

    def _learn(self, group: Group, jobs: list[Job], replies: list[Reply], batch: Any) -> None:
        """Fold a computed batch into its group's cost model and the metrics."""
        seconds, done = batch.tail_seconds, 0
        for job, reply in zip(jobs, replies):
            if type(reply) is P.Result:
                seconds += reply.decode_s
                done += job.nbytes
        group.costs.learn(seconds, done, time.perf_counter())
        if self.metrics:
            self.metrics.observe_batch(batch)

    async def _compute(self, group: Group, jobs: list[Job]) -> tuple[list[Reply], Any]:
        """Run one batch on the executor (threads here, or a Ray pool)."""
        try:
            return await self.compute.run(group, jobs)
        except Exception as exc:   # noqa: BLE001 - never lose a request
            log.exception("batch failed")
            return [P.Error.from_exception(j.msg.request_id, exc) for j in jobs], None

    def _pop(self, group: Group) -> Job:
        job = group.jobs.popleft()
        group.queued_bytes -= job.nbytes
        self._queued -= 1
        self._queued_bytes -= job.bytes_in
        return job

    def _take_batch(self, group: Group) -> list[Job]:
        """Up to ``max_batch_size`` jobs of ``group``; the expired ones answered DEADLINE."""
        jobs: list[Job] = []
        now = time.perf_counter()
        while group.jobs and len(jobs) < self.config.max_batch_size:
            job = self._pop(group)
            if job.deadline is not None and now > job.deadline:
                self._finish(job, expired(job, now))
            else:
                jobs.append(job)
        return jobs

    async def _next_group(self) -> Group:
        delay = self.config.max_queue_delay_s
        while True:
            now = time.perf_counter()
            best, wake = None, None
            for group in self._groups.values():
                if not group.jobs:
                    continue
                due = group.jobs[0].received + delay
                if len(group.jobs) >= self.config.max_batch_size or due <= now or not self._accepting:
                    if best is None or group.jobs[0].received < best.jobs[0].received:
                        best = group
                else:
                    wake = due if wake is None else min(wake, due)
            if best is not None:
                return best
            self._wakeup.clear()
            if wake is None:
                await self._wakeup.wait()
                continue
            try:
                await asyncio.wait_for(self._wakeup.wait(), wake - now)
            except asyncio.TimeoutError:
                pass

    def _run_batch(self, group: Group, jobs: list[Job]) -> tuple[list[Reply], BatchStats | None]:
        """Decode + tail of one formed batch (:func:`tether.cloud.batch.run_batch`)."""
        return run_batch(group, jobs, self.config.max_request_samples)

    # ---- bookkeeping ----------------------------------------------------------------------

    def _finish(self, job: Job, reply: Reply) -> None:
        """Answer ``job`` (once: a second answer is ignored)."""
        if job.answered:
            return
        job.answered = True
        if not job.future.done():        # a caller may have cancelled its wait
            job.future.set_result(reply)
        self._record(job.msg, reply, job.bytes_in)
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        if job.on_reply is not None:     # last: the books are closed when the reply leaves
            job.on_reply(reply)

    def _record(self, msg: P.Infer, reply: Reply, bytes_in: int) -> None:
        if self.metrics is None:
            return
        group = self._groups.get((msg.fingerprint, msg.split, msg.codec))
        # labels only from validated values: hostile ids must not grow the label set
        model, split, codec = ((group.bundle.model_id, group.split, group.codec_id) if group
                               else ("unknown", "unknown", "unknown"))
        if isinstance(reply, P.Result):
            stats = CloudRequestStats(model, split, codec, "ok", "", reply.queue_s,
                                      reply.decode_s, bytes_in)
        elif isinstance(reply, P.Busy):
            stats = CloudRequestStats(model, split, codec, "busy", reply.reason)
        else:
            stats = CloudRequestStats(model, split, codec, "error", reply.code)
        self.metrics.observe_request(stats)


def _done(reply: Reply) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future
