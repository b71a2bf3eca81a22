"""LLM tokens/s through the split vs the 1-RTT-per-token floor, with the delay on the wire.

    .venv/bin/python bench/llm_tokens.py [--tokens 48] [--reps 3] [--rtts 0,20,50,100]

Three processes, all on 127.0.0.1: the cloud (`tether cloud --llm-checkpoint`), a userspace
TCP relay per RTT (`tether testbed link --delay-ms RTT/2`: half the RTT each direction,
1000 Mbit/s, so only the delay shapes it), and this process as the edge
(:func:`tether.edge.llm.open_llm_edge` pointed at the relay). The delay sits in the byte
stream, not in a link class, so the same script measures any edge link (SessionLink
before issue 13, the image path's CloudLink after) without a change to how delay is made.
RTT 0 connects straight to the cloud (no relay). Greedy generation of ``--tokens`` tokens
from BOS (no early exit: every token crosses), one warm-up stream, then the median of
``--reps`` streams per cell. The floor: a mode that asks the cloud for every token gets
at most 1/RTT tokens/s; "ms/token - RTT" is what the runtime and compute add per token.
The relay's shaper ticks every 1 ms, which adds up to ~1 ms per direction; the
"relay, 0 ms" row measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLI = [sys.executable, "-m", "tether.cli"]
MODES = (("cloud-only (k=0)", 0), ("split k=2", 2))


def start_cloud(checkpoint: Path, tokenizer: Path | None) -> tuple[subprocess.Popen, str]:
    """`tether cloud` serving the LLM on an ephemeral port; returns (process, endpoint)."""
    cmd = CLI + ["cloud", "--llm-checkpoint", str(checkpoint), "--bind", "tcp://127.0.0.1:*",
                 "--torch-threads", "1"]
    if tokenizer is not None:
        cmd += ["--llm-tokenizer", str(tokenizer)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env())
    deadline = time.monotonic() + 120
    for line in proc.stdout:                          # "tether cloud ready on tcp://..."
        if m := re.search(r"ready on (tcp://\S+)", line):
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("tether cloud did not print its ready line")


def start_relay(endpoint: str, one_way_ms: float, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`tether testbed link` in front of ``endpoint``; returns (process, relay endpoint)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    ports = workdir / f"relay-{one_way_ms:g}.json"
    proc = subprocess.Popen(CLI + ["testbed", "link", "--target", f"{host}:{port}",
                                   "--up", "constant:1000", "--delay-ms", f"{one_way_ms:g}",
                                   "--ports-file", str(ports)],
                            stdout=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 60
    while not ports.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("tether testbed link did not start")
        time.sleep(0.05)
    return proc, f"tcp://{host}:{json.loads(ports.read_text())['ports'][0]}"


def open_edge(checkpoint: Path, tokenizer: Path | None, split: int, cloud: str):
    """The edge through the public constructor (the one place that names the edge API)."""
    from tether.edge.llm import open_llm_edge
    return open_llm_edge(checkpoint, tokenizer, split=split, cloud=cloud, timeout_s=10.0)


async def close_edge(edge) -> None:
    link = getattr(edge, "link", None)
    if link is not None and hasattr(link, "close"):
        await link.close()


async def streams(edge, tokens: int, reps: int) -> tuple[list[float], int]:
    """Tokens/s of ``reps`` greedy streams after one warm-up; cloud-answered tokens of the last."""
    rates, cloud = [], 0
    for i in range(reps + 1):
        t0 = time.perf_counter()
        events = [e async for e in edge.generate([1], tokens, stop_at_eos=False)]
        dt = time.perf_counter() - t0
        if i:
            rates.append(len(events) / dt)
        cloud = sum(e.source == "cloud" for e in events)
    return rates, cloud


def row(name: str, rtt_ms: float, rates: list[float], cloud: int, tokens: int) -> None:
    tps = sorted(rates)[len(rates) // 2]
    floor = 1000.0 / rtt_ms if rtt_ms else math.inf
    ratio = f"{tps / floor:.2f}" if rtt_ms else "-"
    print(f"| {name} | {rtt_ms:g} | {tps:.1f} | {floor:.1f} | {ratio} | "
          f"{1000.0 / tps - rtt_ms:.1f} | {cloud}/{tokens} |", flush=True)


async def run(args: argparse.Namespace, endpoint: str, workdir: Path) -> None:
    print("| mode | RTT ms | tokens/s (median) | floor 1/RTT | ratio to floor | ms/token - RTT "
          "| cloud tokens |\n|---|---|---|---|---|---|---|")
    edge = open_edge(args.checkpoint, args.tokenizer, 5, "")
    rates, _ = await streams(edge, args.tokens, args.reps)
    row("edge-only (whole model)", 0, rates, 0, args.tokens)
    for rtt in args.rtts:
        relay = None
        if rtt or args.relay_zero:
            relay, target = start_relay(endpoint, rtt / 2, workdir)
        else:
            target = endpoint
        try:
            for name, k in MODES:
                edge = open_edge(args.checkpoint, args.tokenizer, k, target)
                try:
                    rates, cloud = await streams(edge, args.tokens, args.reps)
                finally:
                    await close_edge(edge)
                label = name + (", relay" if relay is not None and not rtt else "")
                row(label, rtt, rates, cloud, args.tokens)
        finally:
            if relay is not None:
                relay.terminate()
                relay.wait(10)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def main() -> int:
    assets = Path(os.environ.get("TETHER_ASSETS", REPO.parent / "shared" / "assets"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3, help="streams per cell (median shown)")
    ap.add_argument("--rtts", type=lambda s: [float(v) for v in s.split(",")],
                    default=[0.0, 20.0, 50.0, 100.0], help="emulated RTTs in ms, comma-separated")
    ap.add_argument("--relay-zero", action="store_true",
                    help="RTT 0 also through the relay (measures the relay's own cost)")
    ap.add_argument("--checkpoint", type=Path, default=assets / "tinyllm" / "stories260K.bin")
    ap.add_argument("--tokenizer", type=Path, default=assets / "tinyllm" / "tok512.bin")
    args = ap.parse_args()
    import logging
    import warnings

    import torch
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("tether").setLevel(logging.ERROR)   # edge-only streams warn per stream
    print(f"# LLM tokens/s through the split: {args.checkpoint.name}, {args.tokens} tokens, "
          f"median of {args.reps}; load average {os.getloadavg()[0]:.1f} at start")
    cloud, endpoint = start_cloud(args.checkpoint, args.tokenizer)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(run(args, endpoint, Path(tmp)))
    finally:
        cloud.terminate()
        cloud.wait(15)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
