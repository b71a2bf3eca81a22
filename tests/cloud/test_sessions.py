"""The cloud core's session gate: bounded sessions, KV memory and step queue (BUSY with a reason
and a retry estimate), session bookkeeping, drain with exactly one answer per step, metrics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from tether.cloud.sessions import SessionGate, SessionLimits
from tether.core import protocol as P
from tether.core.errors import ConfigError
from tether.core.metrics import CloudMetrics, render


class _Handler:
    """A session handler that can hold its answers (a busy engine)."""

    bundle = P.BundleInfo("fake-llm", "f" * 64)

    def __init__(self, limits: SessionLimits) -> None:
        self.session_limits = limits
        self.kv_bytes = 0
        self.hold = False
        self.release = asyncio.Event()
        self.closed = False
        self.handled = 0

    async def handle(self, msg):
        self.handled += 1
        if self.hold:
            await self.release.wait()
        if isinstance(msg, P.Decode) and msg.session_id == "lost":
            return P.Error(msg.request_id, "session", "unknown or expired session: re-prefill")
        return P.Result(msg.request_id)

    async def close_sessions(self):
        self.closed = True


def _prefill(rid, sid):
    return P.Prefill(rid, sid, "f" * 64, "layer2", "fp16", 0, 1)


def _decode(rid, sid):
    return P.Decode(rid, sid, "", "layer2", "fp16", 1, 1)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_sessions_and_memory_are_bounded_with_busy_and_freed_by_close():
    async def main():
        handler = _Handler(SessionLimits(max_sessions=2, max_kv_bytes=1000, max_queue=8))
        gate = SessionGate(handler)
        assert isinstance(await gate.submit(_prefill(1, "a")), P.Result)
        assert isinstance(await gate.submit(_prefill(2, "b")), P.Result)
        full = await gate.submit(_prefill(3, "c"))
        again = await gate.submit(_prefill(4, "a"))          # re-prefill of an open session
        await gate.submit(P.Close(5, "a"))
        admitted = await gate.submit(_prefill(6, "c"))
        await gate.submit(P.Close(10, "c"))
        handler.kv_bytes = 1000                               # the caches are full
        memory = await gate.submit(_prefill(7, "d"))
        step = await gate.submit(_decode(8, "b"))             # open sessions go on
        lost = await gate.submit(_decode(9, "lost"))
        return full, again, admitted, memory, step, lost, gate.open_sessions, handler.handled
    full, again, admitted, memory, step, lost, open_sessions, handled = _run(main())
    assert isinstance(full, P.Busy) and full.reason == "sessions_full" and full.retry_after_s > 0
    assert isinstance(again, P.Result) and isinstance(admitted, P.Result)
    assert isinstance(memory, P.Busy) and memory.reason == "memory"
    assert isinstance(step, P.Result) and lost.code == "session"
    assert open_sessions == 1                                 # b; "lost" never counted
    assert handled == 8                                       # refusals never reached it


def test_step_queue_is_bounded_and_drain_answers_each_step_once():
    async def main():
        registry = CollectorRegistry()
        handler = _Handler(SessionLimits(max_sessions=8, max_queue=2))
        gate = SessionGate(handler, CloudMetrics(registry))
        handler.hold = True
        held = [gate.submit(_prefill(1, "a")), gate.submit(_prefill(2, "b"))]
        await asyncio.sleep(0)
        queue_full = await gate.submit(_prefill(3, "c"))
        drained = await gate.drain(timeout=0.05)              # the engine is stuck
        late = await gate.submit(_decode(4, "a"))
        close_now = await gate.submit(P.Close(5, "b"))        # freed at once while draining
        await gate.close()
        answers = [f.result() for f in held]
        handler.release.set()                                 # the engine finishes after all
        await asyncio.sleep(0.01)
        return (queue_full, drained, late, close_now, answers, [f.result() for f in held],
                gate, handler, render(registry).decode())
    queue_full, drained, late, close_now, answers, after, gate, handler, text = _run(main())
    assert isinstance(queue_full, P.Busy) and queue_full.reason == "queue_full"
    assert queue_full.queue_depth == 2 and queue_full.retry_after_s > 0
    assert drained is False and late.reason == "draining" and isinstance(close_now, P.Result)
    assert [a.reason for a in answers] == ["draining", "draining"] and after == answers
    assert gate.queue_depth == 0 and gate.open_sessions == 0 and handler.closed
    assert 'tether_cloud_busy_total{reason="queue_full"} 1.0' in text
    assert 'tether_cloud_busy_total{reason="draining"} 3.0' in text
    assert 'tether_cloud_llm_steps_total{kind="prefill",outcome="busy"} 3.0' in text
    assert "tether_cloud_llm_step_queue_depth 0.0" in text


def test_limits_are_validated():
    with pytest.raises(ConfigError):
        SessionLimits(max_queue=0)
    with pytest.raises(ConfigError):
        SessionLimits(idle_timeout_s=0)
