"""`tether generate`, `llm-edge`, `llm-serve`, `llm-exit`: split LLM inference from the shell.

    tether llm-serve --checkpoint stories260K.bin --listen tcp://0.0.0.0:5570
    tether generate --cloud tcp://HOST:5570 --checkpoint stories260K.bin --split 3 "Once upon"
    tether llm-edge --cloud tcp://HOST:5570 --split 3 --listen tcp://127.0.0.1:5571
    tether generate --edge tcp://127.0.0.1:5571 "Once upon"
    tether edge --bundle DIR --connect tcp://HOST:5555 --llm-checkpoint stories260K.bin \
        --llm-split 3                # DNN + LLM on one endpoint (cloud: --llm-checkpoint too)
    tether generate --edge tcp://127.0.0.1:5560 "Once upon"
    tether llm-exit --checkpoint stories260K.bin --split 3 --out exit3.pt

``generate`` streams tokens to stdout as they come (a summary goes to stderr), either from a
running ``llm-edge`` daemon or ``tether edge --llm-checkpoint`` (``--edge``) or running the edge part (layers [0, k), KV cache,
early exit) in this process. Without ``--checkpoint``
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
    """Register ``generate``, ``llm-serve`` and ``llm-exit``."""
    _add_generate(subparsers)
    _add_edge(subparsers)
    _add_serve(subparsers)
    _add_exit(subparsers)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "generate", help="generate text with an LLM split between this machine and a cloud",
        description="Run embeddings + layers [0, k) here and layers [k, L) on `tether llm-serve` "
                    "at --cloud; stream tokens as they come. Without --cloud (or when it is "
                    "unreachable) the edge answers alone through its exit head.")
    g.add_argument("prompt", help="prompt text")
    g.add_argument("--edge", metavar="ENDPOINT",
                   help="a running `tether llm-edge`, or `tether edge --llm-checkpoint` daemon, "
                        "e.g. tcp://127.0.0.1:5571 (the "
                        "daemon holds the edge part; the options below are then ignored)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate")
    _add_edge_part(g)
    g.set_defaults(handler=_run_generate)


def _add_edge(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser(
        "llm-edge", help="edge daemon for split LLMs: apps stream tokens from --listen",
        description="Hold the edge part (layers [0, K), KV caches, exit head) and serve "
                    "`tether generate --edge ENDPOINT` / tether.edge.EdgeClient on --listen. "
                    "LLM only; `tether edge --llm-checkpoint` serves it beside a DNN bundle.")
    _add_edge_part(d)
    d.add_argument("--listen", default="tcp://127.0.0.1:5571", metavar="ENDPOINT",
                   help="ZeroMQ endpoint applications connect to")
    d.set_defaults(handler=_run_edge)


def _add_edge_part(p: argparse.ArgumentParser) -> None:
    _add_checkpoint(p)
    p.add_argument("--cloud", metavar="ENDPOINT", help="LLM cloud, e.g. tcp://127.0.0.1:5570")
    p.add_argument("--split", type=int, default=None, metavar="K",
                   help="edge keeps layers [0, K) (default: half the layers)")
    p.add_argument("--codec", default="fp16", help="hidden-state codec: fp32, fp16, int8, int4 "
                   "(+zlib) (default fp16)")
    p.add_argument("--exit-head", type=Path, metavar="FILE", help="trained exit head (llm-exit)")
    p.add_argument("--exit-threshold", type=float, metavar="P",
                   help="answer on the edge when the exit's probability >= P "
                        "(default: the calibrated one saved with --exit-head; none otherwise)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="seconds to wait for the cloud per generation step")
    p.add_argument("--first-step-timeout", type=float, default=30.0, metavar="S",
                   help="cloud readiness + first step of a session (a cold cloud loads its "
                        "layers first; default 30)")


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "llm-serve", help="serve the cloud part of split LLMs (PREFILL/DECODE/CLOSE sessions)",
        description="Bind a ZeroMQ ROUTER and serve layers [k, L) of the checkpoint for any "
                    "split k the edges ask for, with a KV cache per session and batched decode.")
    _add_checkpoint(s)
    s.add_argument("--listen", default="tcp://127.0.0.1:5570", metavar="ENDPOINT",
                   help="ZeroMQ endpoint the ROUTER binds (edges connect here)")
    s.add_argument("--max-sessions", type=int, default=64, metavar="N",
                   help="concurrent generation sessions (KV caches) before BUSY")
    s.add_argument("--max-kv-mib", type=int, default=256, help="KV cache memory bound (MiB)")
    s.add_argument("--idle-timeout", type=float, default=120.0, metavar="S",
                   help="seconds after which an idle session's KV cache is freed")
    s.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="decode steps of different sessions batched together")
    s.set_defaults(handler=_run_serve)


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
    if args.edge:
        return _generate_via_daemon(args)
    return asyncio.run(_stream(_build_edge(args), args.prompt, args.max_new_tokens))


def _generate_via_daemon(args: argparse.Namespace) -> int:
    from tether.edge.client import EdgeClient       # light: no torch for a client

    client = EdgeClient(args.edge, timeout=max(10.0, 5 * args.timeout, args.first_step_timeout + 5))
    t0 = time.perf_counter()
    sys.stdout.write(args.prompt)
    try:
        stream = client.generate(args.prompt, args.max_new_tokens)
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
          f"by source {counts}; finish {record.finish}]", file=sys.stderr)
    return 0


def _run_edge(args: argparse.Namespace) -> int:
    from tether.edge.server import EdgeServer

    edge = _build_edge(args)

    async def serve() -> None:
        server = EdgeServer(None, args.listen, llm=edge,
                            llm_model_id=(args.checkpoint or Path("stories260K")).stem)
        endpoint = await server.start()
        print(f"edge part {edge.split} ({edge.config.codec}, cloud {args.cloud or 'none'}) "
              f"serving apps on {endpoint}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(1.0)
            if edge.link is not None:
                await edge.link.close()
    asyncio.run(serve())
    return 0


async def _stream(edge, prompt: str, max_new_tokens: int) -> int:
    t0, counts, sent = time.perf_counter(), {}, 0
    sys.stdout.write(prompt)
    try:
        async for ev in edge.generate(prompt, max_new_tokens):
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
          f"codec {edge.config.codec}; by source {counts}; {sent / max(n, 1):.0f} bytes sent/token]",
          file=sys.stderr)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from tether.cloud.llm import LLMEngine, LLMEngineConfig, LLMServer

    ckpt = _open(args)
    config = LLMEngineConfig(max_sessions=args.max_sessions, max_kv_bytes=args.max_kv_mib << 20,
                             idle_timeout_s=args.idle_timeout, max_batch=args.max_batch)
    name = (args.checkpoint or Path("stories260K")).stem

    async def serve() -> None:
        server = LLMServer(LLMEngine(ckpt, config, name), args.listen)
        endpoint = await server.start()
        print(f"serving {name} ({ckpt.fingerprint[:12]}) LLM sessions on {endpoint}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()
    asyncio.run(serve())
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
