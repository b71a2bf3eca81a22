"""`tether generate` and `tether llm-exit`: split LLM inference and exit heads from the shell.

The daemons are `tether cloud` and `tether edge` (one per side, images and LLMs alike)::

    tether cloud --bind tcp://0.0.0.0:5555 --llm-checkpoint stories260K.bin   # (+ --bundle DIR)
    tether edge --connect tcp://HOST:5555 --llm-checkpoint stories260K.bin --llm-split 3
    tether generate --temperature 0.8 --top-p 0.95 --seed 7 "Once upon"   # sampled, reproducible
    tether generate --edge tcp://127.0.0.1:5560 "Once upon"
    tether generate --cloud tcp://HOST:5555 --checkpoint stories260K.bin --split 3 "Once upon"
    tether llm-exit --checkpoint stories260K.bin --split 3 --out exit3.pt

``generate`` streams tokens to stdout as they come (a summary goes to stderr), either from a
running ``tether edge`` daemon (``--edge``) or running the edge part (layers [0, k), KV cache,
early exit) in this process against a ``tether cloud`` (``--cloud``). Without ``--checkpoint``
the shared assets' stories260K is used (``TETHER_ASSETS`` or ../shared/assets).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from tether.core.errors import ConfigError


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``generate`` and ``llm-exit`` (the daemons are ``tether edge`` / ``tether cloud``)."""
    _add_generate(subparsers)
    _add_exit(subparsers)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "generate", help="generate text with an LLM split between this machine and a cloud",
        description="Stream tokens from a running `tether edge --llm-checkpoint` daemon "
                    "(--edge), or run embeddings + layers [0, k) here and layers [k, L) on a "
                    "`tether cloud --llm-checkpoint` at --cloud. Without --cloud (or when it is "
                    "unreachable) the edge answers alone through its exit head.")
    g.add_argument("prompt", help="prompt text")
    g.add_argument("--edge", metavar="ENDPOINT",
                   help="a running `tether edge --llm-checkpoint` daemon's --listen endpoint, "
                        "e.g. tcp://127.0.0.1:5560 (the daemon holds the edge part; the options "
                        "below are then ignored)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate")
    _add_sampling(g)
    _add_edge_part(g)
    g.set_defaults(handler=_run_generate)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sampling (default: greedy; also with --edge)")
    s.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sample at temperature T > 0 (0: greedy, the whole model's argmax)")
    s.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens only (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample among the most likely tokens holding probability P (1: all)")
    s.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the draws: the same seed gives the same tokens, split or "
                        "not (default: a fresh one, printed in the summary)")


def _sampling(args: argparse.Namespace):
    from tether.core.sampling import SamplingParams
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed).resolved()


def _add_edge_part(p: argparse.ArgumentParser) -> None:
    _add_checkpoint(p)
    p.add_argument("--cloud", metavar="ENDPOINT",
                   help="a `tether cloud --llm-checkpoint` daemon, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--split", type=int, default=None, metavar="K",
                   help="edge keeps layers [0, K) (default: half the layers)")
    p.add_argument("--codec", default="fp16", help="hidden-state codec: fp32, fp16, int8-token, "
                   "int4-token, int8-channel, each +zlib or +zstd (old names int8, int4 = "
                   "int8-token, int4-token) (default fp16)")
    p.add_argument("--exit-head", type=Path, metavar="FILE", help="trained exit head (llm-exit)")
    p.add_argument("--exit-threshold", type=float, metavar="P",
                   help="answer on the edge when the exit's probability >= P "
                        "(default: the calibrated one saved with --exit-head; none otherwise)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="seconds to wait for the cloud per generation step")
    p.add_argument("--first-step-timeout", type=float, default=30.0, metavar="S",
                   help="cloud readiness + first step of a session (a cold cloud loads its "
                        "layers first; default 30)")


def _add_exit(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser(
        "llm-exit", help="train and calibrate an early-exit head for a split LLM",
        description="Distil the whole model into an exit head at layer K on --train-text, "
                    "calibrate the confidence threshold on --calibration-text for the target "
                    "agreement with the whole model, and save FILE (+ FILE.json).")
    _add_checkpoint(e)
    e.add_argument("--split", type=int, required=True, metavar="K",
                   help="the exit sits after decoder layer K (required)")
    e.add_argument("--train-text", type=Path, help="default: assets' tinystories_validation_head")
    e.add_argument("--calibration-text", type=Path,
                   help="stories split on <|endoftext|> (default: the 100 training-text "
                        "paragraphs after the training ones)")
    e.add_argument("--paragraphs", type=int, default=300, help="training paragraphs (default 300)")
    e.add_argument("--steps", type=int, default=300, metavar="N", help="training steps")
    e.add_argument("--target-agreement", type=float, default=0.9, metavar="P",
                   help="calibrate the threshold so exit tokens agree with the whole model "
                        "this often")
    e.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="where to save the exit head (required)")
    e.set_defaults(handler=_run_exit)


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="llama2.c .bin or HF model directory (default: assets' stories260K.bin)")
    p.add_argument("--tokenizer", type=Path, metavar="PATH", help="llama2.c tokenizer .bin")


def _assets() -> Path:
    env = os.environ.get("TETHER_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "assets"


def _open(args: argparse.Namespace):
    import torch

    from tether.partitioner.llm import open_llm
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    path = args.checkpoint or _assets() / "tinyllm" / "stories260K.bin"
    return open_llm(path, args.tokenizer)


def _build_edge(args: argparse.Namespace):
    """The in-process edge part (+ exit head, + link to --cloud) from the options."""
    import torch

    from tether.edge.llm import open_llm_edge
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return open_llm_edge(args.checkpoint or _assets() / "tinyllm" / "stories260K.bin",
                         args.tokenizer, args.split, args.codec, args.cloud or "",
                         args.exit_head, args.exit_threshold, args.timeout,
                         args.first_step_timeout)


def _run_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)      # bad settings: one line before anything loads
    if args.edge:
        return _generate_via_daemon(args, sampling)
    return asyncio.run(_stream(_build_edge(args), args.prompt, args.max_new_tokens, sampling))


def _generate_via_daemon(args: argparse.Namespace, sampling) -> int:
    from tether.edge.client import EdgeClient       # light: no torch for a client

    client = EdgeClient(args.edge, timeout=max(10.0, 5 * args.timeout, args.first_step_timeout + 5))
    t0 = time.perf_counter()
    sys.stdout.write(args.prompt)
    try:
        stream = client.generate(args.prompt, args.max_new_tokens,
                                 temperature=sampling.temperature, top_k=sampling.top_k,
                                 top_p=sampling.top_p, seed=sampling.seed)
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except BaseException:
        print()             # the error line (tether: error: ...) starts on its own line
        raise
    finally:
        client.close()
    record = stream.record
    n, dt = record.cloud + record.exit + record.local, time.perf_counter() - t0
    counts = {s: c for s, c in record.by_source().items() if c}
    print()
    print(f"[{n} tokens in {dt:.2f} s = {n / dt:.1f} tokens/s via edge {args.edge}; "
          f"by source {counts}; finish {record.finish}; {sampling.describe()}]", file=sys.stderr)
    return 0


async def _stream(edge, prompt: str, max_new_tokens: int, sampling) -> int:
    t0, counts, sent = time.perf_counter(), {}, 0
    sys.stdout.write(prompt)
    try:
        async for ev in edge.generate(prompt, max_new_tokens, sampling=sampling):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            counts[ev.source] = counts.get(ev.source, 0) + 1
            sent += ev.bytes_sent
    except BaseException:
        print()             # the error line (tether: error: ...) starts on its own line
        raise
    finally:
        if edge.link is not None:
            await edge.link.close()
    n, dt = sum(counts.values()), time.perf_counter() - t0
    print(file=sys.stdout)
    print(f"[{n} tokens in {dt:.2f} s = {n / dt:.1f} tokens/s; split layer{edge.part.k}, "
          f"codec {edge.config.codec}; by source {counts}; {sent / max(n, 1):.0f} bytes sent/token; "
          f"{sampling.describe()}]",
          file=sys.stderr)
    return 0


def _run_exit(args: argparse.Namespace) -> int:
    from tether.partitioner.llm import (calibrate_threshold, encode_texts, exit_curve,
                                        save_exit_head, split_llm, split_paragraphs, split_stories,
                                        train_exit_head)

    ckpt = _open(args)
    tok = ckpt.tokenizer()
    text_dir = _assets() / "tinyllm" / "text"
    paras = split_paragraphs((args.train_text or text_dir / "tinystories_validation_head.txt")
                             .read_text(), args.paragraphs + 100)
    train = encode_texts(tok, paras[:args.paragraphs])
    calib = encode_texts(tok, split_stories(args.calibration_text.read_text())
                         if args.calibration_text else paras[args.paragraphs:])
    if not train or not calib:
        raise ConfigError("llm-exit needs non-empty training and calibration texts")
    edge, cloud = split_llm(ckpt, args.split)
    edge.exit_head = train_exit_head(edge, cloud, train, steps=args.steps)
    points = exit_curve(edge, cloud, calib, [i / 20 for i in range(4, 20)] + [0.97, 0.99])
    chosen = calibrate_threshold(points, args.target_agreement)
    meta = {"split": args.split, "fingerprint": ckpt.fingerprint, "threshold": chosen.threshold,
            "exit_rate": chosen.exit_rate, "agreement": chosen.agreement,
            "target_agreement": args.target_agreement}
    if chosen.threshold == float("inf"):
        meta["threshold"] = None
    save_exit_head(edge.exit_head, args.out, meta)
    for p in points:
        print(f"threshold {p.threshold:.2f}: exit rate {p.exit_rate:6.1%}, "
              f"agreement {p.agreement:6.1%}")
    print(f"saved {args.out} (threshold {meta['threshold']}, exit rate {chosen.exit_rate:.1%})")
    return 0
