"""One `tether edge` endpoint serves a DNN bundle and the split LLM, one cloud serves both.

Real ZeroMQ on 127.0.0.1 (random ports): app -> EdgeDaemon -> CloudServer (bundle tails +
LLMEngine sessions), the servers in-process on their own event loop thread.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from tether.cli import main
from tether.core import protocol as P
from tether.core.errors import ProtocolError
from tether.edge.client import EdgeClient

from support.bundles import SPLITS, reference_logits, sample_images, shared_bundle
from support.cloud import answer_to_frames

pytestmark = pytest.mark.slow
STEPS = 16
PATIENT = 30.0      # the shared 2-core machine can be very slow: never fall back by accident


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def served(assets, bundle, stories):
    """Cloud (bundle + LLM) and edge daemon (bundle + LLM split 2) on a background loop."""
    from tether.cloud import CloudConfig
    from tether.cloud.bundles import ServedBundle
    from tether.cloud.llm import LLMEngine
    from tether.cloud.server import CloudServer
    from tether.edge.config import EdgeConfig, EdgeLinkConfig, EdgeLLMConfig
    from tether.edge.daemon import EdgeDaemon

    ready, stop, box = threading.Event(), threading.Event(), {}

    async def serve():
        engine = LLMEngine(stories, model_id="stories260K")
        await engine.start()
        cloud = CloudServer(CloudConfig(bind="tcp://127.0.0.1:0", preload=False),
                            [ServedBundle.load(bundle)], sessions=engine)
        await cloud.start()
        daemon = EdgeDaemon(EdgeConfig(
            bundle=bundle, link=EdgeLinkConfig(cloud.endpoint), listen="tcp://127.0.0.1:0",
            action=f"split:{SPLITS[1]}:fp32", deadline_seconds=PATIENT,
            llm=EdgeLLMConfig(assets / "tinyllm" / "stories260K.bin", split=2, codec="fp16",
                              timeout_seconds=PATIENT)))
        box["daemon"] = daemon
        try:
            box["endpoint"] = await daemon.start()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
        finally:
            await daemon.stop()
            await cloud.stop()
            await engine.close()

    def run():
        try:
            asyncio.run(serve())
        except BaseException as exc:   # surface start-up failures to the test
            box["error"] = exc
            ready.set()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(120), "edge daemon did not start"
    if "error" in box:
        raise box["error"]
    yield box["endpoint"], box["daemon"]
    stop.set()
    thread.join(60)


def test_one_edge_endpoint_answers_images_and_token_streams(served, bundle, stories,
                                                             stories_full, capsys):
    served, daemon = served
    assert daemon.llm.link is daemon.agent.link          # one link, one socket, one handshake
    assert {b.fingerprint for b in daemon.agent.link.bundles} == {
        daemon.agent.compute.bundle_info().fingerprint, stories.fingerprint}
    images = sample_images(4)
    with EdgeClient(served, timeout=PATIENT) as client:
        assert client.info().model_id == "cifar_resnet20"
        answers = [client.infer(img) for img in images]
    for answer, ref in zip(answers, reference_logits(bundle, images)):
        np.testing.assert_allclose(answer.logits[0], ref, rtol=1e-4, atol=1e-4)
        assert answer.outcome == "cloud" and answer.action == f"split:{SPLITS[1]}:fp32"

    prompt = "Once upon a time"
    ids = stories.tokenizer().encode(prompt)
    with torch.no_grad():
        whole = stories_full.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False)
    reference = whole[0, len(ids):].tolist()

    client = EdgeClient(served, timeout=PATIENT)
    try:
        assert [m.model_id for m in client.models()] == ["cifar_resnet20", "stories260K"]
        stream = client.generate(prompt, max_new_tokens=STEPS)
        tokens = [(c.tokens[0], c.text, c.source) for c in stream]
        assert stream.record.by_source() == {"cloud": STEPS, "exit": 0, "local": 0}
        by_ids = client.generate(ids, max_new_tokens=4)         # token ids instead of text
        assert [c.tokens[0] for c in by_ids] == reference[:4]
        assert by_ids.record.finish == "length"
        error, pong = answer_to_frames(served, [b"\x0b", b"\x80"], PATIENT)   # garbage
        assert isinstance(error, P.Error) and error.code == ProtocolError.code
        assert isinstance(pong, P.Pong)                         # that peer is still served
        images_again = EdgeClient(served, timeout=PATIENT)
        np.testing.assert_allclose(images_again.infer(images[0]).logits, answers[0].logits,
                                   rtol=1e-5, atol=1e-5)
        images_again.close()
    finally:
        client.close()
    assert [t for t, _, _ in tokens] == reference
    assert {s for _, _, s in tokens} == {"cloud"}
    text = "".join(t for _, t, _ in tokens)
    assert text.startswith(", there was a little girl named Lily")

    # the real command line against the same `tether edge` endpoint
    assert main(["generate", "--edge", served, "--max-new-tokens", str(STEPS), prompt]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == prompt + text.rstrip()
    assert f"{STEPS} tokens" in out.err and f"'cloud': {STEPS}" in out.err
    from tether.core.metrics import render
    text = render(daemon.registry).decode()              # per message kind, on the one link
    for kind in ("infer", "prefill", "decode", "close"):
        assert f'tether_edge_link_messages_total{{kind="{kind}",outcome="ok"}}' in text, kind

