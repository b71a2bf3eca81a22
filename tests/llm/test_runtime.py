"""The split LLM runtime over real ZeroMQ sockets on 127.0.0.1: streams, sessions, recovery."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tether.cloud.llm import LLMEngine, LLMEngineConfig, LLMServer
from tether.core.errors import DeadlineExceededError, PeerUnavailableError
from tether.edge.llm import GenerateConfig, LLMEdge
from tether.partitioner.llm import EdgeLM, new_exit_head, split_llm, train_exit_head

from .links import local_cloud, zmq_link

STEPS = 24
PATIENT = 30.0      # the shared 2-core machine can be very slow: never fall back by accident


@pytest.fixture(scope="module")
def reference(stories, stories_full):
    out = stories_full.generate(torch.tensor([[1]]), max_new_tokens=STEPS, do_sample=False)
    return out[0, 1:].tolist()


@pytest.fixture(scope="module")
def edges(stories):
    return {k: EdgeLM(stories, k) for k in (1, 2, 3, 4)}


@pytest.fixture(scope="module")
def with_exit(stories):
    """Layers [0, 4) with an exit head attached (untrained adapter: these tests check the
    mechanics of going local, not the exit's quality)."""
    part = EdgeLM(stories, 4)
    part.exit_head = new_exit_head(part)
    return part


async def _collect(edge, prompt=(1,), steps=STEPS, on_token=None):
    events = []
    async for ev in edge.generate(list(prompt), steps, stop_at_eos=False):
        events.append(ev)
        if on_token is not None:
            await on_token(len(events))
    return events


def _serve(stories, endpoint="tcp://127.0.0.1:0", **cfg):
    """The cloud service with only the LLM engine (an LLM-only ``tether cloud``)."""
    return LLMServer(LLMEngine(stories, LLMEngineConfig(**cfg), "stories260K"), endpoint)


@pytest.mark.slow
def test_several_splits_and_sessions_at_once_equal_the_whole_model(stories, edges, reference):
    async def main():
        server = _serve(stories)
        endpoint = await server.start()
        links = [zmq_link(endpoint, stories.fingerprint) for _ in range(2)]
        clients = [LLMEdge(edges[k], stories.fingerprint, stories.tokenizer(), GenerateConfig(codec=c, timeout_s=PATIENT),
                           links[i % 2]) for i, (k, c) in enumerate([(1, "fp16"), (2, "fp16"),
                                                                     (3, "fp16"), (4, "fp32")])]
        runs = await asyncio.gather(*[_collect(c) for c in clients for _ in range(2)])
        stats = dict(server.engine.stats)
        for link in links:
            await link.close()
        await server.close()
        return runs, stats
    runs, stats = asyncio.run(main())
    for events in runs:
        assert [e.token for e in events] == reference, [(e.token, e.source) for e in events]
        assert {e.source for e in events} == {"cloud"}, [e.source for e in events]
        assert all(e.bytes_sent > 0 and e.bytes_received > 0 for e in events)
    assert "".join(e.text for e in runs[0]).startswith("Once upon a time, there was")
    # whether steps met in one batch depends on timing here; test_engine checks batching itself
    assert stats["batched_rows"] >= 2 * stats["batches"]


def test_lost_session_is_reprefilled_and_output_unchanged(stories, edges, reference):
    async def main():
        server = _serve(stories)
        link = zmq_link(await server.start(), stories.fingerprint)
        edge = LLMEdge(edges[2], stories.fingerprint, stories.tokenizer(),
                       GenerateConfig(timeout_s=PATIENT), link)

        async def lose(n):
            if n in (5, 12):
                server.engine.sessions.clear()      # expiry / eviction / cloud restart
        events = await _collect(edge, on_token=lose)
        left = dict(server.engine.sessions)
        await link.close()
        await server.close()
        return events, left
    events, left = asyncio.run(main())
    assert [e.token for e in events] == reference
    assert [i for i, e in enumerate(events) if e.reprefilled] == [5, 12]
    assert events[5].bytes_sent > 5 * events[4].bytes_sent // 2   # the whole context went again
    assert left == {}                                              # CLOSE ended the session


def test_generation_continues_on_the_edge_while_the_cloud_is_gone(stories, with_exit, reference):
    async def main():
        server = _serve(stories)
        endpoint = await server.start()
        link = zmq_link(endpoint, stories.fingerprint)
        edge = LLMEdge(with_exit, stories.fingerprint, stories.tokenizer(),
                       GenerateConfig(timeout_s=0.5, retry_after_s=0.0), link)
        state = {"server": server}

        async def outage(n):
            if n == 4:
                await state["server"].close()
            if n == 10:
                state["server"] = _serve(stories, endpoint, splits=(4,))   # preloaded
                await state["server"].start()
                assert await link.wait_ready(10.0)      # the link reconnects by itself
        events = await _collect(edge, on_token=outage)
        await link.close()
        await state["server"].close()
        return events, edge.records[-1]
    events, record = asyncio.run(main())
    sources = [e.source for e in events]
    assert "cloud" in sources[:4] and sources[4:10] == ["local"] * 6   # server gone: edge alone
    assert sources[-1] == "cloud" and any(e.reprefilled for e in events[10:])
    assert len(events) == STEPS
    assert record.local == 6 and record.cloud == STEPS - 6 and record.error == ""
    assert [(i, src) for i, src, _ in record.switches] == [(4, "local"), (10, "cloud")]
    assert record.switches[0][2] in ("unavailable", "deadline")


def test_unreachable_cloud_means_edge_only_generation(stories, edges, with_exit):
    async def main(part, link):
        edge = LLMEdge(part, stories.fingerprint, stories.tokenizer(),
                       GenerateConfig(timeout_s=0.2, retry_after_s=60.0, first_step_timeout_s=0.5),
                       link)
        return await _collect(edge, steps=8)
    async def unreachable():
        link = zmq_link("tcp://127.0.0.1:9", stories.fingerprint)   # nothing listens there
        try:
            return await main(with_exit, link)
        finally:
            await link.close()
    events = asyncio.run(unreachable())
    assert {e.source for e in events} == {"local"}
    assert [e.token for e in events] == [e.token for e in asyncio.run(main(with_exit, None))]
    with pytest.raises(PeerUnavailableError, match="no trained exit head"):
        asyncio.run(main(EdgeLM(stories, 4, with_exit=False), None))


def test_without_exit_head_a_lost_cloud_ends_the_stream_with_an_error(stories, edges):
    """Defect: the raw final norm + LM head at layer k answered "local" ("to to to...")."""
    async def main():
        server = _serve(stories)
        link = zmq_link(await server.start(), stories.fingerprint)
        edge = LLMEdge(edges[4], stories.fingerprint, stories.tokenizer(),
                       GenerateConfig(timeout_s=0.3, first_step_timeout_s=PATIENT), link)

        async def kill(n):
            if n == 3:
                await server.close()
        try:
            with pytest.raises((PeerUnavailableError, DeadlineExceededError),
                               match="no trained exit head") as info:
                await _collect(edge, on_token=kill)
        finally:
            await link.close()
        return edge.records[-1], info.value
    record, error = asyncio.run(main())
    assert record.cloud == 3 and record.local == 0 and record.tokens == 3
    assert record.error in ("unavailable", "deadline")
    assert "token 4" in str(error)


def test_a_cold_or_late_cloud_is_waited_for_on_the_first_step(stories, edges, reference):
    """The cloud starts 1 s after the session and its first step is slower than a step's
    timeout: the edge waits (readiness + first-step budget) instead of guessing locally."""
    from support.procs import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"

    async def main():
        link = zmq_link(endpoint, stories.fingerprint)
        edge = LLMEdge(edges[3], stories.fingerprint, stories.tokenizer(),
                       GenerateConfig(timeout_s=PATIENT / 4, first_step_timeout_s=PATIENT), link)
        server = _serve(stories, endpoint)          # not preloaded: builds split 3 on first use

        async def late_start():
            await asyncio.sleep(1.0)
            await server.start()
        starter = asyncio.create_task(late_start())
        events = await _collect(edge, steps=8)
        await starter
        await link.close()
        await server.close()
        return events, edge.records[-1]
    events, record = asyncio.run(main())
    assert [e.token for e in events] == reference[:8]
    assert record.cloud == 8 and record.local == 0 and record.error == ""


def test_exit_threshold_needs_a_trained_exit_head(stories, edges):
    from tether.core.errors import ConfigError
    with pytest.raises(ConfigError, match="trained exit head"):
        LLMEdge(edges[3], stories.fingerprint, stories.tokenizer(), GenerateConfig(exit_threshold=0.5))


def test_early_exit_keeps_the_cloud_cache_consistent(stories, stories_full, exit_training_tokens):
    part, cloud = split_llm(stories, 3)
    part.exit_head = train_exit_head(part, cloud, exit_training_tokens, steps=60)

    async def main():
        async with local_cloud(LLMEngine(stories, LLMEngineConfig())) as link:
            edge = LLMEdge(part, stories.fingerprint, stories.tokenizer(),
                           GenerateConfig(exit_threshold=0.5, timeout_s=PATIENT), link)
            return await _collect(edge, steps=32)
    events = asyncio.run(main())
    sources = [e.source for e in events]
    assert "exit" in sources and "cloud" in sources
    tokens = [1] + [e.token for e in events]
    with torch.no_grad():
        argmax = stories_full(torch.tensor([tokens])).logits[0].argmax(-1).tolist()
    for i, e in enumerate(events):       # every cloud answer saw exactly the emitted prefix
        if e.source == "cloud":
            assert e.token == argmax[i], f"token {i}"
    assert events[sources.index("exit") + 1:] and any(
        e.bytes_sent > events[0].bytes_sent for e in events if e.source == "cloud")


def test_split_llm_through_the_cloud_service(stories, edges, reference):
    """The same cloud service as the DNNs serves the sessions (its SessionHandler hook)."""
    from tether.cloud import CloudConfig, ServedBundle
    from tether.cloud.server import CloudServer
    from tether.core.types import TensorSpec

    dnn = ServedBundle("dummy", "d" * 64, TensorSpec((1, 4)), {}, lambda s: (lambda x: x))

    async def main():
        engine = LLMEngine(stories, LLMEngineConfig(), "stories260K")
        server = CloudServer(CloudConfig(bind="tcp://127.0.0.1:0", preload=False), [dnn],
                             sessions=engine)
        await server.start()
        link = zmq_link(server.endpoint, stories.fingerprint)
        edge = LLMEdge(edges[3], stories.fingerprint, stories.tokenizer(),
                       GenerateConfig(codec="int8", timeout_s=PATIENT), link)
        events = await asyncio.gather(_collect(edge), _collect(edge))
        await link.close()
        await server.stop()
        await engine.close()
        return events
    for events in asyncio.run(main()):
        assert {e.source for e in events} == {"cloud"}
        assert [e.token for e in events][:16] == reference[:16]   # int8 wire: same greedy start


def test_generate_through_the_edge_endpoint(stories, edges, reference):
    """App -> edge daemon endpoint -> cloud, tokens streamed back over real sockets."""
    import threading

    from tether.core import protocol as P
    from tether.core.errors import ProtocolError
    from tether.edge.client import EdgeClient
    from tether.edge.server import EdgeServer

    from support.cloud import answer_to_frames

    ready, stop = threading.Event(), threading.Event()
    box = {}

    async def daemon():
        server = _serve(stories)
        link = zmq_link(await server.start(), stories.fingerprint)
        edge_srv = EdgeServer(None, "tcp://127.0.0.1:0", llm=LLMEdge(
            edges[2], stories.fingerprint, stories.tokenizer(), GenerateConfig(timeout_s=PATIENT),
            link))
        box["endpoint"] = await edge_srv.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await edge_srv.stop(1.0)
        await link.close()
        await server.close()
    thread = threading.Thread(target=asyncio.run, args=(daemon(),))
    thread.start()
    try:
        assert ready.wait(30)
        client = EdgeClient(box["endpoint"], timeout=20)
        stream = client.generate("Once upon a time", max_new_tokens=STEPS)
        tokens = list(stream)
        assert len(tokens) == STEPS and {c.source for c in tokens} == {"cloud"}
        assert stream.record.by_source() == {"cloud": STEPS, "exit": 0, "local": 0}
        text = "".join(c.text for c in tokens)
        assert text.startswith(", there was a little girl named Lily")
        error, pong = answer_to_frames(box["endpoint"], [b"\x0e", b"\x80"], PATIENT)  # garbage
        assert isinstance(error, P.Error) and error.code == ProtocolError.code
        assert isinstance(pong, P.Pong)                           # that peer is still served
        assert len(list(client.generate("Once", max_new_tokens=3))) == 3
        client.close()
    finally:
        stop.set()
        thread.join(30)


def test_a_refusing_cloud_means_local_tokens_or_its_error(stories, edges, with_exit):
    """A cloud serving other weights refuses the handshake: the edge goes on alone, or says
    why (the refusal, in the one-line error)."""
    async def main(part):
        async with local_cloud(LLMEngine(stories), "0" * 64) as link:
            edge = LLMEdge(part, "0" * 64, stories.tokenizer(),
                           GenerateConfig(timeout_s=2.0, retry_after_s=60.0,
                                          first_step_timeout_s=2.0), link)
            return await _collect(edge, steps=4)
    assert {e.source for e in asyncio.run(main(with_exit))} == {"local"}
    with pytest.raises(PeerUnavailableError, match="does not serve .*deploy the same bundle"):
        asyncio.run(main(EdgeLM(stories, 4, with_exit=False)))
    with pytest.raises(PeerUnavailableError, match="does not serve"):   # raw LM head: no guess
        asyncio.run(main(edges[4]))


def test_generate_via_the_edge_endpoint_fails_with_one_line_when_it_cannot_go_on(stories, edges,
                                                                                  capsys):
    """The daemon path of `tether generate --edge`: an ERROR ends the stream, exit 1."""
    import threading

    from tether.cli import main
    from tether.edge.server import EdgeServer

    ready, stop = threading.Event(), threading.Event()
    box = {}

    async def daemon():
        link = zmq_link("tcp://127.0.0.1:9", stories.fingerprint)          # nothing listens there
        edge_srv = EdgeServer(None, "tcp://127.0.0.1:0", llm=LLMEdge(
            edges[2], stories.fingerprint, stories.tokenizer(),
            GenerateConfig(timeout_s=0.2, first_step_timeout_s=0.5), link))
        box["endpoint"] = await edge_srv.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await edge_srv.stop(1.0)
        await link.close()
    thread = threading.Thread(target=asyncio.run, args=(daemon(),))
    thread.start()
    try:
        assert ready.wait(30)
        assert main(["generate", "--edge", box["endpoint"], "--max-new-tokens", "4", "Once"]) == 1
    finally:
        stop.set()
        thread.join(30)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert len(lines) == 1 and "no trained exit head" in lines[0], err
