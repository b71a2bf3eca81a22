"""The real `openai` client against the edge's HTTP front: a split stories260K (edge layers
[0, 2), cloud the rest), streamed and not, completions and chat; the text equals the whole
model's greedy continuation and what EdgeClient streams over ZeroMQ."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from tether.edge.client import EdgeClient  # noqa: E402

from support.background import BackgroundLoop, http  # noqa: E402

pytestmark = pytest.mark.slow
PATIENT = 30.0
PROMPT = "Once upon a time"
TOKENS = 12


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from support.bundles import shared_bundle
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def served(assets, stories, bundle):
    bg = BackgroundLoop()
    box = bg.call(_start(assets, stories, bundle))
    yield box
    bg.call(_stop(box))
    bg.close()


async def _start(assets, stories, bundle):
    from tether.cloud import CloudConfig
    from tether.cloud.bundles import ServedBundle
    from tether.cloud.llm import LLMEngine
    from tether.cloud.server import CloudServer
    from tether.edge.config import EdgeConfig, EdgeLinkConfig, EdgeLLMConfig, HttpConfig
    from tether.edge.daemon import EdgeDaemon
    engine = LLMEngine(stories, model_id="stories260K")
    await engine.start()
    cloud = CloudServer(CloudConfig(bind="tcp://127.0.0.1:0", preload=False),
                        [ServedBundle.load(bundle)], sessions=engine)
    await cloud.start()
    daemon = EdgeDaemon(EdgeConfig(
        bundle=bundle, link=EdgeLinkConfig(cloud.endpoint), listen="tcp://127.0.0.1:0",
        http=HttpConfig(port=0), metrics_port=0, deadline_seconds=PATIENT,
        llm=EdgeLLMConfig(assets / "tinyllm" / "stories260K.bin", split=2, codec="fp16",
                          timeout_seconds=PATIENT)))
    endpoint = await daemon.start()
    return {"engine": engine, "cloud": cloud, "daemon": daemon, "endpoint": endpoint}


async def _stop(box):
    await box["daemon"].stop()
    await box["cloud"].stop()
    await box["engine"].close()


@pytest.fixture(scope="module")
def reference(stories, stories_full):
    """The whole model's greedy continuation of PROMPT."""
    ids = stories.tokenizer().encode(PROMPT)
    with torch.no_grad():
        whole = stories_full.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False)
    return whole[0, len(ids):].tolist()


def _client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served['daemon'].http_port}/v1",
                         api_key="unused", timeout=PATIENT, max_retries=0)


def test_openai_client_streams_the_split_models_greedy_text(served, reference, stories):
    client = _client(served)
    models = [m.id for m in client.models.list().data]
    assert "stories260K" in models
    pieces = []
    stream = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=TOKENS,
                                       stream=True, temperature=0)
    finish = None
    for chunk in stream:
        assert chunk.object == "text_completion"
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    zmq_client = EdgeClient(served["endpoint"], timeout=PATIENT)
    try:
        zmq_tokens = [(c.tokens[0], c.text, c.source) for c in zmq_client.generate(PROMPT, TOKENS)]
    finally:
        zmq_client.close()
    expected_tokens = reference[:len(zmq_tokens)]
    assert [t for t, _, _ in zmq_tokens] == expected_tokens
    assert "".join(pieces) == "".join(text for _, text, _ in zmq_tokens)
    assert len(pieces) >= TOKENS and finish in ("length", "stop")
    assert all(source == "cloud" for _, _, source in zmq_tokens)

    full = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=TOKENS)
    assert full.choices[0].text == "".join(pieces)
    assert full.usage.completion_tokens == len(zmq_tokens)
    assert full.usage.prompt_tokens == len(stories.tokenizer().encode(PROMPT))


def test_openai_chat_stream_and_errors(served):
    client = _client(served)
    messages = [{"role": "user", "content": PROMPT}]
    chunks = list(client.chat.completions.create(model="stories260K", messages=messages,
                                                 max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    done = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=6)
    assert done.choices[0].message.content == text and text
    assert done.choices[0].message.role == "assistant"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=2, n=3)
    stop = text.split()[1] if len(text.split()) > 1 else text[-1]
    cut = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=6,
                                    stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_curl_style_sse_and_llm_metrics(served):
    port = served["daemon"].http_port
    body = json.dumps({"model": "stories260K", "prompt": PROMPT, "max_tokens": 4,
                       "stream": True}).encode()
    status, raw = http("POST", f"http://127.0.0.1:{port}/v1/completions", body,
                       {"Content-Type": "application/json"})
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["tether"]["source"] == "cloud"
    _, metrics = http("GET", f"http://127.0.0.1:{served['daemon'].metrics_port}/metrics")
    text = metrics.decode()
    assert 'tether_edge_llm_tokens_total{source="cloud"}' in text
    assert "tether_edge_llm_time_to_first_token_seconds_count" in text
    assert _sample(text, "tether_edge_llm_active_streams") == 0
    assert _sample(text, 'tether_edge_llm_generations_total{outcome="ok"}') >= 1


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_openai_seeded_sampling_equals_the_whole_model_and_repeats(served, stories, stories_full):
    from tether.core.sampling import SamplingParams
    from tether.partitioner.llm import generate_whole
    client = _client(served)
    settings = SamplingParams(temperature=0.9, top_p=0.95, seed=21)
    ids = stories.tokenizer().encode(PROMPT)
    ref = generate_whole(stories_full, ids, TOKENS, settings)
    assert ref != generate_whole(stories_full, ids, TOKENS)          # not the greedy answer
    zmq_client = EdgeClient(served["endpoint"], timeout=PATIENT)
    try:
        zmq_tokens = [(c.tokens[0], c.text, c.source) for c in zmq_client.generate(
            PROMPT, TOKENS, temperature=0.9, top_p=0.95, seed=21)]
    finally:
        zmq_client.close()
    assert [t for t, _, _ in zmq_tokens] == ref[:len(zmq_tokens)]     # the edge stops at EOS
    texts = [client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=TOKENS,
                                       temperature=0.9, top_p=0.95, seed=21).choices[0].text
             for _ in range(2)]
    assert texts[0] == texts[1] == "".join(text for _, text, _ in zmq_tokens)
    other = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=TOKENS,
                                      temperature=0.9, top_p=0.95, seed=22).choices[0].text
    assert other != texts[0]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=2, temperature=3)
    url = f"http://127.0.0.1:{served['daemon'].http_port}/v1/completions"
    body = {"model": "stories260K", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0.9}
    status, raw = http("POST", url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    first = json.loads(raw)
    seed = first["tether"]["seed"]                                    # unseeded: told its seed
    status, raw = http("POST", url, json.dumps(body | {"seed": seed}).encode(),
                       {"Content-Type": "application/json"})
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == first["choices"][0]["text"]
