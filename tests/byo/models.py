"""Helpers of the bring-your-own-model tests: a user's model file, tiny HF models, serving."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import numpy as np
import torch

from tether.cloud.bundles import ServedBundle
from tether.cloud.config import CloudConfig
from tether.cloud.twin import InProcessCloud
from tether.core.policy import FixedPolicy
from tether.core.types import Action
from tether.edge.agent import EdgeAgent
from tether.edge.compute import EdgeCompute
from tether.edge.config import EdgeConfig
from tether.edge.inproc import InProcessLink

USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class MyNet(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                      nn.BatchNorm2d(2 * width), nn.ReLU())
            self.classifier = nn.Linear(2 * width, 5)

        def forward(self, x):
            y = self.down(self.stem(x))
            return self.classifier(y.mean((2, 3)))


    class ShapeBranch(MyNet):
        """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

        def forward(self, x):
            if x.shape[-1] > 8:
                x = x * 0.5
            return super().forward(x)


    def build():
        return MyNet(width=6)
''')


def write_user_model(folder: Path, name: str = "mynet.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(USER_MODEL)
    return path


def seeded(factory):
    """What tether builds from a reference: the module constructed under seed 0, eval."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory().eval()


def tiny_vit(folder: Path) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5)).eval()
    model.save_pretrained(folder)
    return model


def tiny_bert(folder: Path) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3)).eval()
    model.save_pretrained(folder)
    return model


def serve_and_ask(bundle: Path, action: str, inputs: list[np.ndarray],
                  endpoint: str | None = None) -> list[np.ndarray]:
    """Edge agent + cloud on ``bundle``: the logits of each input. The cloud is the in-process
    twin, or the real server at ``endpoint`` (over ZeroMQ sockets)."""
    async def scenario():
        compute = EdgeCompute(bundle)
        cloud = None
        if endpoint is None:
            cloud = InProcessCloud([ServedBundle.load(bundle)], CloudConfig(max_queue_delay_s=0.0))
            await cloud.start()
            link = InProcessLink(cloud, compute.bundle_info(), "edge-byo")
        else:
            from tether.edge.zmq_link import LinkTiming, ZmqCloudLink
            link = ZmqCloudLink(endpoint, compute.bundle_info(), "edge-byo", LinkTiming())
        agent = EdgeAgent(compute, FixedPolicy(Action.parse(action)),
                          EdgeConfig(deadline_seconds=30.0), link, [])
        await agent.start()
        try:
            assert await link.wait_ready(30.0)
            results = [await agent.infer(x) for x in inputs]
        finally:
            await agent.close()
            if cloud is not None:
                await cloud.close()
        assert [r.record.outcome for r in results] == ["cloud"] * len(inputs), \
            [(r.record.outcome, r.record.fallback_reason) for r in results]
        return [r.logits[0] for r in results]
    return asyncio.run(scenario())
