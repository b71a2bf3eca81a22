"""The cloud's LLM engine in process: batching, session rules, expiry and memory bounds."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tether.cloud.llm import LLMEngine, LLMEngineConfig, _Job
from tether.core import protocol as P
from tether.core.errors import (BundleError, BusyError, ConfigError, PayloadError, SessionError,
                                UnknownCodecError)
from tether.codecs import hidden_codec
from tether.partitioner.llm import EdgeLM

from .llm_tiny import tiny_checkpoint


def _msg(cls, rid, sid, ckpt, hidden, position=0, codec="fp16", split="layer2", **kw):
    encoded = hidden_codec(codec).encode(hidden)
    return cls(rid, sid, kw.pop("fingerprint", ckpt.fingerprint), split, codec, position,
               hidden.shape[0], encoded.header, None, tuple(encoded.payload))


def _job(msg):
    loop = asyncio.new_event_loop()
    try:
        return _Job(msg, loop.create_future())
    finally:
        loop.close()


def _token(reply):
    if isinstance(reply, P.Error):
        raise reply.to_exception()
    return int(reply.tensor(0)[0])


@pytest.fixture(scope="module")
def tiny():
    ckpt = tiny_checkpoint("llama")
    return ckpt, EdgeLM(ckpt, 2)


def _prefill_all(engine, ckpt, edge, prompts):
    caches, hidden = [], []
    for i, ids in enumerate(prompts):
        cache = edge.new_cache()
        h = edge(torch.tensor([ids]), cache, 0)[0]
        reply = engine.run_jobs([_job(_msg(P.Prefill, i, f"s{i}", ckpt, h))])[0]
        caches.append(cache)
        hidden.append(_token(reply))
    return caches, hidden


def test_batched_decode_equals_one_by_one(tiny):
    ckpt, edge = tiny
    prompts = [[1, 5, 9], [1, 7, 3, 8, 2, 6, 4], [1, 4]]
    tokens = {}
    for batched in (False, True):
        engine = LLMEngine(ckpt)
        caches, nxt = _prefill_all(engine, ckpt, edge, prompts)
        lengths = [len(p) for p in prompts]
        out = [list(nxt)]
        for _ in range(5):
            jobs = []
            for i, (cache, tok) in enumerate(zip(caches, nxt)):
                h = edge(torch.tensor([[tok]]), cache, lengths[i])[0]
                jobs.append(_job(_msg(P.Decode, 10 + i, f"s{i}", ckpt, h, position=lengths[i])))
                lengths[i] += 1
            replies = engine.run_jobs(jobs) if batched else [engine.run_jobs([j])[0] for j in jobs]
            assert all(r.batch_size == (3 if batched else 1) for r in replies)
            nxt = [_token(r) for r in replies]
            out.append(nxt)
        tokens[batched] = out
        assert (engine.stats["batches"] > 0) == batched
    assert tokens[True] == tokens[False]


def test_session_rules_are_session_errors(tiny):
    ckpt, edge = tiny
    engine = LLMEngine(ckpt)
    h = edge(torch.tensor([[1, 5, 9]]))[0]
    one = h[-1:]
    with pytest.raises(SessionError, match="unknown or expired"):
        _token(engine.run_jobs([_job(_msg(P.Decode, 1, "nope", ckpt, one, position=3))])[0])
    _token(engine.run_jobs([_job(_msg(P.Prefill, 2, "a", ckpt, h))])[0])
    with pytest.raises(SessionError, match="holds 3 tokens"):
        _token(engine.run_jobs([_job(_msg(P.Decode, 3, "a", ckpt, one, position=5))])[0])
    with pytest.raises(SessionError, match="position 0"):
        _token(engine.run_jobs([_job(_msg(P.Prefill, 4, "b", ckpt, h, position=2))])[0])
    assert isinstance(engine.run_jobs([_job(P.Close(5, "a"))])[0], P.Result)
    assert "a" not in engine.sessions


def test_bad_requests_get_clear_errors_and_others_are_served(tiny):
    ckpt, edge = tiny
    engine = LLMEngine(ckpt, LLMEngineConfig(codecs=("fp16",)))
    h = edge(torch.tensor([[1, 5]]))[0]
    jobs = [_job(_msg(P.Prefill, 1, "x", ckpt, h, fingerprint="0" * 64)),
            _job(_msg(P.Prefill, 2, "y", ckpt, h, codec="int8-token")),
            _job(_msg(P.Prefill, 3, "z", ckpt, h, split="layer9")),
            _job(P.Prefill(4, "w", ckpt.fingerprint, "layer2", "fp16", 0, 2,
                           {"codec": "fp16", "shape": [2, 32], "dtype": "float32"},
                           None, (b"short",))),
            _job(_msg(P.Prefill, 5, "ok", ckpt, h))]
    replies = engine.run_jobs(jobs)
    codes = [r.code if isinstance(r, P.Error) else "ok" for r in replies]
    assert codes == [BundleError.code, UnknownCodecError.code, "unknown_split",
                     PayloadError.code, "ok"]


def test_idle_sessions_expire_and_memory_is_bounded(tiny):
    ckpt, edge = tiny
    engine = LLMEngine(ckpt, LLMEngineConfig(idle_timeout_s=5.0, max_sessions=2))
    h = edge(torch.tensor([[1, 5, 9]]))[0]
    for i in range(3):
        _token(engine.run_jobs([_job(_msg(P.Prefill, i, f"s{i}", ckpt, h))])[0])
    assert set(engine.sessions) == {"s1", "s2"} and engine.stats["evicted"] == 1
    per_session = engine.sessions["s1"].kv_bytes
    assert per_session == 2 * 2 * 3 * 2 * 8 * 4    # (k,v) x layers x tokens x kv heads x dim x fp32
    assert engine.expire(now=engine.sessions["s2"].last_used + 6.0) == 2
    assert not engine.sessions
    small = LLMEngine(ckpt, LLMEngineConfig(max_kv_bytes=per_session + 1))
    _token(small.run_jobs([_job(_msg(P.Prefill, 1, "a", ckpt, h))])[0])
    _token(small.run_jobs([_job(_msg(P.Prefill, 2, "b", ckpt, h))])[0])
    assert list(small.sessions) == ["b"]
    tiny_mem = LLMEngine(ckpt, LLMEngineConfig(max_kv_bytes=10))
    with pytest.raises(BusyError, match="max_kv_bytes"):
        _token(tiny_mem.run_jobs([_job(_msg(P.Prefill, 1, "a", ckpt, h))])[0])
    with pytest.raises(ConfigError):
        LLMEngineConfig(codecs=("jpeg75",))


def test_handle_queues_and_answers_concurrently(tiny):
    ckpt, edge = tiny
    h = edge(torch.tensor([[1, 5, 9]]))[0]

    async def main():
        engine = LLMEngine(ckpt)
        replies = await asyncio.gather(*[engine.handle(_msg(P.Prefill, i, f"s{i}", ckpt, h))
                                         for i in range(4)])
        await engine.close()
        return replies
    replies = asyncio.run(main())
    assert len({_token(r) for r in replies}) == 1 and all(r.queue_s >= 0 for r in replies)


def test_idle_sessions_expire_without_traffic(tiny):
    ckpt, edge = tiny
    h = edge(torch.tensor([[1, 5, 9]]))[0]

    async def main():
        engine = LLMEngine(ckpt, LLMEngineConfig(idle_timeout_s=0.2))
        _token(await engine.handle(_msg(P.Prefill, 1, "a", ckpt, h)))
        assert "a" in engine.sessions
        await asyncio.sleep(0.8)
        left = dict(engine.sessions)
        await engine.close()
        return left, engine.stats["expired"]
    left, expired = asyncio.run(main())
    assert left == {} and expired == 1


def test_jobs_of_one_session_keep_their_order_and_strangers_get_errors(tiny):
    ckpt, edge = tiny
    engine = LLMEngine(ckpt)
    h = edge(torch.tensor([[1, 5, 9]]))[0]
    _token(engine.run_jobs([_job(_msg(P.Prefill, 1, "a", ckpt, h))])[0])
    step = edge(torch.tensor([[1, 5, 9, 4]]))[0][-1:]
    replies = engine.run_jobs([_job(P.Close(2, "a")),
                               _job(_msg(P.Decode, 3, "a", ckpt, step, position=3)),
                               _job(P.Ping(4))])
    assert isinstance(replies[0], P.Result)
    assert replies[1].code == SessionError.code          # closed first, as sent
    assert replies[2].code == "protocol"
