"""The cloud service's configuration: a frozen dataclass loaded from TOML (``[cloud]`` table
or top level), validated at start; CLI flags override through
:func:`tether.core.config.with_overrides`. See ``configs/cloud.example.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tether.core.config import component_table, from_mapping, load_toml
from tether.core.errors import ConfigError
from tether.core.protocol import Limits


@dataclass(frozen=True)
class RayConfig:
    """``[cloud.ray]``: run tails on a pool of Ray workers instead of threads of the front."""

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
    curve_secret_key: Path | None = None    # server .key_secret (tether keys generate)
    curve_allowed_keys: Path | None = None  # directory of allowed client .key files
    ray: RayConfig = RayConfig()            # [cloud.ray]: tails on a Ray pool (issue 12)

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
        if (self.curve_secret_key is None) != (self.curve_allowed_keys is None):
            raise ConfigError("curve_secret_key and curve_allowed_keys go together: set both "
                              "(see `tether keys generate`) or neither")

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes)


#: TOML spellings in the ``_seconds`` style of the edge config -> the field they set (the
#: ``_s`` names keep working; giving both is refused)
SECONDS_ALIASES = {"max_queue_delay_seconds": "max_queue_delay_s",
                   "drain_timeout_seconds": "drain_timeout_s",
                   "inline_compute_seconds": "inline_compute_s"}


def load_cloud_config(path: str | Path | None) -> CloudConfig:
    """CloudConfig from a TOML file (its ``[cloud]`` table if present), defaults if ``None``.

    Unknown keys and unknown sections (e.g. ``[policy]``: the cloud has no policy) are errors.
    """
    if path is None:
        return CloudConfig()
    table, where = component_table(load_toml(path), "cloud", path)
    return from_mapping(CloudConfig, _unalias(table, where), where=where)


def _unalias(table: dict, where: str) -> dict:
    table = dict(table)
    for alias, name in SECONDS_ALIASES.items():
        if alias in table:
            if name in table:
                raise ConfigError(f"{where + '.' if where else ''}{alias} and {name} set the "
                                  f"same value: keep only {alias}")
            table[name] = table.pop(alias)
    return table
