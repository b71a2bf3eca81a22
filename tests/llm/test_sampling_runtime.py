"""Sampling through the real edge/cloud path (stories260K): one batched cloud step serving
sessions with different settings, ZeroMQ sessions at every split, the edge's app endpoint
and `tether generate`; seeded streams equal the whole model's, bad settings get one line."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from tether.cloud.llm import LLMEngine, LLMEngineConfig, LLMServer
from tether.core import protocol as P
from tether.core.errors import ProtocolError
from tether.edge.llm import GenerateConfig, LLMEdge
from tether.edge.server import EdgeServer
from tether.partitioner.llm import EdgeLM, SamplingParams, generate_whole

from support.background import BackgroundLoop  # noqa: E402
from support.cloud import answer_to_frames

from .links import local_cloud, zmq_link

STEPS = 20
PATIENT = 30.0
PROMPT = "Once upon a time"
SETTINGS = (SamplingParams(0.8, seed=11), SamplingParams(1.0, top_k=20, seed=12),
            SamplingParams(1.2, top_p=0.9, seed=13), SamplingParams())


@pytest.fixture(scope="module")
def references(stories, stories_full):
    ids = stories.tokenizer().encode(PROMPT)
    refs = [generate_whole(stories_full, ids, STEPS, s) for s in SETTINGS]
    assert len({tuple(r) for r in refs}) == len(refs)     # settings that all lead elsewhere
    return refs


def _edge(stories, k, link, codec="fp32"):
    return LLMEdge(EdgeLM(stories, k), stories.fingerprint, stories.tokenizer(),
                   GenerateConfig(codec=codec, timeout_s=PATIENT, first_step_timeout_s=PATIENT),
                   link)


async def _tokens(edge, sampling):
    return [(e.token, e.source) async for e in
            edge.generate(PROMPT, STEPS, stop_at_eos=False, sampling=sampling)]


def test_one_batched_cloud_step_samples_each_session_under_its_own_settings(stories, references):
    """Four sessions step together (one batched decode per token), each with its settings."""
    async def main():
        engine = LLMEngine(stories, LLMEngineConfig(), "stories260K")
        batch_sizes = []

        handle = engine.handle

        async def counted(msg):
            reply = await handle(msg)
            batch_sizes.append(getattr(reply, "batch_size", 0))
            return reply
        engine.handle = counted
        async with local_cloud(engine) as link:
            edges = [_edge(stories, 2, link) for _ in SETTINGS]
            runs = await asyncio.gather(*[_tokens(e, s) for e, s in zip(edges, SETTINGS)])
        return runs, batch_sizes, engine.stats
    runs, batch_sizes, stats = asyncio.run(main())
    for events, ref in zip(runs, references):
        assert [t for t, _ in events] == ref
        assert {s for _, s in events} == {"cloud"}
    assert stats["batches"] > 0 and max(batch_sizes) >= 2, (stats, batch_sizes)


@pytest.mark.slow
def test_seeded_streams_over_zeromq_at_every_split_equal_the_whole_model(stories, references):
    async def main():
        server = LLMServer(LLMEngine(stories, LLMEngineConfig(), "stories260K"), "tcp://127.0.0.1:0")
        link = zmq_link(await server.start(), stories.fingerprint)
        edges = [_edge(stories, k, link) for k in (1, 2, 3, 4)]
        runs = await asyncio.gather(*[_tokens(e, s) for e, s in zip(edges, SETTINGS)])
        again = await _tokens(edges[3], SETTINGS[0])        # another split, same seed
        await link.close()
        await server.close()
        return runs, again
    runs, again = asyncio.run(main())
    for events, ref in zip(runs, references):
        assert [t for t, _ in events] == ref
        assert {s for _, s in events} == {"cloud"}
    assert [t for t, _ in again] == references[0]


@pytest.fixture(scope="module")
def endpoint(stories):
    """An edge daemon's app endpoint (split 2) in front of a ZeroMQ cloud, on a background loop."""
    bg, box = BackgroundLoop(), {}

    async def start():
        box["server"] = LLMServer(LLMEngine(stories, LLMEngineConfig(), "stories260K"),
                                  "tcp://127.0.0.1:0")
        box["link"] = zmq_link(await box["server"].start(), stories.fingerprint)
        box["edge"] = EdgeServer(None, "tcp://127.0.0.1:0", llm=_edge(stories, 2, box["link"]))
        return await box["edge"].start()

    async def stop():
        await box["edge"].stop(1.0)
        await box["link"].close()
        await box["server"].close()
    yield bg.call(start())
    bg.call(stop())
    bg.close()


def test_the_app_endpoint_streams_the_seeded_tokens(stories, endpoint, references):
    from tether.edge.client import EdgeClient
    client = EdgeClient(endpoint, timeout=PATIENT)
    try:
        for sp, ref in zip(SETTINGS[:2], references):
            stream = client.generate(PROMPT, STEPS, temperature=sp.temperature, top_k=sp.top_k,
                                     top_p=sp.top_p, seed=sp.seed)
            assert [c.tokens[0] for c in stream] == ref
        error, pong = answer_to_frames(endpoint, _hostile_generate(top_k=-1), PATIENT)
        assert isinstance(error, P.Error) and error.code == ProtocolError.code  # a hostile peer
        assert "top_k" in error.message and isinstance(pong, P.Pong)            # still served
        assert len(list(client.generate(PROMPT, 3))) == 3        # and so is the client
    finally:
        client.close()


def _hostile_generate(**header):
    frames = P.encode(P.Generate(9, "Once", max_new_tokens=3))
    fields = msgpack.unpackb(frames[1], raw=False) | header
    return [frames[0], msgpack.packb(fields, use_bin_type=True), *frames[2:]]


def test_tether_generate_sampling_flags_through_the_endpoint(assets, endpoint, monkeypatch,
                                                               capsys):
    from tether.cli import main
    monkeypatch.setenv("TETHER_ASSETS", str(assets))
    flags = ["--max-new-tokens", str(STEPS), "--temperature", "0.8", "--seed", "11", PROMPT]
    assert main(["generate", "--edge", endpoint, *flags]) == 0
    via_daemon = capsys.readouterr()
    assert main(["generate", "--split", "5", *flags]) == 0          # the whole model, here
    local = capsys.readouterr()
    assert via_daemon.out == local.out and via_daemon.out.startswith(PROMPT)
    assert "seed 11" in via_daemon.err and "'cloud': 20" in via_daemon.err
    for flag, value in (("--temperature", "-1"), ("--top-p", "0"), ("--top-k", "-2"),
                        ("--seed", "-5")):
        field = flag.lstrip("-").replace("-", "_")
        assert main(["generate", "--edge", endpoint, f"{flag}={value}", "Once"]) == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("tether: error:")]
        assert len(lines) == 1 and field in lines[0] and "Traceback" not in err, err
