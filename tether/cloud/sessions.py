"""LLM sessions in the cloud core: admission, bounds, drain and metrics around a session handler.

:class:`~tether.cloud.core.CloudCore` hands every PREFILL/DECODE/CLOSE to a
:class:`SessionGate`, which answers BUSY at once, never queueing without bound, when

* the cloud is draining (``"draining"``),
* the session steps admitted and not yet answered reach ``max_queue`` (``"queue_full"``),
* a PREFILL would open a session beyond ``max_sessions`` (``"sessions_full"``) or the KV
  caches already hold ``max_kv_bytes`` (``"memory"``),

each BUSY with the queue depth and a retry estimate. Admitted steps go to the handler
(:class:`~tether.cloud.llm.LLMEngine`, which batches single-token DECODEs, or the Ray pool's
session router) and are answered exactly once: by the handler, or BUSY ``"draining"`` when
:meth:`SessionGate.close` cuts them off. CLOSE is always admitted (it frees memory).

Open sessions are counted here, for every handler: a successful PREFILL opens one, CLOSE or
a SessionError ("unknown, expired, evicted") forgets it, and one idle longer than
``idle_timeout_s`` (the engine's expiry) no longer counts.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from tether.core import protocol as P
from tether.core.errors import ConfigError, SessionError
from tether.core.metrics import CloudMetrics, SessionStepStats

Reply = Any   # a protocol message (Result, Busy, Error)
SESSION_MESSAGES = (P.Prefill, P.Decode, P.Close)


@dataclass(frozen=True)
class SessionLimits:
    """Bounds of the LLM sessions a cloud admits (an engine's config provides them)."""

    max_sessions: int = 64
    max_kv_bytes: int = 256 * 1024 * 1024
    max_queue: int = 256                 # session steps admitted, not answered; beyond: BUSY
    idle_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_kv_bytes, self.max_queue) < 1:
            raise ConfigError("max_sessions, max_kv_bytes and max_queue must be positive")
        if self.idle_timeout_s <= 0:
            raise ConfigError("idle_timeout_s must be > 0")


class SessionHandler(Protocol):
    """Serves PREFILL/DECODE/CLOSE (:class:`tether.cloud.llm.LLMEngine`, the Ray pool's
    :class:`tether.cloud.ray_pool.RaySessions`); ``bundle`` is listed in READY.

    Optional: ``session_limits`` (:class:`SessionLimits`; defaults otherwise), ``kv_bytes``
    (bytes of the KV caches held: the memory bound; without it only the session count
    bounds memory) and ``async close_sessions()`` (drop every session at the end of a drain).
    """

    bundle: P.BundleInfo

    async def handle(self, msg: Any) -> Reply: ...


@dataclass(eq=False)
class _Step:
    msg: Any
    kind: str
    received: float
    future: asyncio.Future
    task: asyncio.Future | None = None
    answered: bool = False


@dataclass
class _Open:
    opened: float
    last_used: float = field(default=0.0)


class SessionGate:
    """Admission, bounds, drain and metrics of the LLM session steps of one cloud."""

    def __init__(self, handler: SessionHandler, metrics: CloudMetrics | None = None) -> None:
        self.handler = handler
        self.limits: SessionLimits = getattr(handler, "session_limits", SessionLimits())
        self.metrics = metrics
        self._open: OrderedDict[str, _Open] = OrderedDict()   # least recently used first
        self._steps: set[_Step] = set()
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._step_s = 0.0          # recent receipt-to-answer time of a step (EWMA)
        self._lifetime_s = 0.0      # recent session lifetime, PREFILL to CLOSE (EWMA)
        if metrics is not None:
            metrics.track_llm(lambda: len(self._open), lambda: self.kv_bytes,
                              lambda: len(self._steps))

    @property
    def bundle(self) -> P.BundleInfo:
        return self.handler.bundle

    @property
    def kv_bytes(self) -> int:
        return int(getattr(self.handler, "kv_bytes", 0))

    @property
    def open_sessions(self) -> int:
        return len(self._open)

    @property
    def queue_depth(self) -> int:
        return len(self._steps)

    # ---- admission ------------------------------------------------------------------------

    def submit(self, msg: Any, received: float | None = None) -> asyncio.Future:
        """Admit one session step: its future resolves to RESULT, BUSY or ERROR (once)."""
        received = time.perf_counter() if received is None else received
        step = _Step(msg, type(msg).__name__.lower(), received,
                     asyncio.get_running_loop().create_future())
        if isinstance(msg, P.Close) and not self._accepting:
            self._forget(msg.session_id)            # every session is closed by the drain
            self._finish(step, P.Result(msg.request_id))
            return step.future
        refusal = self._refusal(msg)
        if refusal is not None:
            self._finish(step, refusal)
            return step.future
        if isinstance(msg, P.Prefill):              # the slot is held while it runs
            self._touch(msg.session_id)
        self._steps.add(step)
        self._idle.clear()
        step.task = asyncio.ensure_future(self._run(step))
        return step.future

    def _refusal(self, msg: Any) -> P.Busy | None:
        if not self._accepting:
            return P.Busy(msg.request_id, "draining", len(self._steps))
        if isinstance(msg, P.Close):
            return None
        if len(self._steps) >= self.limits.max_queue:
            return self._busy(msg, "queue_full", self._queue_wait())
        if isinstance(msg, P.Prefill) and msg.session_id not in self._open:
            self._expire(time.monotonic())
            if len(self._open) >= self.limits.max_sessions:
                return self._busy(msg, "sessions_full", self._session_wait())
            if self.kv_bytes >= self.limits.max_kv_bytes:
                return self._busy(msg, "memory", self._session_wait())
        return None

    def _busy(self, msg: Any, reason: str, retry_s: float) -> P.Busy:
        return P.Busy(msg.request_id, reason, len(self._steps), retry_s)

    def _queue_wait(self) -> float:
        """Seconds until a queue slot frees: the recent step time (one batch answers many)."""
        return max(self._step_s, 0.001)

    def _session_wait(self) -> float:
        """Seconds until a session slot frees: the recent lifetime less the oldest one's age."""
        if not self._open:
            return self._queue_wait()
        oldest = min(o.opened for o in self._open.values())
        return max(self._queue_wait(), self._lifetime_s - (time.monotonic() - oldest))

    # ---- answers --------------------------------------------------------------------------

    async def _run(self, step: _Step) -> None:
        try:
            reply = await self.handler.handle(step.msg)
        except asyncio.CancelledError:
            return          # close() answered it
        except Exception as exc:  # noqa: BLE001 - an error reply, never a lost step
            reply = P.Error.from_exception(step.msg.request_id, exc)
        self._finish(step, reply)

    def _finish(self, step: _Step, reply: Reply) -> None:
        """Answer ``step`` once; keep the session count and the metrics."""
        if step.answered:
            return
        step.answered = True
        if not step.future.done():
            step.future.set_result(reply)
        self._steps.discard(step)
        if not self._steps:
            self._idle.set()
        seconds = time.perf_counter() - step.received
        if isinstance(reply, P.Result):
            self._step_s = seconds if not self._step_s else 0.8 * self._step_s + 0.2 * seconds
        self._track(step, reply)
        if self.metrics is not None:
            outcome, reason = _outcome(reply)
            self.metrics.observe_session_step(SessionStepStats(step.kind, outcome, reason,
                                                               seconds))

    def _track(self, step: _Step, reply: Reply) -> None:
        msg = step.msg
        if isinstance(reply, P.Busy) and step.task is None:
            return                                  # refused at the door: nothing changed
        if isinstance(msg, P.Close):
            self._forget(msg.session_id, closed=True)
        elif isinstance(reply, P.Result):
            self._touch(msg.session_id)
        elif isinstance(msg, P.Prefill) or getattr(reply, "code", "") == SessionError.code:
            self._forget(msg.session_id)            # not opened, or lost by the engine
        elif msg.session_id in self._open:
            self._touch(msg.session_id)

    def _touch(self, session_id: str) -> None:
        now = time.monotonic()
        entry = self._open.get(session_id)
        if entry is None:
            self._open[session_id] = _Open(now, now)
        else:
            entry.last_used = now
            self._open.move_to_end(session_id)

    def _forget(self, session_id: str, closed: bool = False) -> None:
        entry = self._open.pop(session_id, None)
        if entry is not None and closed:
            life = time.monotonic() - entry.opened
            self._lifetime_s = life if not self._lifetime_s else 0.8 * self._lifetime_s + 0.2 * life

    def _expire(self, now: float) -> None:
        while self._open:
            session_id, entry = next(iter(self._open.items()))
            if now - entry.last_used <= self.limits.idle_timeout_s:
                return
            del self._open[session_id]

    # ---- drain ----------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new steps (BUSY "draining"), wait for admitted ones; True if all answered."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        """Answer every step still open BUSY "draining" and close every session."""
        self._accepting = False
        for step in list(self._steps):
            self._finish(step, P.Busy(step.msg.request_id, "draining", len(self._steps)))
            if step.task is not None:
                step.task.cancel()
        self._open.clear()
        close_sessions = getattr(self.handler, "close_sessions", None)
        if close_sessions is not None:
            await close_sessions()


def _outcome(reply: Reply) -> tuple[str, str]:
    if isinstance(reply, P.Result):
        return "ok", ""
    if isinstance(reply, P.Busy):
        return "busy", reply.reason
    return "error", getattr(reply, "code", "internal")
