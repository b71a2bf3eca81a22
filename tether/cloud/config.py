"""The cloud daemon's configuration: frozen dataclasses loaded from TOML, validated at start.

One file configures one cloud, serving DNN bundles, a split LLM's cloud part or both. The
daemon's own keys sit at the top level or in ``[cloud]``; its parts are nested tables beside it
(or inside it, ``[cloud.llm]``)::

    [cloud]   bundles, bind, metrics, batching, queue bounds, threads, drain ...
    [llm]     the LLM: checkpoint, tokenizer and every engine knob (tether.cloud.llm.LLMEngineConfig)
    [curve]   CurveZMQ: the server's secret key and the allowed client keys
    [ray]     tails (and LLM sessions) on a pool of Ray workers

:func:`load_cloud_config` reads the file and applies the entry point's overrides (dotted field
paths, see :data:`tether.commands.cloud.CLOUD_FLAGS`). See ``configs/cloud.example.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tether.core.config import load_daemon_config, refuse_settings_without
from tether.core.errors import ConfigError
from tether.core.protocol import Limits


@dataclass(frozen=True)
class RayConfig:
    """``[ray]``: run tails on a pool of Ray workers instead of threads of the front."""

    address: str = ""                       # "": no Ray; "auto": this machine's / a new local
    tail_workers: int = 2                   # cluster; else the head's host:port
    worker_cpus: float = 1.0                # Ray resources reserved per worker
    worker_gpus: float = 0.0
    worker_queue: int = 2                   # batches in flight per worker (running + waiting)
    device: str = "auto"                    # "auto": CUDA when worker_gpus > 0 and present
    torch_threads: int = 0                  # intra-op threads per worker; 0: worker_cpus
    batch_timeout_s: float = 60.0           # a batch unanswered this long: ERROR, worker retired
    start_timeout_s: float = 120.0          # connect + place + load the tails
    resources: tuple[str, ...] = ()         # custom Ray resources each worker needs (one unit/100)
    max_restarts_per_minute: int = 30       # replacement budget (a crash-looping worker stops)

    def __post_init__(self) -> None:
        if self.tail_workers < 1 or self.worker_queue < 1:
            raise ConfigError("ray.tail_workers and ray.worker_queue must be at least 1")
        if self.worker_cpus < 0 or self.worker_gpus < 0 or self.torch_threads < 0:
            raise ConfigError("ray.worker_cpus, ray.worker_gpus, ray.torch_threads must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"ray.device: {self.device!r} is not one of auto, cpu, cuda")
        if self.batch_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ConfigError("ray.batch_timeout_s and ray.start_timeout_s must be positive")

    @property
    def enabled(self) -> bool:
        return bool(self.address)


@dataclass(frozen=True)
class CloudLLMConfig:
    """``[llm]``: serve layers [k, L) of a split LLM (sessions with a KV cache each, batched
    decode). Without ``checkpoint`` the cloud serves no LLM. The other keys are the engine's
    (:class:`tether.cloud.llm.LLMEngineConfig`, one to one: :meth:`engine_config`)."""

    checkpoint: Path | None = None          # llama2.c .bin or HF model directory
    tokenizer: Path | None = None           # llama2.c tokenizer .bin (default: beside it)
    model_id: str = ""                      # name edges see in READY; "": the checkpoint's stem
    max_sessions: int = 64                  # concurrent sessions (KV caches)
    max_kv_bytes: int = 256 * 1024 * 1024   # all sessions' KV caches; LRU sessions evicted
    max_session_tokens: int = 0             # 0: the model's max_position_embeddings
    idle_timeout_s: float = 120.0           # an idle session's KV cache is freed after this
    max_batch: int = 16                     # decode steps of different sessions per forward
    max_queue: int = 256                    # session steps admitted, not answered; beyond: BUSY
    splits: tuple[int, ...] = ()            # split layers served (preloaded); empty: any, lazily
    codecs: tuple[str, ...] = ()            # hidden-state codecs accepted; empty: all

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            refuse_settings_without(self, "checkpoint", "llm", "--llm-checkpoint")
            return
        try:
            self.engine_config()            # the engine's own checks, at start
        except ConfigError as exc:
            raise ConfigError(f"llm: {exc}") from exc

    @property
    def enabled(self) -> bool:
        return self.checkpoint is not None

    @property
    def name(self) -> str:
        return self.model_id or (self.checkpoint.stem if self.checkpoint else "llm")

    def engine_config(self) -> Any:
        """The :class:`~tether.cloud.llm.LLMEngineConfig` of these settings."""
        from tether.cloud.llm import LLMEngineConfig
        return LLMEngineConfig(**{f.name: getattr(self, f.name) for f in fields(LLMEngineConfig)})


@dataclass(frozen=True)
class CloudCurveConfig:
    """``[curve]``: CurveZMQ (both keys, or neither: then anyone reaching the port is served)."""

    secret_key: Path | None = None          # server .key_secret (tether keys generate)
    allowed_keys: Path | None = None        # directory of allowed client .key files

    def __post_init__(self) -> None:
        if (self.secret_key is None) != (self.allowed_keys is None):
            raise ConfigError("curve.secret_key and curve.allowed_keys go together: set both "
                              "(see `tether keys generate`) or neither")

    @property
    def enabled(self) -> bool:
        return self.secret_key is not None


@dataclass(frozen=True)
class CloudConfig:
    """Everything ``tether cloud`` needs. Times in seconds."""

    bundles: tuple[Path, ...] = ()
    bind: str = "tcp://127.0.0.1:5555"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None         # None: no HTTP endpoint; 0: a free port
    server_id: str = ""                     # default: hostname:pid
    max_batch_size: int = 16                # requests per tail execution
    max_queue_delay_s: float = 0.0          # how long a partial batch may wait (0: Triton default)
    max_queue: int = 256                    # queued requests, all groups; beyond: BUSY
    max_queue_bytes: int = 256 * 1024 * 1024  # their payload bytes; beyond: BUSY (memory bound)
    max_request_samples: int = 64           # batch dimension of one request
    workers: int = 1                        # compute threads running tails
    inline_compute_s: float = 0.001         # batches measured faster than this skip the thread
    torch_threads: int = 1                  # torch intra-op threads; 0: torch default (every
                                            # core: collapses under concurrent load)
    max_message_bytes: int = 64 * 1024 * 1024
    drain_timeout_s: float = 10.0           # SIGTERM: finish queued work for at most this
    preload: bool = True                    # build every tail at start
    llm: CloudLLMConfig = CloudLLMConfig()  # [llm]: a split LLM's cloud part
    curve: CloudCurveConfig = CloudCurveConfig()   # [curve]: CurveZMQ
    ray: RayConfig = RayConfig()            # [ray]: tails on a Ray pool (issue 12)

    def __post_init__(self) -> None:
        if not self.bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"bind: {self.bind!r} is not a ZeroMQ endpoint like tcp://0.0.0.0:5555")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: {self.metrics_port} is not a port number (0..65535)")
        for key in ("max_batch_size", "max_queue", "max_queue_bytes", "max_request_samples",
                    "workers", "max_message_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("max_queue_delay_s", "drain_timeout_s", "inline_compute_s"):
            if not 0 <= getattr(self, key) <= 3600:
                raise ConfigError(f"{key}: must be between 0 and 3600 seconds")
        if self.torch_threads < 0:
            raise ConfigError("torch_threads: must be 0 (torch default) or positive")

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes)

    def require_model(self) -> None:
        """Refuse (one line) a cloud that would serve nothing: neither bundle nor LLM."""
        if not self.bundles and not self.llm.enabled:
            raise ConfigError("no bundle to serve: pass --bundle DIR (or `bundles` in the "
                              "config) and/or --llm-checkpoint PATH ([llm] checkpoint)")


#: TOML spellings in the ``_seconds`` style of the edge config -> the field they set, in any
#: table (the ``_s`` names keep working; giving both is refused)
SECONDS_ALIASES = {"max_queue_delay_seconds": "max_queue_delay_s",
                   "drain_timeout_seconds": "drain_timeout_s",
                   "inline_compute_seconds": "inline_compute_s",
                   "idle_timeout_seconds": "idle_timeout_s",
                   "batch_timeout_seconds": "batch_timeout_s",
                   "start_timeout_seconds": "start_timeout_s"}

#: keys of the flat layout -> where they live now (an old file is refused with the fix)
MOVED_KEYS = {"curve_secret_key": "curve.secret_key", "curve_allowed_keys": "curve.allowed_keys"}


def load_cloud_config(path: str | Path | None,
                      overrides: dict[str, Any] | None = None) -> CloudConfig:
    """CloudConfig from a TOML file (defaults without one), then the non-None ``overrides``
    (dotted field paths: ``{"llm.max_sessions": 8}``).

    Unknown keys and unknown sections (e.g. ``[policy]``: the cloud has no policy) are errors.
    """
    return load_daemon_config(CloudConfig, path, "cloud", overrides, moved=MOVED_KEYS,
                              aliases=SECONDS_ALIASES)
