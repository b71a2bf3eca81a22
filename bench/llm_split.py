"""Benchmark of the LLM split on stories260K (issue 6), every figure measured side by side in one run.

    .venv/bin/python bench/llm_split.py [--tokens 48] [--assets DIR]

1. perplexity change per codec on the shared TinyStories sample (target: int8-token <= 1 %).
2. early exit: exit rate vs agreement with the whole model per split layer (raw and trained
   exit heads, thresholds calibrated on held-out text).
3. tokens/s of edge-only, cloud-only (k=0) and split generation over real ZeroMQ sockets on
   127.0.0.1 with an emulated RTT of 0/20/50/100 ms (an asyncio delay in the edge's link:
   half before sending, half after the reply), against the floor of one RTT per token;
   split with a trained early exit skips round trips.
4. bytes per token per hidden-state codec (payload and whole frames on the socket).
5. batching: aggregate tokens/s of 8 concurrent sessions with max_batch 16 vs 1 (end to end),
   and the cloud engine's decode steps/s batched vs one by one (compute only).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.cloud.llm import LLMEngine, LLMEngineConfig, LLMServer  # noqa: E402
from tether.core import protocol as P  # noqa: E402
from tether.edge.llm import GenerateConfig, LLMEdge  # noqa: E402
from tether.edge.zmq_link import ZmqCloudLink  # noqa: E402
from tether.codecs import hidden_codec, wire_roundtrip  # noqa: E402
from tether.partitioner.llm import (EdgeLM, calibrate_threshold, encode_texts,  # noqa: E402
                                    exit_curve, open_llm, split_llm, split_loss,
                                    split_paragraphs, split_stories, train_exit_head)

RTTS_MS = (0, 20, 50, 100)
#: The hidden-state codecs measured here (any of tether.codecs.TENSOR_CODEC_IDS would run).
CODECS = ("fp32", "fp16", "int8-token", "int4-token", "int8-channel", "fp16+zlib",
          "int8-token+zlib", "int4-token+zlib")


class _DelayedLink:
    """The edge's real cloud link with an emulated round trip on session steps: half the
    RTT before sending, half after the answer."""

    def __init__(self, link, delay_s):
        self.link, self.delay_s = link, delay_s

    def __getattr__(self, name):
        return getattr(self.link, name)

    async def session(self, msg, timeout):
        await asyncio.sleep(self.delay_s / 2)
        reply = await self.link.session(msg, timeout)
        await asyncio.sleep(self.delay_s / 2)
        return reply


async def _generate(ckpt, part, endpoint, rtt_s, tokens, threshold=None, codec="fp16"):
    link = _DelayedLink(ZmqCloudLink(endpoint, P.BundleInfo("stories260K", ckpt.fingerprint)),
                        rtt_s) if endpoint else None
    edge = LLMEdge(part, ckpt.fingerprint, ckpt.tokenizer(),
                   GenerateConfig(codec=codec, exit_threshold=threshold, timeout_s=5.0), link)
    t0 = time.perf_counter()
    events = [e async for e in edge.generate([1], tokens, stop_at_eos=False)]
    dt = time.perf_counter() - t0
    if link is not None:
        await link.close()
    return events, dt


def _row(name, rtt_ms, runs):
    """One table row from repeated runs: the median tokens/s and its ratio to 1/RTT."""
    rates = sorted(len(events) / dt for events, dt in runs)
    tps = rates[len(rates) // 2]
    events = runs[0][0]
    cloud = sum(e.source == "cloud" for e in events)
    floor = 1000.0 / rtt_ms if rtt_ms else math.inf
    ratio = f"{tps / floor:5.2f}" if rtt_ms else "   - "
    per_token = 1000.0 / tps
    print(f"| {name:<22} | {rtt_ms:>3} | {tps:8.1f} | {floor:8.1f} | {ratio} | "
          f"{per_token - rtt_ms:7.1f} | {cloud:>3}/{len(events):<3} |")


async def throughput(ckpt, parts, exit_part, tokens, reps):
    server = LLMServer(LLMEngine(ckpt, LLMEngineConfig(), "stories260K"), "tcp://127.0.0.1:0")
    endpoint = await server.start()
    print(f"\n## 3. Generation speed, real sockets on 127.0.0.1, emulated RTT "
          f"({tokens} tokens from BOS, median of {reps} runs)\n")
    print("| mode | RTT ms | tokens/s | floor 1/RTT | ratio to floor | ms/token - RTT "
          "| cloud steps |")
    print("|---|---|---|---|---|---|---|")
    _row("edge-only (5 layers)", 0, [await _generate(ckpt, parts["edge"], None, 0, tokens)
                                     for _ in range(reps)])
    thr = exit_part[1] if exit_part[1] <= 1 else 1.0     # nothing met the target: never exit
    for rtt in RTTS_MS:
        for name, part, t in (("cloud-only (k=0)", parts["cloud"], None),
                              ("split k=2", parts["split"], None),
                              (f"split k=3 + exit@{thr:.2f}", exit_part[0], thr)):
            runs = [await _generate(ckpt, part, endpoint, rtt / 1000, tokens, t) for _ in range(reps)]
            _row(name, rtt, runs)
    await server.close()


async def wire_bytes(ckpt, part, tokens):
    server = LLMServer(LLMEngine(ckpt, LLMEngineConfig(), "stories260K"), "tcp://127.0.0.1:0")
    endpoint = await server.start()
    print("\n## 4. Bytes per token per codec (dim 64; decode steps after the prefill)\n")
    print("| codec | payload B/token | request frames B/token (socket) | reply B/token |")
    print("|---|---|---|---|")
    for cid in CODECS:
        events, _ = await _generate(ckpt, part, endpoint, 0, tokens, codec=cid)
        steps = [e for e in events[1:] if e.source == "cloud"]
        sent = sum(e.bytes_sent for e in steps) / len(steps)
        recv = sum(e.bytes_received for e in steps) / len(steps)
        h = torch.randn(1, 64)
        payload = hidden_codec(cid).encode(h).payload_bytes
        print(f"| {cid} | {payload} | {sent:.0f} | {recv:.0f} |")
    await server.close()


def perplexity(ckpt, texts):
    toks = encode_texts(ckpt.tokenizer(), texts)
    print("\n## 1. Loss / perplexity through each codec (cs336 TinyStories sample, 5 stories)\n")
    print("| k | codec | nats/token | perplexity | change |")
    print("|---|---|---|---|---|")
    for k in (1, 2, 3, 4):
        edge, cloud = split_llm(ckpt, k)
        base = split_loss(edge, cloud, toks)
        for cid in CODECS:
            if "zlib" in cid:
                continue        # lossless stage: same numbers as without it
            loss = split_loss(edge, cloud, toks, wire_roundtrip(hidden_codec(cid)))
            print(f"| {k} | {cid} | {loss:.4f} | {math.exp(loss):.4f} | "
                  f"{100 * (math.exp(loss - base) - 1):+.3f} % |")


def exits(ckpt, train, calib, test, steps, target=0.9):
    print("\n## 2. Early exit: exit rate vs agreement with the whole model (teacher-forced on "
          "the cs336 sample; heads trained on validation-head paragraphs 0..299, thresholds "
          f"calibrated on paragraphs 300..399 for >= {target:.0%} agreement)\n")
    print("| k | head | threshold | exit rate | agreement of exits | overall agreement |")
    print("|---|---|---|---|---|---|")
    trained = {}
    for k in (1, 2, 3, 4):
        edge, cloud = split_llm(ckpt, k)
        for label in ("raw", "trained"):
            if label == "trained":
                edge.exit_head = train_exit_head(edge, cloud, train, steps=steps)
            grid = [i / 20 for i in range(6, 20)] + [0.97, 0.99]
            chosen = calibrate_threshold(exit_curve(edge, cloud, calib, grid), target).threshold
            trained[k, label] = (edge, chosen)
            shown = sorted({0.5, 0.7, 0.9} | ({chosen} if chosen < 1 else set()))
            for p in exit_curve(edge, cloud, test, shown):
                mark = " (calibrated)" if p.threshold == chosen else ""
                print(f"| {k} | {label} | {p.threshold:.2f}{mark} | {p.exit_rate:6.1%} | "
                      f"{p.agreement:6.1%} | {p.overall_agreement:6.1%} |")
    return trained


async def batching(ckpt, part, tokens, sessions=8):
    print(f"\n## 5. Cloud batching: {sessions} concurrent sessions, split k=2, RTT 0\n")
    print("| max_batch | aggregate tokens/s | mean batch |")
    print("|---|---|---|")
    for max_batch in (1, 16):
        server = LLMServer(LLMEngine(ckpt, LLMEngineConfig(max_batch=max_batch)), "tcp://127.0.0.1:0")
        endpoint = await server.start()
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[_generate(ckpt, part, endpoint, 0, tokens)
                                      for _ in range(sessions)])
        dt = time.perf_counter() - t0
        st = server.engine.stats
        mean = st["batched_rows"] / st["batches"] if st["batches"] else 1.0
        print(f"| {max_batch} | {sum(len(e) for e, _ in runs) / dt:.1f} | {mean:.2f} |")
        await server.close()


def engine_batching(ckpt, sessions=8, steps=32):
    """Cloud compute only (no sockets, no edge): decode steps/s batched vs one by one."""
    from tether.cloud.llm import _Job
    print(f"\n{sessions} sessions with prompts of 5..40 tokens, {steps} decode steps each, "
          "engine only (no sockets, no edge compute):\n")
    print("| cloud engine | decode steps/s | speed-up |")
    print("|---|---|---|")
    edge, codec = EdgeLM(ckpt, 2, with_exit=False), hidden_codec("fp16")
    rates = {}
    for mode in ("one by one", "batched"):
        engine = LLMEngine(ckpt, LLMEngineConfig(max_batch=sessions))
        lengths = [5 + (35 * i) // max(sessions - 1, 1) for i in range(sessions)]
        for i, n in enumerate(lengths):
            h = edge(torch.tensor([[1] + [400 + j % 50 for j in range(n - 1)]]))[0]
            engine.run_jobs([_Job(_session_msg(P.Prefill, i, ckpt, codec, h, 0), None)])
        step = edge(torch.tensor([[1, 400]]))[0][-1:]
        t0 = time.perf_counter()
        for _ in range(steps):
            jobs = [_Job(_session_msg(P.Decode, i, ckpt, codec, step, lengths[i]), None)
                    for i in range(sessions)]
            if mode == "batched":
                engine.run_jobs(jobs)
            else:
                for job in jobs:
                    engine.run_jobs([job])
            lengths = [n + 1 for n in lengths]
        rates[mode] = sessions * steps / (time.perf_counter() - t0)
        print(f"| {mode} | {rates[mode]:.0f} | {rates[mode] / rates['one by one']:.2f}x |")


def _session_msg(cls, i, ckpt, codec, hidden, position):
    encoded = codec.encode(hidden)
    return cls(i, f"s{i}", ckpt.fingerprint, "layer2", "fp16", position, hidden.shape[0],
               encoded.header, None, tuple(encoded.payload))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--exit-steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3, help="runs per speed cell (median shown)")
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get(
        "TETHER_ASSETS", REPO.parent / "shared" / "assets")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = open_llm(args.assets / "tinyllm" / "stories260K.bin")
    text = args.assets / "tinyllm" / "text"
    stories = split_stories((text / "cs336_tinystories_sample.txt").read_text())
    paras = split_paragraphs((text / "tinystories_validation_head.txt").read_text(), 400)
    train = encode_texts(ckpt.tokenizer(), paras[:300])
    calib = encode_texts(ckpt.tokenizer(), paras[300:])
    print(f"# LLM split benchmark: stories260K, torch {torch.__version__}, 1 intra-op thread, "
          f"protocol v{P.PROTOCOL_VERSION}")
    perplexity(ckpt, stories)
    trained = exits(ckpt, train, calib, encode_texts(ckpt.tokenizer(), stories), args.exit_steps)
    parts = {"edge": EdgeLM(ckpt, 5), "cloud": EdgeLM(ckpt, 0), "split": EdgeLM(ckpt, 2)}
    asyncio.run(throughput(ckpt, parts, trained[3, "trained"], args.tokens, args.reps))
    asyncio.run(wire_bytes(ckpt, parts["split"], 16))
    asyncio.run(batching(ckpt, parts["split"], args.tokens))
    engine_batching(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
