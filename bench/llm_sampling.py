"""Cost of sampling vs greedy token choice (issue 13), measured side by side in one run.

    .venv/bin/python bench/llm_sampling.py [--tokens 48] [--reps 3] [--assets DIR]

1. The sampler alone (``choose_token``) per token at vocabularies of 512 (stories260K),
   32000 (Llama 2) and 151936 (Qwen2), on logits with a language model's spread (normal,
   sd 4), for greedy and for temperature / top-k / top-p; ratio to greedy.
2. End to end: stories260K split at layer 2 over real ZeroMQ sockets on 127.0.0.1, tokens/s
   of greedy vs seeded sampling (temperature 0.8, top-p 0.95), alternating runs; and whether
   the sampled tokens equal the whole model's (they must).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.cloud.llm import LLMEngine, LLMEngineConfig, LLMServer  # noqa: E402
from tether.edge.llm import GenerateConfig, LLMEdge  # noqa: E402
from tether.edge.zmq_link import ZmqCloudLink  # noqa: E402
from tether.core import protocol as P  # noqa: E402
from tether.partitioner.llm import (EdgeLM, SamplingParams, choose_token,  # noqa: E402
                                    full_model, generate_whole, open_llm)

SETTINGS = {
    "greedy": SamplingParams(),
    "T=0.8": SamplingParams(0.8, seed=1),
    "T=0.8 top_k=50": SamplingParams(0.8, top_k=50, seed=1),
    "T=0.8 top_p=0.95": SamplingParams(0.8, top_p=0.95, seed=1),
    "T=1.5 top_p=0.95": SamplingParams(1.5, top_p=0.95, seed=1),
}


def sampler_cost(vocab: int, reps: int) -> dict[str, float]:
    """Median microseconds per choose_token call per setting (interleaved rounds)."""
    torch.manual_seed(0)
    rows = torch.randn(64, vocab) * 4
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(reps):
        for name, sp in SETTINGS.items():
            t0 = time.perf_counter()
            for t, row in enumerate(rows):
                choose_token(row, sp, t)
            times[name].append((time.perf_counter() - t0) / len(rows) * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


async def split_tokens_per_s(ckpt, tokens: int, reps: int, sampled: SamplingParams):
    server = LLMServer(LLMEngine(ckpt, LLMEngineConfig(), "stories260K"), "tcp://127.0.0.1:0")
    link = ZmqCloudLink(await server.start(), P.BundleInfo("stories260K", ckpt.fingerprint))
    edge = LLMEdge(EdgeLM(ckpt, 2), ckpt.fingerprint, ckpt.tokenizer(),
                   GenerateConfig(codec="fp32", timeout_s=30.0), link)
    rates: dict[str, list[float]] = {"greedy": [], "sampled": []}
    last: list[int] = []
    for _ in range(reps):
        for name, sp in (("greedy", None), ("sampled", sampled)):
            t0 = time.perf_counter()
            got = [e.token async for e in edge.generate([1], tokens, False, sampling=sp)]
            rates[name].append(tokens / (time.perf_counter() - t0))
            if sp is not None:
                last = got
    await link.close()
    await server.close()
    return {k: statistics.median(v) for k, v in rates.items()}, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get(
        "TETHER_ASSETS", REPO.parent / "shared" / "assets")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min)")
    print("1. choose_token, microseconds per token (ratio to greedy)")
    for vocab in (512, 32000, 151936):
        cost = sampler_cost(vocab, args.reps)
        cells = ", ".join(f"{n}: {c:.0f} ({c / cost['greedy']:.1f}x)" for n, c in cost.items())
        print(f"   V={vocab}: {cells}")
    ckpt = open_llm(args.assets / "tinyllm" / "stories260K.bin")
    sampled = SamplingParams(0.8, top_p=0.95, seed=7)
    rates, tokens = asyncio.run(split_tokens_per_s(ckpt, args.tokens, args.reps, sampled))
    same = tokens == generate_whole(full_model(ckpt), [1], args.tokens, sampled)
    print(f"2. stories260K split layer2, ZeroMQ 127.0.0.1: greedy {rates['greedy']:.0f} tokens/s, "
          f"sampled {rates['sampled']:.0f} tokens/s (ratio {rates['sampled'] / rates['greedy']:.2f}); "
          f"sampled tokens equal the whole model's: {same}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
