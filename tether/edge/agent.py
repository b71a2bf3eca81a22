"""The edge agent: per request, ask the policy, run the head, offload, and always answer.

:meth:`EdgeAgent.infer` is the whole life of one request. The policy picks an action; the
head, exit and codec run in worker threads (the event loop stays free for IO); the cloud
link carries the tail request with the request's deadline. Compute is timed inside the
worker thread (service time); the wait behind other requests' compute (every compute thread
busy when it was submitted) is recorded apart as ``edge_wait_seconds``, so a saturated edge
does not look like a slow one to the calibration. The rest of ``total_seconds`` is the
daemon's own time (parsing, the decision, the hand-off to an idle thread and back, the
record): on a CPU-quota'd edge its CPU at the quota's pace, which the policy measures.
On timeout, BUSY, ERROR or a disconnected cloud the request is answered locally (whole
model, or an early exit) and marked ``outcome="fallback"`` with the reason; a policy with a
``patience`` (see :mod:`tether.core.policy`) stops waiting that long after the send, before
the deadline and answers locally (reason ``"overdue"``), racing the reply: a reply that
comes before the local answer is the answer after all (``"cloud"``) and the local run is
stopped; otherwise the reply is still awaited in the background, and the policy observes
it (or its failure) as if the edge had waited. Every request
yields one :class:`~tether.core.types.RequestRecord` for the sinks, the metrics and the policy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from tether.core.errors import (BusyError, DeadlineExceededError, InputShapeError,
                                PeerUnavailableError, TetherError)
from tether.core.policy import DecisionContext, Observation, Policy, patience_of
from tether.core.metrics import EdgeMetrics
from tether.core.types import LOCAL, Action, ActionKind, RequestRecord
from tether.core.wire import wire_size
from tether.edge.compute import INPUT, EdgeCompute, ExitAnswer, Stop
from tether.edge.config import EdgeConfig
from tether.edge.link import CloudLink, CloudReply, CloudRequest
from tether.edge.records import RecordSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeResult:
    """What an application gets back: logits of one sample, its class, and the record."""

    logits: np.ndarray
    prediction: int
    record: RequestRecord


class _Fallback(Exception):
    """Internal: answer this request locally for ``reason``."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


@dataclass
class _Timing:
    """Mutable per-request stopwatch, frozen into the record at the end."""

    head: float = 0.0
    encode: float = 0.0
    network: float = 0.0
    queue: float = 0.0
    decode: float = 0.0
    tail: float = 0.0
    local: float = 0.0
    wait: float = 0.0        # queued behind other requests' compute (and the loop's resume)
    sent: int = 0
    received: int = 0
    exit_answer: ExitAnswer | None = None
    patience: float | None = None     # the policy's wait for the reply after the send (s)
    sent_at: float = 0.0              # perf_counter() when the request went to the link
    late: asyncio.Future | None = None   # the reply still awaited after giving up (overdue)
    features: dict[str, np.ndarray] = field(default_factory=dict)


def default_edge_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class EdgeAgent:
    """Serves inference requests for one bundle with one cloud link (or none)."""

    def __init__(self, compute: EdgeCompute, policy: Policy, config: EdgeConfig,
                 link: CloudLink | None = None, sinks: Iterable[RecordSink] = (),
                 on_record: Callable[[RequestRecord], None] | None = None,
                 metrics: EdgeMetrics | None = None) -> None:
        self.compute = compute
        self.policy = policy
        self.config = config
        self.link = link
        self.sinks = list(sinks)
        self.on_record = on_record
        self.metrics = metrics
        self.inflight = 0
        self._computing = 0      # compute jobs submitted and not finished (all requests)
        self.edge_id = config.edge_id or default_edge_id()
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(config.compute_threads,
                                            thread_name_prefix="tether-edge-compute",
                                            initializer=lower_thread_priority,
                                            initargs=(config.compute_nice,)) \
            if config.compute_threads > 0 else None
        self._reserve = (config.fallback_reserve_seconds
                         if config.fallback_reserve_seconds is not None
                         else 1.5 * compute.local_seconds() + 0.002)
        self._last_queue_seconds = 0.0
        # offloads awaiting their reply within a policy's patience: (sent at, give up now)
        self._waiting: dict[object, tuple[float, asyncio.Event]] = {}
        if link is not None:
            link.set_rtt_callback(self._observe_rtt)
        if metrics is not None:       # read at scrape time: no per-request cost
            metrics.inflight.set_function(lambda: self.inflight)

    @property
    def cloud_available(self) -> bool:
        return self.link is not None and self.link.ready

    async def start(self) -> None:
        if self.link is not None:
            await self.link.start()

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for sink in self.sinks:
            sink.close()

    async def _run(self, timing: _Timing, fn: Callable[..., Any],
                   *args: Any) -> tuple[Any, float]:
        """Compute in a worker thread (or inline on the loop when ``compute_threads = 0``).

        Returns the result and its service seconds, timed inside the thread; the rest of the
        elapsed time is added to ``timing.wait`` when every thread was busy at the submission
        (queued behind other requests' compute). Handed to an idle thread, it is the daemon's
        own hand-off (a throttled process waits for its quota there), left out of the wait.
        """
        if self._executor is None:
            return _timed(fn, *args)
        queued = self._computing >= self.config.compute_threads
        self._computing += 1
        submitted = time.perf_counter()
        try:
            result, service = await asyncio.get_running_loop().run_in_executor(
                self._executor, _timed, fn, *args)
        finally:
            self._computing -= 1
        if queued:
            timing.wait += max(0.0, time.perf_counter() - submitted - service)
        return result, service

    # ---- one request -------------------------------------------------------------------

    async def infer(self, image: np.ndarray, deadline_seconds: float | None = None,
                    received: float | None = None) -> EdgeResult:
        """Answer one sample. Raises only for bad input (InputShapeError), never for the cloud.

        ``received``: ``time.perf_counter()`` when the request arrived (the local endpoint
        passes it), so the deadline and ``total_seconds`` include the wait in its queue.
        """
        t0 = time.perf_counter() if received is None else received
        start_wall = time.time() - (time.perf_counter() - t0)
        budget = deadline_seconds if deadline_seconds and deadline_seconds > 0 else \
            self.config.deadline_seconds
        x = self.compute.prepare(image)
        if x.shape[0] != 1:
            raise InputShapeError(f"the edge answers one sample per request, got a batch of "
                                  f"{x.shape[0]}; send images one by one (they run concurrently)")
        rid = next(self._ids)
        action = self._decide(budget)
        timing = _Timing()
        timing.patience = self._patience(action)
        self._gauge(+1)
        try:
            logits, outcome, reason = await self._answer(rid, action, x, t0 + budget, timing)
        finally:
            self._gauge(-1)
        logits = np.asarray(logits, dtype=np.float32).reshape(1, -1)
        prediction = int(np.argmax(logits[0]))
        record = RequestRecord(
            request_id=rid, edge_id=self.edge_id, start_time=start_wall, action=action.key,
            outcome=outcome, fallback_reason=reason, head_seconds=timing.head,
            encode_seconds=timing.encode, network_seconds=timing.network,
            cloud_queue_seconds=timing.queue, cloud_decode_seconds=timing.decode,
            tail_seconds=timing.tail, local_seconds=timing.local,
            edge_wait_seconds=timing.wait, total_seconds=time.perf_counter() - t0,
            bytes_sent=timing.sent, bytes_received=timing.received, prediction=prediction)
        self._finish(record, action, timing, t0)
        return EdgeResult(logits, prediction, record)

    def _decide(self, budget: float) -> Action:
        # the cloud's smoothed queue delay from heartbeats (fresh even when nothing is
        # offloaded), else the last RESULT's
        queue = getattr(self.link, "cloud_queue_seconds", self._last_queue_seconds)
        ctx = DecisionContext(now=time.monotonic(), deadline_seconds=budget,
                              cloud_available=self.cloud_available, cloud_queue_seconds=queue)
        try:
            return self.policy.decide(ctx)
        except Exception:   # noqa: BLE001 - a broken policy must not lose the request
            log.exception("policy %s failed; answering locally", getattr(self.policy, "name", "?"))
            return LOCAL

    def _patience(self, action: Action) -> float | None:
        """Seconds the policy waits for the cloud's reply to ``action`` (None: the deadline)."""
        if action.kind is ActionKind.LOCAL:
            return None
        try:
            return patience_of(self.policy, action)
        except Exception:   # noqa: BLE001 - a broken policy must not lose the request
            log.exception("policy %s patience failed; waiting until the deadline",
                          getattr(self.policy, "name", "?"))
            return None

    async def _answer(self, rid: int, action: Action, x: np.ndarray, deadline: float,
                      timing: _Timing) -> tuple[np.ndarray, str, str]:
        try:
            logits, outcome = await self._execute(rid, action, x, deadline, timing)
            return logits, outcome, ""
        except _Fallback as fb:
            log.debug("request %d falls back locally: %s (%s)", rid, fb.reason, fb.cause)
            if fb.reason == "overdue" and timing.late is not None:
                return await self._race(x, timing)
            return await self._local_answer(x, timing), "fallback", fb.reason

    async def _race(self, x: np.ndarray, timing: _Timing) -> tuple[np.ndarray, str, str]:
        """Overdue: the local answer, unless the reply it gave up on arrives first; then the
        cloud's answer is the request's and the local run is stopped (its CPU freed for the
        requests behind it)."""
        stop = Stop()
        local = asyncio.ensure_future(self._local_answer(x, timing, stop))
        late = timing.late
        done, _ = await asyncio.wait({local, late}, return_when=asyncio.FIRST_COMPLETED)
        won = local not in done and not late.cancelled() and late.exception() is None
        if self.metrics is not None:
            self.metrics.observe_race("cloud" if won else "local")
        if won:
            stop()
            local.cancel()
            reply = late.result()
            timing.late = None              # observed now, as any reply
            timing.network = reply.network_seconds
            timing.queue, timing.decode, timing.tail = (reply.queue_seconds,
                                                        reply.decode_seconds, reply.tail_seconds)
            timing.sent, timing.received = reply.bytes_sent, reply.bytes_received
            self._last_queue_seconds = reply.queue_seconds
            return reply.logits, "cloud", ""
        return await local, "fallback", "overdue"

    def _gauge(self, delta: int) -> None:
        self.inflight += delta

    async def _execute(self, rid: int, action: Action, x: np.ndarray, deadline: float,
                       timing: _Timing) -> tuple[np.ndarray, str]:
        if action.kind is ActionKind.LOCAL:
            return await self._full(x, timing), "local"
        split = INPUT if action.kind is ActionKind.OFFLOAD else str(action.split)
        if action.kind is not ActionKind.EXIT and not self.cloud_available:
            raise _Fallback("disconnected")          # known down: no head work wasted
        try:
            if action.kind is ActionKind.EXIT:
                features = await self._head(split, x, timing)
                answer = await self._exit(split, features, timing)
                if answer.confident:
                    return answer.logits, "exit"
                if not self.cloud_available:
                    raise _Fallback("disconnected")
                encoded, timing.encode = await self._run(timing, self.compute.encode, split,
                                                         action.codec, features)
            else:
                encoded = await self._head_and_encode(split, str(action.codec), x, timing)
            if not self.cloud_available:
                raise _Fallback("disconnected")
        except TetherError as exc:   # the policy asked for a split/codec/exit this bundle lacks
            raise _Fallback("error", exc) from exc
        reply = await self._offload(rid, split, action.codec, encoded, deadline, timing)
        timing.queue, timing.decode, timing.tail = (reply.queue_seconds, reply.decode_seconds,
                                                    reply.tail_seconds)
        timing.network = reply.network_seconds
        self._last_queue_seconds = reply.queue_seconds
        return reply.logits, "cloud"

    async def _offload(self, rid: int, split: str, codec: str, encoded: Any, deadline: float,
                       timing: _Timing) -> CloudReply:
        budget = deadline - time.perf_counter() - self._reserve
        if budget <= 0:
            raise _Fallback("timeout")
        if self.link is None:
            raise _Fallback("disconnected")
        request = CloudRequest(rid, split, codec, dict(encoded.header), list(encoded.payload),
                               budget)
        t = timing.sent_at = time.perf_counter()
        try:
            reply = await self._await_reply(request, timing)
        except _Fallback:       # overdue: the bytes went, the reply is still awaited
            timing.network = time.perf_counter() - t
            timing.sent = wire_size(request.payload)
            raise
        except (DeadlineExceededError, asyncio.TimeoutError) as exc:
            reason, cause = "timeout", exc
        except BusyError as exc:
            reason, cause = "busy", exc
        except PeerUnavailableError as exc:
            reason, cause = "disconnected", exc
        except TetherError as exc:
            reason, cause = "error", exc
        except Exception as exc:   # noqa: BLE001 - a link bug must not lose the request
            log.exception("cloud link failed on request %d", rid)
            reason, cause = "error", exc
        else:
            timing.sent, timing.received = reply.bytes_sent, reply.bytes_received
            return reply
        timing.network = time.perf_counter() - t
        timing.sent = getattr(cause, "bytes_sent", 0)
        timing.received = getattr(cause, "bytes_received", 0)
        raise _Fallback(reason, cause)

    async def _await_reply(self, request: CloudRequest, timing: _Timing) -> CloudReply:
        """The link's reply; when the policy's patience ends first, raise ``_Fallback(
        "overdue")`` with the request left pending in ``timing.late`` (for the policy).

        The link is FIFO: what this edge sent after an overdue request waits behind its
        bytes, so it is overdue too and is given up at the same moment (one stalled uplink
        must not cost each queued request its own patience)."""
        if timing.patience is None or timing.patience >= request.budget_seconds:
            return await self.link.infer(request)
        pending = asyncio.ensure_future(self.link.infer(request))
        behind = asyncio.Event()      # set when an earlier send goes overdue
        key = object()
        self._waiting[key] = (timing.sent_at, behind)
        stop = asyncio.ensure_future(behind.wait())
        try:
            done, _ = await asyncio.wait({pending, stop}, timeout=timing.patience,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pending.cancel()
            raise
        finally:
            del self._waiting[key]
            stop.cancel()
        if pending not in done:
            timing.late = pending
            if not behind.is_set():
                for sent_at, event in self._waiting.values():
                    if sent_at >= timing.sent_at:
                        event.set()
            raise _Fallback("overdue")
        return pending.result()

    async def _full(self, x: np.ndarray, timing: _Timing, stop: Stop | None = None) -> np.ndarray:
        logits, service = await self._run(timing, self.compute.full, x, stop)
        timing.local += service
        return logits

    async def _head(self, split: str, x: np.ndarray, timing: _Timing) -> np.ndarray:
        if split == INPUT:
            return x
        features, service = await self._run(timing, self.compute.head, split, x)
        timing.head += service
        timing.features[split] = features
        return features

    async def _head_and_encode(self, split: str, codec: str, x: np.ndarray,
                               timing: _Timing) -> Any:
        """Head and encode as one compute job: no later request's compute runs between them
        (two jobs let a local answer that arrived meanwhile delay this send by its whole run)."""
        (encoded, features, head), service = await self._run(
            timing, self._head_then_encode, split, codec, x)
        timing.head += head
        timing.encode = service - head
        if features is not x:
            timing.features[split] = features
        return encoded

    def _head_then_encode(self, split: str, codec: str,
                          x: np.ndarray) -> tuple[Any, np.ndarray, float]:
        if split == INPUT or self.compute.replaces_head(split, codec):
            features, head = x, 0.0            # student codec: its encoder is the head
        else:
            t = time.perf_counter()
            features = self.compute.head(split, x)
            head = time.perf_counter() - t
        return self.compute.encode(split, codec, features), features, head

    async def _exit(self, split: str, features: np.ndarray, timing: _Timing) -> ExitAnswer:
        answer, service = await self._run(timing, self.compute.early_exit, split, features)
        timing.local += service
        timing.exit_answer = answer
        return answer

    async def _local_answer(self, x: np.ndarray, timing: _Timing,
                            stop: Stop | None = None) -> np.ndarray:
        """Fallback: the early exit when configured and available, else the whole model
        (``stop``: see :meth:`_race`)."""
        if self.config.fallback == "exit" and self.compute.exit_splits:
            if timing.exit_answer is not None:
                return timing.exit_answer.logits
            split = self.compute.exit_splits[0]
            try:
                features = timing.features.get(split)
                if features is None:
                    features = await self._head(split, x, timing)
                return (await self._exit(split, features, timing)).logits
            except TetherError as exc:
                log.warning("early-exit fallback failed (%s); using the whole model", exc)
        return await self._full(x, timing, stop)

    # ---- feedback ----------------------------------------------------------------------

    def _finish(self, record: RequestRecord, action: Action, timing: _Timing, t0: float) -> None:
        for sink in self.sinks:
            try:
                sink.write(record)
            except OSError as exc:   # a full disk must not take requests down
                log.error("records sink failed: %s", exc)
        if self.metrics is not None:
            self.metrics.observe(record)
        if self.on_record is not None:
            self.on_record(record)
        if timing.late is not None:   # given up at its patience: observed at the reply
            timing.late.add_done_callback(lambda task: self._observe_late(task, action, timing, t0))
            return
        self.policy.observe(Observation(
            now=time.monotonic(), action=action, bytes_sent=record.bytes_sent,
            bytes_received=record.bytes_received, network_seconds=record.network_seconds,
            cloud_queue_seconds=record.cloud_queue_seconds, total_seconds=record.total_seconds,
            ok=record.outcome != "fallback", exited=record.outcome == "exit",
            **_calibration(record)))

    def _observe_late(self, task: asyncio.Future, action: Action, timing: _Timing,
                      t0: float) -> None:
        """What the policy would have observed had the edge waited for an offload it gave
        up at its patience: the reply (a throughput and compute sample) or the failure."""
        if task.cancelled():
            return
        exc, now = task.exception(), time.perf_counter()
        if exc is None:
            reply = task.result()
            self._last_queue_seconds = reply.queue_seconds
            obs = Observation(
                now=time.monotonic(), action=action, bytes_sent=reply.bytes_sent,
                bytes_received=reply.bytes_received, network_seconds=reply.network_seconds,
                cloud_queue_seconds=reply.queue_seconds, total_seconds=now - t0,
                edge_seconds=timing.head + timing.encode,
                cloud_seconds=reply.decode_seconds + reply.tail_seconds)
        else:
            obs = Observation(
                now=time.monotonic(), action=action, bytes_sent=getattr(exc, "bytes_sent", 0),
                bytes_received=getattr(exc, "bytes_received", 0),
                network_seconds=now - timing.sent_at, total_seconds=now - t0, ok=False)
        try:
            self.policy.observe(obs)
        except Exception:   # noqa: BLE001 - a callback has nobody to raise to
            log.exception("policy %s failed to observe a late reply",
                          getattr(self.policy, "name", "?"))

    def _observe_rtt(self, rtt: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_rtt(rtt)
        self.policy.observe(Observation(now=time.monotonic(), rtt_seconds=rtt))


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps nicer (Linux: per thread; raising niceness needs
    no privilege). A compute thread below the event loop lets the loop's receives, sends and
    replies go first on a weak core instead of sharing it with a whole-model run."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:   # not Linux semantics, or a sandbox: same priority then
        log.warning("cannot lower the compute thread's priority: %s", exc)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Run ``fn`` and return its result with its wall-clock service seconds (in this thread:
    a CPU quota throttles wall time, and the policy prices wall time, not CPU time)."""
    t = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t


def _calibration(record: RequestRecord) -> dict[str, float | None]:
    """The measured compute of one request, for the policy's online calibration.

    Service time only: ``edge_wait_seconds`` (queued behind other requests' compute) is load,
    not the device's speed, and would inflate the learned edge slowdown."""
    if record.outcome == "fallback":   # the local answer is not this action's cost
        return {"edge_seconds": None, "cloud_seconds": None}
    edge = record.head_seconds + record.encode_seconds + record.local_seconds
    cloud = record.cloud_decode_seconds + record.tail_seconds if record.outcome == "cloud" else None
    return {"edge_seconds": edge, "cloud_seconds": cloud,
            "edge_wait_seconds": record.edge_wait_seconds}
