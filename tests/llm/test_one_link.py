"""LLM sessions on the edge's one cloud link and the cloud's one core, real sockets on 127.0.0.1:
CURVE, a cloud killed mid-generation (the trained exit head goes on, then the edge offloads
again), 64 streams against a cloud of 8 sessions (BUSY, bounded memory, every stream ends),
SIGTERM drain (every open step answered exactly once, sessions closed)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import torch
from prometheus_client import CollectorRegistry

from tether.cloud.config import CloudConfig
from tether.cloud.llm import LLMEngine, LLMEngineConfig, LLMServer
from tether.core import protocol as P
from tether.core.errors import BusyError, PeerUnavailableError, TetherError
from tether.core.metrics import CloudMetrics, render
from tether.edge.llm import GenerateConfig, LLMEdge
from tether.partitioner.llm import EdgeLM, new_exit_head, split_llm, train_exit_head

from support.curve import curve_keys
from support.procs import Daemon, free_port

from .links import zmq_link

PATIENT = 30.0      # the shared 2-core machine can be very slow: never fall back by accident
STEPS = 12


@pytest.fixture(scope="module")
def reference(stories_full):
    out = stories_full.generate(torch.tensor([[1]]), max_new_tokens=32, do_sample=False)
    return out[0, 1:].tolist()


@pytest.fixture(scope="module")
def with_exit(stories):
    """Layers [0, 2) with an untrained exit head: the mechanics of going local, not quality."""
    part = EdgeLM(stories, 2)
    part.exit_head = new_exit_head(part)
    return part


async def _collect(edge, steps=STEPS, on_token=None):
    events = []
    async for ev in edge.generate([1], steps, stop_at_eos=False):
        events.append(ev)
        if on_token is not None:
            await on_token(len(events))
    return events


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else "")) and (not labels or want in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_generation_over_curve_and_a_stranger_gets_no_service(stories, reference, tmp_path):
    keys = curve_keys(tmp_path)
    fp = stories.fingerprint

    async def main():
        config = CloudConfig(bind="tcp://127.0.0.1:0", preload=False, curve=keys.cloud())
        server = LLMServer(LLMEngine(stories, LLMEngineConfig(), "stories260K"), config.bind,
                           config=config)
        endpoint = await server.start()
        good = zmq_link(endpoint, fp, keys.client(keys.edge_secret))
        bad = zmq_link(endpoint, fp, keys.client(keys.stranger_secret))
        try:
            edge = LLMEdge(EdgeLM(stories, 2), fp, stories.tokenizer(),
                           GenerateConfig(timeout_s=PATIENT), good)
            events = await _collect(edge, 16)
            stranger = LLMEdge(EdgeLM(stories, 2), fp, stories.tokenizer(),
                               GenerateConfig(timeout_s=0.5, first_step_timeout_s=1.0), bad)
            with pytest.raises(PeerUnavailableError, match="no trained exit head") as info:
                await _collect(stranger, 4)
            return events, info.value, bad.ready, server.engine.stats
        finally:
            await good.close()
            await bad.close()
            await server.close()
    events, error, stranger_ready, _ = asyncio.run(main())
    assert [e.token for e in events] == reference[:16]
    assert {e.source for e in events} == {"cloud"} and all(e.bytes_sent > 0 for e in events)
    assert not stranger_ready and "not connected" in str(error)


@pytest.mark.slow
def test_cloud_killed_mid_generation_exit_head_goes_on_then_offloading_resumes(
        assets, stories, stories_full, exit_training_tokens, tmp_path):
    """A real `tether cloud` process SIGKILLed after 6 tokens, restarted after 14: the trained
    exit head answers in between, the link reconnects by itself, the session is re-prefilled;
    the record names both switches."""
    part, cloud_part = split_llm(stories, 3)
    part.exit_head = train_exit_head(part, cloud_part, exit_training_tokens, steps=60)
    port = free_port()
    args = ["cloud", "--llm-checkpoint", str(assets / "tinyllm" / "stories260K.bin"),
            "--bind", f"tcp://127.0.0.1:{port}", "--torch-threads", "1"]
    clouds = [Daemon(args, tmp_path / "cloud-1.log").start()]

    async def main():
        link = zmq_link(f"tcp://127.0.0.1:{port}", stories.fingerprint)
        edge = LLMEdge(part, stories.fingerprint, stories.tokenizer(),
                       GenerateConfig(timeout_s=2.0, retry_after_s=0.1,
                                      first_step_timeout_s=PATIENT), link)

        async def outage(n):
            if n == 6:
                clouds[0].kill()                                  # SIGKILL: no goodbye
            if n == 14:
                second = Daemon(args, tmp_path / "cloud-2.log")
                clouds.append(second)
                await asyncio.to_thread(second.start)
                assert await link.wait_ready(PATIENT)             # reconnected by itself
        try:
            return await _collect(edge, 32, outage), edge.records[-1], link.connects
        finally:
            await link.close()
    try:
        events, record, connects = asyncio.run(main())
    finally:
        for cloud in clouds:
            cloud.kill()
    sources = [e.source for e in events]
    assert sources[:6] == ["cloud"] * 6 and sources[6:14] == ["local"] * 8, sources
    assert set(sources[14:]) == {"cloud"} and events[14].reprefilled and connects == 2
    assert (record.cloud, record.local, record.exit, record.error) == (24, 8, 0, "")
    assert [(i, src) for i, src, _ in record.switches] == [(6, "local"), (14, "cloud")]
    assert record.switches[0][2] in ("unavailable", "deadline")
    tokens = [1] + [e.token for e in events]
    with torch.no_grad():
        argmax = stories_full(torch.tensor([tokens])).logits[0].argmax(-1).tolist()
    for i, e in enumerate(events):      # after the outage the cloud saw exactly the emitted text
        if e.source == "cloud":
            assert e.token == argmax[i], f"token {i}"


def test_64_streams_against_8_sessions_busy_bounded_and_every_stream_ends(stories, with_exit,
                                                                          reference):
    config = LLMEngineConfig(max_sessions=8, max_queue=16, max_kv_bytes=4 << 20)
    fp = stories.fingerprint

    async def main():
        registry = CollectorRegistry()
        server = LLMServer(LLMEngine(stories, config, "stories260K"), "tcp://127.0.0.1:0",
                           metrics=CloudMetrics(registry))
        endpoint = await server.start()
        links = [zmq_link(endpoint, fp) for _ in range(8)]
        edges = [LLMEdge(with_exit if i % 2 else EdgeLM(stories, 2), fp, stories.tokenizer(),
                         GenerateConfig(timeout_s=PATIENT, retry_after_s=0.05), link)
                 for i, link in enumerate(links)]
        peak, done = Counter(), asyncio.Event()

        async def watch():
            gate = server.core.gate
            while not done.is_set():
                for key, value in (("sessions", len(server.engine.sessions)),
                                   ("admitted", gate.open_sessions),
                                   ("queue", gate.queue_depth), ("kv", server.engine.kv_bytes)):
                    peak[key] = max(peak[key], value)
                await asyncio.sleep(0.001)

        async def stream(edge):
            try:
                return await _collect(edge)
            except TetherError as exc:
                return exc
        watcher = asyncio.create_task(watch())
        # the streams without an exit head start first and hold the cloud's 8 sessions (which
        # streams win the race otherwise depends on which links finish their handshake first)
        plain = [asyncio.create_task(stream(edges[i % 8])) for i in range(0, 64, 2)]
        deadline = time.monotonic() + PATIENT
        while server.core.gate.open_sessions < 8 and not all(t.done() for t in plain) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        exiting = [asyncio.create_task(stream(edges[i % 8])) for i in range(1, 64, 2)]
        results = [r for pair in zip(await asyncio.gather(*plain), await asyncio.gather(*exiting))
                   for r in pair]
        done.set()
        await watcher
        await asyncio.sleep(0.2)                     # the last CLOSEs
        left = server.core.gate.open_sessions, len(server.engine.sessions)
        text = render(registry).decode()
        records = [r for e in edges[1::2] for r in e.records]
        for link in links:
            await link.close()
        await server.close()
        return results, peak, left, text, records
    results, peak, left, text, records = asyncio.run(main())
    plain, exiting = results[0::2], results[1::2]
    busy = [r for r in plain if isinstance(r, BaseException)]
    # the excess is refused by the gate: no session slot, or (rarely, when 8 decodes and 8
    # CLOSEs are in flight at once) no queue slot; never anything but BUSY
    odd = [f"{type(r).__name__}: {r}" for r in busy
           if not (isinstance(r, BusyError) and ("sessions_full" in str(r)
                                                 or "queue_full" in str(r)))]
    assert not odd, odd
    assert any("sessions_full" in str(r) for r in busy)
    for events in (r for r in plain if not isinstance(r, BaseException)):
        assert [e.token for e in events] == reference[:STEPS]
        assert {e.source for e in events} == {"cloud"}
    assert all(len(r) == STEPS for r in exiting)                  # the exit head went on
    assert busy and len(busy) < len(plain)                       # BUSY for the excess only
    assert any(r.local for r in records) and any(r.cloud for r in records)
    assert peak["sessions"] <= 8 and peak["admitted"] <= 8 and peak["queue"] <= 16
    assert 0 < peak["kv"] <= config.max_kv_bytes
    assert left == (0, 0)                                        # every session CLOSEd
    for reason in ("sessions_full", "queue_full"):
        refused = sum(reason in str(r) for r in busy)
        assert refused == 0 or _metric(text, "tether_cloud_busy_total", reason=reason) >= refused
    assert _metric(text, "tether_cloud_llm_steps_total", kind="decode", outcome="ok") > 0
    assert _metric(text, "tether_cloud_llm_steps_total", kind="prefill", outcome="busy") > 0
    assert _metric(text, "tether_cloud_llm_sessions") == 0


def test_sigterm_drains_open_sessions_one_reply_each(stories, with_exit):
    """request_stop() is what `tether cloud`'s SIGTERM handler calls: steps in flight get
    exactly one answer (RESULT or BUSY "draining"), sessions are closed, streams end."""
    fp = stories.fingerprint

    async def main():
        engine = LLMEngine(stories, LLMEngineConfig(), "stories260K")
        run_jobs = engine.run_jobs

        def slow(jobs):                     # a busy cloud: steps wait while SIGTERM comes
            time.sleep(0.05)
            return run_jobs(jobs)
        engine.run_jobs = slow
        config = CloudConfig(bind="tcp://127.0.0.1:0", preload=False, drain_timeout_s=0.02)
        server = LLMServer(engine, config.bind, config=config)
        endpoint = await server.start()
        received, replied = Counter(), Counter()
        on_message, send = server.server._on_message, server.server._send

        def count_in(peer, frames, t):
            msg = P.decode(frames)
            if isinstance(msg, (P.Prefill, P.Decode, P.Close)):
                received[(peer, msg.request_id)] += 1
            on_message(peer, frames, t)

        def count_out(peer, reply):
            replied[(peer, reply.request_id)] += 1
            send(peer, reply)
        server.server._on_message, server.server._send = count_in, count_out
        links = [zmq_link(endpoint, fp) for _ in range(2)]
        edges = [LLMEdge(part, fp, stories.tokenizer(),
                         GenerateConfig(timeout_s=PATIENT, retry_after_s=60.0), link)
                 for part, link in zip((EdgeLM(stories, 2), with_exit), links)]

        async def stop_at(n):
            if n == 4:
                server.server.request_stop()

        async def stream(edge, on_token=None):
            try:
                return await _collect(edge, STEPS, on_token)
            except TetherError as exc:
                return exc
        results = await asyncio.gather(stream(edges[1], stop_at),
                                       *(stream(edges[i % 2]) for i in range(6)))
        await server.server.wait_stopped()
        sessions = dict(engine.sessions)
        for link in links:
            await link.close()
        await engine.close()
        return results, received, replied, sessions, server.core.gate.open_sessions
    results, received, replied, sessions, admitted = asyncio.run(main())
    assert received and all(replied[key] == 1 for key in received), (received, replied)
    assert sessions == {} and admitted == 0                      # the drain closed them
    for i, result in enumerate(results):
        if i == 0 or i % 2 == 0:                                 # exit head: the edge goes on
            assert len(result) == STEPS and result[-1].source == "local"
        else:
            assert isinstance(result, (BusyError, PeerUnavailableError)), result
