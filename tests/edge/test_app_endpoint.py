"""Token streams on the edge's application endpoint over real sockets: EdgeClient.generate
against EdgeServer with a scripted LLM edge (no model: the protocol and the server's rules)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tether.core import protocol as P
from tether.core.errors import (BusyError, ConfigError, PeerUnavailableError, ProtocolError,
                                UnknownModelError)
from tether.edge.client import EdgeClient
from tether.core.sampling import SamplingParams
from tether.edge.server import EdgeServer, sampling_of

from support.background import BackgroundLoop, wait_for


class ScriptedLLM:
    """Stands in for LLMEdge: token ``i`` is ``100 + i``, text ``"t{i} "``; sources cycle
    cloud, exit, local; ``fail_at`` raises the cloud's error there; ``eos_at`` stops early."""

    fingerprint, split, config = "f" * 64, "layer2", SimpleNamespace(codec="fp16")

    def __init__(self, fail_at: int | None = None, eos_at: int | None = None,
                 delay: float = 0.0) -> None:
        self.fail_at, self.eos_at, self.delay = fail_at, eos_at, delay
        self.calls: list[tuple] = []
        self.closed = 0

    async def generate(self, prompt, max_new_tokens=64, stop_at_eos=True, *, sampling=None):
        self.calls.append((prompt, max_new_tokens))
        self.sampling = sampling
        try:
            for i in range(max_new_tokens):
                await asyncio.sleep(self.delay)
                if i == self.fail_at:
                    raise PeerUnavailableError(f"cloud gone at token {i + 1}")
                yield SimpleNamespace(token=100 + i, text=f"t{i} ",
                                      source=P.TOKEN_SOURCES[i % 3])
                if i == self.eos_at:
                    return
        finally:
            self.closed += 1


@pytest.fixture
def serve():
    bg = BackgroundLoop()
    servers = []

    def start(llm, **kwargs):
        server = EdgeServer(None, "tcp://127.0.0.1:0", llm=llm, llm_model_id="toy", **kwargs)
        servers.append(server)
        return server, bg.call(server.start())
    yield start, bg
    for server in servers:
        bg.call(server.stop(1.0))
    bg.close()


def test_tokens_stream_as_chunks_and_end_with_the_record(serve):
    start, _ = serve
    llm = ScriptedLLM()
    _, endpoint = start(llm, llm_max_new_tokens=5)
    with EdgeClient(endpoint, timeout=10) as client:
        assert [m.model_id for m in client.models()] == ["toy"]       # LLM only: no bundle
        stream = client.generate("Once upon", max_new_tokens=4)
        chunks = list(stream)
        assert [c.tokens for c in chunks] == [(100,), (101,), (102,), (103,)]
        assert "".join(c.text for c in chunks) == "t0 t1 t2 t3 "
        assert [c.source for c in chunks] == ["cloud", "exit", "local", "cloud"]
        assert stream.record.by_source() == {"cloud": 2, "exit": 1, "local": 1}
        assert stream.record.finish == "length" and stream.record.seconds > 0
        capped = client.generate([1, 2, 3], max_new_tokens=50)       # token ids; capped at 5
        assert len(list(capped)) == 5 and capped.record.finish == "length"
    assert llm.calls == [("Once upon", 4), ([1, 2, 3], 5)]


def test_end_of_text_and_errors_end_the_stream_with_the_record(serve):
    start, _ = serve
    _, stops = start(ScriptedLLM(eos_at=1))
    _, fails = start(ScriptedLLM(fail_at=2))
    with EdgeClient(stops, timeout=10) as client:
        stream = client.generate("Once", 8)
        assert stream.text() == "t0 t1 " and stream.record.finish == "stop"
    with EdgeClient(fails, timeout=10) as client:
        stream = client.generate("Once", 8)
        got = []
        with pytest.raises(PeerUnavailableError, match="cloud gone at token 3"):
            for chunk in stream:
                got.extend(chunk.tokens)
        assert got == [100, 101] and stream.record.finish == "error"
        assert stream.record.code == "unavailable" and stream.record.cloud == 1
        assert list(client.generate("again", 2).text()) and client.ping() > 0   # still serving


def test_sampling_settings_reach_the_llm_or_are_refused(serve):
    start, _ = serve
    llm = ScriptedLLM()
    _, endpoint = start(llm)
    with EdgeClient(endpoint, timeout=10) as client:
        client.generate("x", 2, temperature=0.7, top_k=40, top_p=0.9, seed=7).text()
        assert llm.sampling == SamplingParams(0.7, 40, 0.9, 7)
        assert client.generate("x", 2).text() == "t0 t1 "
        assert llm.sampling == SamplingParams()                       # greedy by default
    with EdgeClient("tcp://127.0.0.1:9") as nowhere, pytest.raises(ProtocolError, match="top_p"):
        nowhere.generate("x", top_p=0)


def test_sampling_of_a_generate_request():
    assert sampling_of(P.Generate(1, "x", temperature=0.5, seed=3)) == SamplingParams(0.5, seed=3)
    assert sampling_of(P.Generate(1, "x", top_k=5)) == SamplingParams(top_k=5)


def test_streams_are_bounded_and_a_departed_app_stops_its_stream(serve):
    start, bg = serve
    slow = ScriptedLLM(delay=0.05)
    server, endpoint = start(slow, max_streams=1)
    with EdgeClient(endpoint, timeout=10) as first, EdgeClient(endpoint, timeout=10) as second:
        stream = first.generate("long", 200)
        assert next(stream).tokens == (100,)
        with pytest.raises(BusyError, match="queue_full"):
            second.generate("more", 2).text()
        with pytest.raises(UnknownModelError, match="no image model"):
            second.infer(__import__("numpy").zeros((2, 2, 3), dtype="uint8"))
    # both clients are gone: the edge stops generating for nobody
    assert bg.call(_wait(lambda: not server._streams)), "the stream kept running"
    assert slow.closed == 1 and len(slow.calls) == 1


async def _wait(predicate):
    return await wait_for(predicate, 10.0)


def test_an_endpoint_without_bundle_and_llm_is_refused():
    with pytest.raises(ConfigError, match="bundle, an LLM or both"):
        EdgeServer(None, "tcp://127.0.0.1:0")
