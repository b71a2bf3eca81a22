"""`tether cloud` (the cloud daemon: DNN tails and LLM sessions) and `tether keys generate`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
from pathlib import Path
from typing import Any

from tether.commands._args import comma_list, flag_overrides

log = logging.getLogger("tether.cloud")


#: One literal mapping: ``tether cloud`` option (argparse dest) -> the config field it sets
#: (dotted: ``[llm] max_sessions`` is ``llm.max_sessions``). Flags win over the TOML file.
CLOUD_FLAGS: dict[str, str] = {
    "bundle": "bundles", "bind": "bind", "metrics_port": "metrics_port",
    "metrics_host": "metrics_host", "max_batch_size": "max_batch_size",
    "max_queue_delay_ms": "max_queue_delay_s", "max_queue": "max_queue", "workers": "workers",
    "torch_threads": "torch_threads",
    "curve_secret_key": "curve.secret_key", "curve_allowed_keys": "curve.allowed_keys",
    "llm_checkpoint": "llm.checkpoint", "llm_tokenizer": "llm.tokenizer",
    "llm_max_sessions": "llm.max_sessions", "llm_max_kv_mib": "llm.max_kv_bytes",
    "llm_max_session_tokens": "llm.max_session_tokens", "llm_idle_timeout": "llm.idle_timeout_s",
    "llm_max_batch": "llm.max_batch", "llm_splits": "llm.splits", "llm_codecs": "llm.codecs",
    "ray": "ray.address", "tail_workers": "ray.tail_workers", "worker_cpus": "ray.worker_cpus",
    "worker_gpus": "ray.worker_gpus",
}

#: flags given in other units than their field
_FLAG_UNITS: dict[str, Any] = {"max_queue_delay_ms": lambda ms: ms / 1000.0,
                               "llm_max_kv_mib": lambda mib: mib << 20}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("cloud", help="serve DNN tails and/or split-LLM sessions over ZeroMQ",
                       description="Cloud daemon: tails of DNN bundles and the cloud part of a "
                       "split LLM (sessions with KV caches, batched decode) for many edges, on one "
                       "endpoint; dynamic batching, Prometheus /metrics, /healthz, /readyz. "
                       "SIGTERM drains and exits.")
    p.add_argument("--bundle", action="append", type=Path, metavar="DIR",
                   help="bundle directory from `tether partition` (repeatable)")
    p.add_argument("--bind", help="ZeroMQ endpoint, e.g. tcp://0.0.0.0:5555 "
                                  "(default: tcp://127.0.0.1:5555, from the config)")
    p.add_argument("--metrics-port", type=int, help="HTTP port for /metrics and probes (0: any)")
    p.add_argument("--metrics-host", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--config", type=Path,
                   help="TOML config: keys at the top level or in [cloud], and the tables [llm], "
                        "[curve], [ray] (configs/cloud.example.toml); flags override it")
    p.add_argument("--max-batch-size", type=int,
                   help="requests per tail execution (default: 16, from the config)")
    p.add_argument("--max-queue-delay-ms", type=float, help="how long a partial batch may wait")
    p.add_argument("--max-queue", type=int, help="queued requests before answering BUSY")
    p.add_argument("--workers", type=int, help="compute threads (default: 1, from the config)")
    p.add_argument("--torch-threads", type=int,
                   help="torch intra-op threads; 0: torch's default, every core, which "
                        "collapses under concurrent load (default: 1, from the config)")
    curve = p.add_argument_group("CurveZMQ ([curve])")
    curve.add_argument("--curve-secret-key", type=Path,
                       help="server .key_secret (enables CURVE)")
    curve.add_argument("--curve-allowed-keys", type=Path,
                       help="directory of allowed client .key files")
    _add_llm_options(p)
    ray = p.add_argument_group("Ray pool ([ray]; pip install 'tether[ray]')")
    ray.add_argument("--ray", metavar="auto|HOST:PORT",
                     help="run tails on Ray workers: 'auto' (this machine's cluster, or a new "
                          "local one) or a running cluster's head address")
    ray.add_argument("--tail-workers", type=int, metavar="N", help="Ray tail workers (default 2)")
    ray.add_argument("--worker-cpus", type=float, metavar="C", help="CPUs per worker (default 1)")
    ray.add_argument("--worker-gpus", type=float, metavar="G", help="GPUs per worker (default 0)")
    p.set_defaults(handler=run_cloud)

    d = sub.add_parser("cloud-ray-dispatcher", help=argparse.SUPPRESS)
    d.add_argument("--endpoint", required=True)
    d.add_argument("--settings", required=True)
    d.set_defaults(handler=run_ray_dispatcher)

    keys = sub.add_parser("keys", help="CurveZMQ key management")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    gen = ksub.add_parser("generate", help="write a CurveZMQ key pair NAME.key / NAME.key_secret")
    gen.add_argument("--out", type=Path, required=True, help="directory to write into")
    gen.add_argument("--name", default="server", help="key pair name (default: server)")
    gen.add_argument("--force", action="store_true",
                     help="overwrite an existing key pair of that name (its holders lose access)")
    gen.set_defaults(handler=run_keys_generate)
    keys.set_defaults(handler=lambda a: keys.print_help() or 2)


def _add_llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "split LLM ([llm])", "also serve layers [k, L) of a decoder-only LLM to edges running "
        "`tether edge --llm-checkpoint` (same weights), any split k they ask for")
    g.add_argument("--llm-checkpoint", type=Path, metavar="PATH",
                   help="llama2.c .bin or HF model directory")
    g.add_argument("--llm-tokenizer", type=Path, metavar="PATH",
                   help="llama2.c tokenizer .bin of --llm-checkpoint")
    g.add_argument("--llm-max-sessions", type=int, metavar="N",
                   help="concurrent generation sessions (KV caches) (default 64)")
    g.add_argument("--llm-max-kv-mib", type=int, metavar="MIB",
                   help="bound on all sessions' KV caches; least recently used sessions are "
                        "evicted beyond it (default 256)")
    g.add_argument("--llm-max-session-tokens", type=int, metavar="N",
                   help="tokens one session may hold (default 0: the model's context length)")
    g.add_argument("--llm-idle-timeout", type=float, metavar="S",
                   help="seconds after which an idle session's KV cache is freed (default 120)")
    g.add_argument("--llm-max-batch", type=int, metavar="N",
                   help="decode steps of different sessions batched together (default 16)")
    g.add_argument("--llm-splits", action=comma_list(int), nargs="*", metavar="K",
                   help="split layers served, built at start (default: any, built on first use)")
    g.add_argument("--llm-codecs", action=comma_list(), nargs="*", metavar="CODEC",
                   help="hidden-state codecs accepted (default: all)")


def build_config(args: argparse.Namespace) -> Any:
    """CloudConfig from --config and the flags (flags win)."""
    from tether.cloud.config import load_cloud_config
    return load_cloud_config(args.config, flag_overrides(args, CLOUD_FLAGS, _FLAG_UNITS))


def run_cloud(args: argparse.Namespace) -> int:
    config = build_config(args)      # validated: CloudConfig.__post_init__ runs on the merge
    config.require_model()
    if config.curve.enabled:         # fail fast, before the (slow) bundle loading
        from tether.cloud.curve import load_allowed_keys, load_server_keys
        load_server_keys(config.curve.secret_key)
        load_allowed_keys(config.curve.allowed_keys)
    import torch
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    return runner(_serve(config))


async def _serve(config: Any) -> int:
    from prometheus_client import CollectorRegistry

    from tether.cloud.bundles import ServedBundle
    from tether.cloud.server import CloudServer
    from tether.core.metrics import CloudMetrics

    bundles = [ServedBundle.load(d) for d in config.bundles]
    metrics = CloudMetrics(CollectorRegistry())
    compute = None
    if config.ray.enabled:
        compute, sessions = _ray_pool(config, metrics)
    else:
        sessions = build_llm_engine(config.llm)
    if sessions is not None and hasattr(sessions, "start"):
        await sessions.start()
    server = CloudServer(config, bundles, metrics, sessions, compute=compute)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    print(f"tether cloud ready on {server.endpoint}"
          + (f" metrics http://{config.metrics_host}:{server.metrics_port}/metrics"
             if server.metrics_port else ""), flush=True)
    await server.wait_stopped()
    if sessions is not None and hasattr(sessions, "close"):
        await sessions.close()
    return 0


def _ray_pool(config: Any, metrics: Any) -> tuple[Any, Any]:
    """The Ray pool (and its LLM session router when an LLM checkpoint is served)."""
    from tether.cloud.ray_pool import RayPool, RaySessions
    llm = None
    if config.llm.enabled:
        tokenizer = config.llm.tokenizer
        llm = {"llm_checkpoint": str(config.llm.checkpoint.resolve()),
               "llm_tokenizer": str(tokenizer.resolve()) if tokenizer else None,
               "llm_model_id": config.llm.name,
               "llm_engine": dataclasses.asdict(config.llm.engine_config())}
    pool = RayPool(config, metrics, llm)
    if llm is None:
        return pool, None
    info = build_llm_engine(config.llm).bundle       # what READY lists
    return pool, RaySessions(pool, info)


def run_ray_dispatcher(args: argparse.Namespace) -> int:
    """Internal: the Ray driver process of a `tether cloud --ray` front (ray_dispatch.py)."""
    from tether.cloud.ray_dispatch import dispatcher_main
    return dispatcher_main(args.endpoint, json.loads(args.settings))


def build_llm_engine(llm: Any) -> Any:
    """The LLM engine of a ``[llm]`` section (:class:`tether.cloud.config.CloudLLMConfig`);
    None when it names no checkpoint."""
    if not llm.enabled:
        return None
    from tether.cloud.llm import LLMEngine
    from tether.partitioner.llm import open_llm
    return LLMEngine(open_llm(llm.checkpoint, llm.tokenizer), llm.engine_config(), llm.name)


def run_keys_generate(args: argparse.Namespace) -> int:
    import zmq.auth

    from tether.core.errors import ConfigError
    existing = [p for p in (args.out / f"{args.name}.key", args.out / f"{args.name}.key_secret")
                if p.exists()]
    if existing and not args.force:
        raise ConfigError(f"{existing[0]} already exists: refusing to overwrite a key pair "
                          "(edges and clouds holding it would be locked out); pass --force to "
                          "replace it or --name for another pair")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(str(args.out), args.name)
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {args.out}: {exc}") from exc
    Path(secret).chmod(0o600)
    print(f"public key: {public}\nsecret key: {secret} (keep private)\n"
          "server: --curve-secret-key <server>.key_secret --curve-allowed-keys <dir of client .key>\n"
          "client: give it the server's .key and its own .key_secret")
    return 0
