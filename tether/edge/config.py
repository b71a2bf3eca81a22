"""The edge daemon's configuration: frozen dataclasses, loaded from TOML and validated at start.

One file configures one edge, serving a DNN bundle, a split LLM or both. The daemon's own keys
sit at the top level or in ``[edge]``; its parts are nested tables beside it (or inside it,
``[edge.llm]``)::

    [edge]    bundle, listen, action, deadline_seconds, fallback, threads, queue, records ...
    [link]    the cloud: connect endpoint, heartbeats, handshake, reconnect backoff
    [curve]   CurveZMQ keys for the link
    [llm]     a split LLM's edge part: checkpoint, split, codec, exit head, timeouts
    [http]    the HTTP / OpenAI-compatible front
    [policy]  an adaptive policy (tether.policies.PolicyConfig) instead of the fixed action

:func:`load_edge_config` reads the file and applies the entry point's overrides (dotted field
paths, see :data:`tether.commands.edge.EDGE_FLAGS`). See ``configs/edge.example.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tether.core.config import load_daemon_config, refuse_settings_without
from tether.core.errors import ConfigError
from tether.core.types import Action

_ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
_FALLBACKS = ("full", "exit")


def _check_endpoint(name: str, value: str, allow_empty: bool) -> None:
    if not value and allow_empty:
        return
    if not value.startswith(_ENDPOINT_SCHEMES):
        raise ConfigError(f"{name} must be a ZeroMQ endpoint like tcp://127.0.0.1:5555 "
                          f"or ipc:///run/tether/edge.sock, got {value!r}")


@dataclass(frozen=True)
class EdgeLinkConfig:
    """``[link]``: the cloud this edge offloads to (images and LLM sessions) and its timing."""

    connect: str = ""                    # cloud endpoint, e.g. tcp://10.0.0.2:5555; "" = local only
    heartbeat_interval_seconds: float = 0.5
    heartbeat_timeout_seconds: float = 2.0   # no PONG for this long: the cloud is gone
    handshake_timeout_seconds: float = 0.5
    reconnect_min_seconds: float = 0.05
    reconnect_max_seconds: float = 1.0

    def __post_init__(self) -> None:
        _check_endpoint("link.connect", self.connect, allow_empty=True)
        for f in fields(self):
            if f.name.endswith("_seconds") and getattr(self, f.name) <= 0:
                raise ConfigError(f"link.{f.name} must be > 0, got {getattr(self, f.name)}")
        if self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ConfigError("link.reconnect_max_seconds must be >= link.reconnect_min_seconds")


@dataclass(frozen=True)
class EdgeCurveConfig:
    """``[curve]``: CurveZMQ on the link (both keys, or neither: then the link must be trusted)."""

    server_key: str = ""                 # the cloud's Z85 public key, or a path to its .key file
    client_cert: Path | None = None      # this edge's secret certificate (.key_secret)

    def __post_init__(self) -> None:
        if bool(self.server_key) != (self.client_cert is not None):
            raise ConfigError("CURVE needs both curve.server_key and curve.client_cert "
                              "(create them with `tether keys generate`)")

    @property
    def enabled(self) -> bool:
        return self.client_cert is not None


@dataclass(frozen=True)
class EdgeLLMConfig:
    """``[llm]``: the edge part of a split LLM (layers [0, split)); its cloud part is served by
    the ``[link]`` cloud. Without ``checkpoint`` the edge serves no LLM."""

    checkpoint: Path | None = None       # llama2.c .bin or HF directory
    tokenizer: Path | None = None        # llama2.c tokenizer .bin (default: beside the checkpoint)
    split: int | None = None             # edge keeps layers [0, K); None = half the layers
    codec: str = "fp16"                  # hidden-state codec on the wire
    exit_head: Path | None = None        # trained exit head (`tether llm-exit`)
    exit_threshold: float | None = None  # None: the exit head's calibrated one
    timeout_seconds: float = 2.0         # per cloud step; then the exit head answers (or an ERROR)
    first_step_timeout_seconds: float = 30.0   # cloud readiness + a session's first step
    max_new_tokens: int = 1024           # cap on tokens per request

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            refuse_settings_without(self, "checkpoint", "llm", "--llm-checkpoint")
            return
        from tether.core.errors import TetherError
        from tether.codecs import hidden_codec
        try:
            hidden_codec(self.codec)
        except TetherError as exc:
            raise ConfigError(f"llm.codec: {exc}") from exc
        if self.split is not None and self.split < 1:
            raise ConfigError(f"llm.split must be >= 1, got {self.split}")
        if min(self.timeout_seconds, self.first_step_timeout_seconds) <= 0:
            raise ConfigError("llm.timeout_seconds and llm.first_step_timeout_seconds must be > 0")
        if self.max_new_tokens < 1:
            raise ConfigError(f"llm.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def enabled(self) -> bool:
        return self.checkpoint is not None

    @property
    def model_id(self) -> str:
        return self.checkpoint.stem if self.checkpoint is not None else "llm"


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: POST /v1/infer, OpenAI-style /v1/completions and /v1/chat/completions and
    the probes over HTTP (needs the [http] extra: starlette, uvicorn)."""

    port: int | None = None              # None = off, 0 = any free port
    host: str = "127.0.0.1"
    max_body_bytes: int = 16 * 1024 * 1024   # larger uploads get 413

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError(f"http.port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"http.max_body_bytes must be >= 1, got {self.max_body_bytes}")


@dataclass(frozen=True)
class EdgeConfig:
    """Everything the edge daemon needs; defaults suit a laptop talking to a LAN cloud."""

    bundle: Path | None = None           # DNN bundle directory (`tether partition ... --out DIR`);
    #                                      None: an LLM-only edge ([llm] needed)
    listen: str = "tcp://127.0.0.1:5560"  # local endpoint for applications
    edge_id: str = ""                    # name in records and metrics; "" = host-pid
    metrics_port: int | None = None      # Prometheus /metrics port; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"
    action: str = "auto"                 # fixed policy action key ("split:layer2:int8", "local",
    #                                      "offload:fp32", "exit:layer1:fp16"); auto = smallest split
    deadline_seconds: float = 1.0        # per-request deadline unless the application sends one
    fallback: str = "full"               # local answer on failure: "full" model or early "exit"
    fallback_reserve_seconds: float | None = None   # kept for the local answer; None = measured
    compute_threads: int = 1             # worker threads running ONNX heads and codecs; 0 =
    #                                      inline on the event loop (lowest latency for tiny
    #                                      models, but IO waits while a head runs)
    compute_nice: int = 10               # compute threads run this much nicer than the event
    #                                      loop (0-19; 0 = same priority): on a weak core the
    #                                      loop's receives, sends and replies go before compute
    onnx_threads: int = 1                # intra-op threads per ONNX Runtime session
    max_inflight: int = 32               # requests processed concurrently
    queue_size: int = 256                # requests waiting; beyond it applications get BUSY
    records: Path | None = None          # per-request records file (.jsonl or .csv)
    drain_seconds: float = 5.0           # SIGTERM: how long in-flight requests may finish
    link: EdgeLinkConfig = EdgeLinkConfig()
    curve: EdgeCurveConfig = EdgeCurveConfig()
    llm: EdgeLLMConfig = EdgeLLMConfig()
    http: HttpConfig = HttpConfig()
    policy: dict[str, Any] = field(default_factory=dict)   # [policy] table for tether.policies

    def __post_init__(self) -> None:
        _check_endpoint("listen", self.listen, allow_empty=False)
        for name in ("deadline_seconds", "drain_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.compute_threads < 0:
            raise ConfigError(f"compute_threads must be >= 0, got {self.compute_threads}")
        if not 0 <= self.compute_nice <= 19:
            raise ConfigError(f"compute_nice must be 0-19, got {self.compute_nice}")
        for name in ("onnx_threads", "max_inflight", "queue_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fallback not in _FALLBACKS:
            raise ConfigError(f"fallback must be one of {list(_FALLBACKS)}, got {self.fallback!r}")
        if self.fallback_reserve_seconds is not None and self.fallback_reserve_seconds < 0:
            raise ConfigError("fallback_reserve_seconds must be >= 0 (or left out for 'measured')")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.action != "auto":
            try:
                Action.parse(self.action)
            except ValueError as exc:
                raise ConfigError(f"action {self.action!r} is invalid: {exc}; examples: "
                                  "'split:layer2:int8', 'local', 'offload:fp32'") from exc
        if self.records is not None and self.records.suffix not in (".jsonl", ".csv"):
            raise ConfigError(f"records must end in .jsonl or .csv, got {self.records}")

    def require_model(self) -> None:
        """Refuse (one line) an edge that would serve nothing: neither bundle nor LLM."""
        if self.bundle is None and not self.llm.enabled:
            raise ConfigError("nothing to serve: pass --bundle DIR and/or --llm-checkpoint PATH "
                              "(or set bundle / [llm] checkpoint in the config)")


#: keys of the flat layout (before the nested tables) -> where they live now; an old file is
#: refused with this fix rather than half-read
MOVED_KEYS = {
    "connect": "link.connect",
    **{k: f"link.{k}" for k in ("heartbeat_interval_seconds", "heartbeat_timeout_seconds",
                                "handshake_timeout_seconds", "reconnect_min_seconds",
                                "reconnect_max_seconds")},
    "curve_server_key": "curve.server_key", "curve_client_cert": "curve.client_cert",
    **{f"llm_{k}": f"llm.{k}" for k in ("checkpoint", "tokenizer", "split", "codec", "exit_head",
                                         "exit_threshold", "timeout_seconds",
                                         "first_step_timeout_seconds", "max_new_tokens")},
    "http_port": "http.port", "http_host": "http.host", "http_max_body_bytes": "http.max_body_bytes",
}


def load_edge_config(path: str | Path | None = None,
                     overrides: dict[str, Any] | None = None) -> EdgeConfig:
    """EdgeConfig from the TOML file (defaults without one), then the non-None ``overrides``
    (dotted field paths: ``{"link.connect": "tcp://...", "deadline_seconds": 0.5}``)."""
    return load_daemon_config(EdgeConfig, path, "edge", overrides, moved=MOVED_KEYS)
