"""`tether edge` (the edge daemon: images and LLM sessions) and `tether infer` (its image client)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tether.commands._args import flag_overrides
from tether.core.errors import InputShapeError


#: One literal mapping: ``tether edge`` option (argparse dest) -> the config field it sets
#: (dotted: ``[link] connect`` is ``link.connect``). Flags win over the TOML file.
EDGE_FLAGS: dict[str, str] = {
    "bundle": "bundle", "listen": "listen", "edge_id": "edge_id", "metrics_port": "metrics_port",
    "action": "action", "deadline": "deadline_seconds", "records": "records",
    "connect": "link.connect",
    "curve_server_key": "curve.server_key", "curve_client_cert": "curve.client_cert",
    "http_port": "http.port",
    "llm_checkpoint": "llm.checkpoint", "llm_tokenizer": "llm.tokenizer", "llm_split": "llm.split",
    "llm_codec": "llm.codec", "llm_exit_head": "llm.exit_head",
    "llm_exit_threshold": "llm.exit_threshold", "llm_timeout": "llm.timeout_seconds",
    "llm_first_step_timeout": "llm.first_step_timeout_seconds",
    "llm_max_new_tokens": "llm.max_new_tokens",
}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``edge`` and ``infer`` sub-commands."""
    p = subparsers.add_parser(
        "edge", help="run the edge daemon: a DNN bundle, a split LLM or both on one endpoint",
        description="Serve a DNN bundle (heads on ONNX Runtime) and/or a split LLM's edge part "
                    "to local applications (`tether infer`, `tether generate --edge`, HTTP), "
                    "over one link to a `tether cloud`. Per image a policy picks local, "
                    "split+codec, early exit or full offload; requests the cloud cannot answer "
                    "in time are answered on the edge. SIGTERM drains.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML config: keys at the top level or in [edge], and the tables [link], "
                        "[curve], [llm], [http], [policy] (configs/edge.example.toml); "
                        "flags override it")
    p.add_argument("--bundle", type=Path, metavar="DIR", help="DNN bundle directory")
    p.add_argument("--listen", metavar="ENDPOINT",
                   help="local endpoint for applications (default tcp://127.0.0.1:5560)")
    p.add_argument("--metrics-port", type=int, metavar="P", help="Prometheus /metrics port")
    p.add_argument("--action", metavar="KEY",
                   help="fixed action: split:SPLIT:CODEC, local, offload:CODEC, exit:SPLIT:CODEC "
                        "(default auto: the smallest exported split, fp32)")
    p.add_argument("--deadline", type=float, metavar="S",
                   help="default per-request deadline in seconds (default 1.0)")
    p.add_argument("--records", type=Path, metavar="FILE",
                   help="append one record per request to FILE (.jsonl or .csv)")
    p.add_argument("--edge-id", metavar="NAME", help="name in records and metrics")
    link = p.add_argument_group("link to the cloud ([link], [curve])")
    link.add_argument("--connect", metavar="ENDPOINT",
                      help="cloud endpoint, e.g. tcp://10.0.0.2:5555 (omit: local answers only)")
    link.add_argument("--curve-server-key", metavar="Z85|FILE", help="the cloud's CURVE public key")
    link.add_argument("--curve-client-cert", type=Path, metavar="FILE",
                      help="this edge's CURVE secret certificate (from `tether keys generate`)")
    http = p.add_argument_group("HTTP front ([http])")
    http.add_argument("--http-port", type=int, metavar="P",
                      help="also serve HTTP on P (0: any free port): POST /v1/infer, OpenAI-style "
                           "/v1/completions and /v1/chat/completions, probes (default off; "
                           "needs pip install 'tether[http]')")
    _add_llm_options(p)
    p.set_defaults(handler=_run_edge)

    q = subparsers.add_parser(
        "infer", help="classify image files through a running edge daemon",
        description="Read IMAGE files (any format Pillow reads), resize them to the bundle's "
                    "input, send them to the edge at ENDPOINT, print class and timings.")
    q.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    q.add_argument("--edge", required=True, metavar="ENDPOINT",
                   help="the edge's --listen endpoint, e.g. tcp://127.0.0.1:5560")
    q.add_argument("--deadline", type=float, metavar="S", help="per-request deadline (seconds)")
    q.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="give up on the edge after S seconds (default 10)")
    q.add_argument("--json", action="store_true", help="one JSON object per image")
    q.set_defaults(handler=_run_infer)


def _add_llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "split LLM ([llm])", "also stream LLM generations on --listen (`tether generate --edge`); "
        "layers [K, L) are served by the --connect cloud (`tether cloud --llm-checkpoint`)")
    g.add_argument("--llm-checkpoint", type=Path, metavar="PATH",
                   help="llama2.c .bin or HF model directory")
    g.add_argument("--llm-tokenizer", type=Path, metavar="PATH", help="llama2.c tokenizer .bin")
    g.add_argument("--llm-split", type=int, metavar="K",
                   help="edge keeps layers [0, K) (default: half the layers)")
    g.add_argument("--llm-codec", metavar="CODEC",
                   help="hidden-state codec: fp32, fp16, int8-token, int4-token, int8-channel, "
                        "each +zlib or +zstd (old names int8, int4 = int8-token, int4-token) "
                        "(default fp16)")
    g.add_argument("--llm-exit-head", type=Path, metavar="FILE",
                   help="trained exit head (`tether llm-exit`)")
    g.add_argument("--llm-exit-threshold", type=float, metavar="P",
                   help="answer on the edge when the exit's probability >= P "
                        "(default: the exit head's calibrated one)")
    g.add_argument("--llm-timeout", type=float, metavar="S",
                   help="seconds to wait for the cloud per generation step (default 2.0)")
    g.add_argument("--llm-first-step-timeout", type=float, metavar="S",
                   help="cloud readiness + a session's first step (a cold cloud loads its "
                        "layers first; default 30)")
    g.add_argument("--llm-max-new-tokens", type=int, metavar="N",
                   help="cap on the tokens of one generation (default 1024)")


def _run_edge(args: argparse.Namespace) -> int:
    from tether.edge.config import load_edge_config
    from tether.edge.daemon import run_daemon

    config = load_edge_config(args.config, flag_overrides(args, EDGE_FLAGS))
    config.require_model()
    return run_daemon(config)


def _run_infer(args: argparse.Namespace) -> int:
    from tether.edge.client import EdgeClient

    with EdgeClient(args.edge, timeout=args.timeout) as client:
        info = client.info()
        if info.input is None or len(info.input.shape) != 4:
            raise InputShapeError(f"edge serves {info.model_id} without an NCHW input shape")
        height, width = info.input.shape[2], info.input.shape[3]
        for path in args.images:
            image = load_image(path, height, width)
            answer = client.infer(image, args.deadline)
            _print_answer(path, answer, args.json)
    return 0


def load_image(path: Path, height: int, width: int):
    """An image file as uint8 RGB HWC resized to (height, width)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputShapeError(f"cannot read image {path}: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def _print_answer(path: Path, answer, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"image": str(path), "class": answer.prediction, "label": answer.label,
                          "action": answer.action, "outcome": answer.outcome,
                          "fallback_reason": answer.fallback_reason,
                          "timings": answer.timings}))
        return
    name = f" ({answer.label})" if answer.label else ""
    reason = f" [{answer.fallback_reason}]" if answer.fallback_reason else ""
    stages = " ".join(f"{k}={v * 1000:.2f}ms" for k, v in answer.timings.items() if v > 0)
    print(f"{path}: class {answer.prediction}{name}  {answer.outcome}{reason} via "
          f"{answer.action}  {stages}")
    sys.stdout.flush()
