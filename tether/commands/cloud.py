"""`tether cloud` (the cloud inference service) and `tether keys generate` (CurveZMQ keys)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger("tether.cloud")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("cloud", help="serve tails of one or more bundles over ZeroMQ",
                       description="Cloud inference service: tails for many edges, dynamic "
                       "batching, Prometheus /metrics, /healthz, /readyz. SIGTERM drains and exits.")
    p.add_argument("--bundle", action="append", type=Path, metavar="DIR",
                   help="bundle directory from `tether partition` (repeatable)")
    p.add_argument("--bind", help="ZeroMQ endpoint, e.g. tcp://0.0.0.0:5555 "
                                  "(default: tcp://127.0.0.1:5555, from the config)")
    p.add_argument("--metrics-port", type=int, help="HTTP port for /metrics and probes (0: any)")
    p.add_argument("--metrics-host", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--config", type=Path, help="TOML config ([cloud] table); flags override it")
    p.add_argument("--max-batch-size", type=int,
                   help="requests per tail execution (default: 16, from the config)")
    p.add_argument("--max-queue-delay-ms", type=float, help="how long a partial batch may wait")
    p.add_argument("--max-queue", type=int, help="queued requests before answering BUSY")
    p.add_argument("--workers", type=int, help="compute threads (default: 1, from the config)")
    p.add_argument("--torch-threads", type=int,
                   help="torch intra-op threads; 0: torch's default, every core, which "
                        "collapses under concurrent load (default: 1, from the config)")
    p.add_argument("--curve-secret-key", type=Path, help="server .key_secret (enables CURVE)")
    p.add_argument("--curve-allowed-keys", type=Path, help="directory of allowed client .key files")
    p.add_argument("--llm-checkpoint", type=Path, metavar="BIN",
                   help="also serve split-LLM sessions (PREFILL/DECODE/CLOSE) of this llama2.c "
                        "checkpoint, as `tether llm-serve` does")
    p.add_argument("--llm-tokenizer", type=Path, metavar="BIN", help="tokenizer of --llm-checkpoint")
    ray = p.add_argument_group("Ray pool (pip install 'tether[ray]')")
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


def build_config(args: argparse.Namespace) -> Any:
    """CloudConfig from --config and the flags (flags win)."""
    from tether.cloud.config import load_cloud_config
    from tether.core.config import with_overrides
    config = load_cloud_config(args.config)
    delay = None if args.max_queue_delay_ms is None else args.max_queue_delay_ms / 1000.0
    ray = with_overrides(config.ray, address=args.ray, tail_workers=args.tail_workers,
                         worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus)
    if ray is not config.ray:
        config = dataclasses.replace(config, ray=ray)
    return with_overrides(
        config, bundles=tuple(args.bundle) if args.bundle else None, bind=args.bind,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        max_batch_size=args.max_batch_size, max_queue_delay_s=delay, max_queue=args.max_queue,
        workers=args.workers, torch_threads=args.torch_threads,
        curve_secret_key=args.curve_secret_key, curve_allowed_keys=args.curve_allowed_keys)


def run_cloud(args: argparse.Namespace) -> int:
    from tether.core.errors import ConfigError
    config = build_config(args)      # validated: CloudConfig.__post_init__ runs on the merge
    if not config.bundles and args.llm_checkpoint is None:
        raise ConfigError("no bundle to serve: pass --bundle DIR (or `bundles` in the config)")
    if config.curve:                 # fail fast, before the (slow) bundle loading
        from tether.cloud.curve import load_allowed_keys, load_server_keys
        load_server_keys(config.curve_secret_key)
        load_allowed_keys(config.curve_allowed_keys)
    import torch
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    return runner(_serve(config, args))


async def _serve(config: Any, args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from tether.cloud.bundles import ServedBundle
    from tether.cloud.server import CloudServer
    from tether.core.metrics import CloudMetrics

    bundles = [ServedBundle.load(d) for d in config.bundles]
    metrics = CloudMetrics(CollectorRegistry())
    compute = None
    if config.ray.enabled:
        compute, sessions = _ray_pool(config, metrics, args)
    else:
        sessions = _llm_engine(args.llm_checkpoint, args.llm_tokenizer)
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


def _ray_pool(config: Any, metrics: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """The Ray pool (and its LLM session router when an LLM checkpoint is served)."""
    from tether.cloud.ray_pool import RayPool, RaySessions
    llm = None
    if args.llm_checkpoint is not None:
        llm = {"llm_checkpoint": str(args.llm_checkpoint.resolve()),
               "llm_tokenizer": str(args.llm_tokenizer.resolve()) if args.llm_tokenizer else None,
               "llm_model_id": args.llm_checkpoint.stem}
    pool = RayPool(config, metrics, llm)
    if llm is None:
        return pool, None
    info = _llm_engine(args.llm_checkpoint, args.llm_tokenizer).bundle   # what READY lists
    return pool, RaySessions(pool, info)


def run_ray_dispatcher(args: argparse.Namespace) -> int:
    """Internal: the Ray driver process of a `tether cloud --ray` front (ray_dispatch.py)."""
    from tether.cloud.ray_dispatch import dispatcher_main
    return dispatcher_main(args.endpoint, json.loads(args.settings))


def _llm_engine(checkpoint: Path | None, tokenizer: Path | None) -> Any:
    if checkpoint is None:
        return None
    from tether.cloud.llm import LLMEngine
    from tether.partitioner.llm import open_llm
    return LLMEngine(open_llm(checkpoint, tokenizer), model_id=checkpoint.stem)


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
