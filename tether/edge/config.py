"""The edge agent's configuration: one frozen dataclass, loaded from TOML and validated at start.

TOML keys are the field names below (top level, or an ``[edge]`` table); CLI flags override
them through :func:`tether.core.config.with_overrides`. See ``configs/edge.example.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.core.config import component_table, from_mapping, load_toml
from tether.core.errors import ConfigError
from tether.core.types import Action

_ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
_FALLBACKS = ("full", "exit")


@dataclass(frozen=True)
class EdgeConfig:
    """Everything the edge agent daemon needs; defaults suit a laptop talking to a LAN cloud."""

    bundle: Path | None = None           # bundle directory (`tether partition ... --out DIR`)
    connect: str = ""                    # cloud endpoint, e.g. tcp://10.0.0.2:5555; "" = local only
    listen: str = "tcp://127.0.0.1:5560"  # local endpoint for applications
    edge_id: str = ""                    # name in records and metrics; "" = host-pid
    metrics_port: int | None = None      # Prometheus /metrics port; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"
    http_port: int | None = None         # HTTP/OpenAI front (POST /v1/infer, /v1/completions,
    #                                      /v1/chat/completions); None = off, 0 = any free port;
    #                                      needs the [http] extra (starlette, uvicorn)
    http_host: str = "127.0.0.1"
    http_max_body_bytes: int = 16 * 1024 * 1024   # larger uploads get 413
    action: str = "auto"                 # fixed policy action key ("split:layer2:int8", "local",
    #                                      "offload:fp32", "exit:layer1:fp16"); auto = smallest split
    policy: dict[str, Any] = field(default_factory=dict)   # [policy] table for tether.policies
    deadline_seconds: float = 1.0        # per-request deadline unless the application sends one
    fallback: str = "full"               # local answer on failure: "full" model or early "exit"
    fallback_reserve_seconds: float | None = None   # kept for the local answer; None = measured
    heartbeat_interval_seconds: float = 0.5
    heartbeat_timeout_seconds: float = 2.0   # no PONG for this long: the cloud is gone
    handshake_timeout_seconds: float = 0.5
    reconnect_min_seconds: float = 0.05
    reconnect_max_seconds: float = 1.0
    compute_threads: int = 1             # worker threads running ONNX heads and codecs; 0 =
    #                                      inline on the event loop (lowest latency for tiny
    #                                      models, but IO waits while a head runs)
    onnx_threads: int = 1                # intra-op threads per ONNX Runtime session
    max_inflight: int = 32               # requests processed concurrently
    queue_size: int = 256                # requests waiting; beyond it applications get BUSY
    records: Path | None = None          # per-request records file (.jsonl or .csv)
    curve_server_key: str = ""           # cloud's Z85 public key, or a path to its .key file
    curve_client_cert: Path | None = None   # this edge's secret certificate (.key_secret)
    drain_seconds: float = 5.0           # SIGTERM: how long in-flight requests may finish
    # split LLM on the same endpoint (PREFILL codec "text"), its cloud part at `connect`
    # over the same link (one socket, CURVE included)
    llm_checkpoint: Path | None = None   # llama2.c .bin or HF directory; None = DNN only
    llm_tokenizer: Path | None = None    # llama2.c tokenizer .bin (default: beside the checkpoint)
    llm_split: int | None = None         # edge keeps layers [0, K); None = half the layers
    llm_codec: str = "fp16"              # hidden-state codec on the wire
    llm_exit_head: Path | None = None    # trained exit head (`tether llm-exit`)
    llm_exit_threshold: float | None = None   # None: the exit head's calibrated one
    llm_timeout_seconds: float = 2.0     # per cloud step; then the exit head answers (or an ERROR)
    llm_first_step_timeout_seconds: float = 30.0   # cloud readiness + a session's first step
    llm_max_new_tokens: int = 1024       # cap on tokens per request

    def __post_init__(self) -> None:
        _check_endpoint("connect", self.connect, allow_empty=True)
        _check_endpoint("listen", self.listen, allow_empty=False)
        positive = ("deadline_seconds", "heartbeat_interval_seconds", "heartbeat_timeout_seconds",
                    "handshake_timeout_seconds", "reconnect_min_seconds", "reconnect_max_seconds",
                    "drain_seconds")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.compute_threads < 0:
            raise ConfigError(f"compute_threads must be >= 0, got {self.compute_threads}")
        for name in ("onnx_threads", "max_inflight", "queue_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ConfigError("reconnect_max_seconds must be >= reconnect_min_seconds")
        if self.fallback not in _FALLBACKS:
            raise ConfigError(f"fallback must be one of {list(_FALLBACKS)}, got {self.fallback!r}")
        if self.fallback_reserve_seconds is not None and self.fallback_reserve_seconds < 0:
            raise ConfigError("fallback_reserve_seconds must be >= 0 (or left out for 'measured')")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port must be in 0..65535, got {self.http_port}")
        if self.http_max_body_bytes < 1:
            raise ConfigError(f"http_max_body_bytes must be >= 1, got {self.http_max_body_bytes}")
        if self.action != "auto":
            try:
                Action.parse(self.action)
            except ValueError as exc:
                raise ConfigError(f"action {self.action!r} is invalid: {exc}; examples: "
                                  "'split:layer2:int8', 'local', 'offload:fp32'") from exc
        if self.records is not None and self.records.suffix not in (".jsonl", ".csv"):
            raise ConfigError(f"records must end in .jsonl or .csv, got {self.records}")
        self._check_llm()
        if bool(self.curve_server_key) != (self.curve_client_cert is not None):
            raise ConfigError("CURVE needs both curve_server_key and curve_client_cert "
                              "(create them with `tether keys generate`)")

    def _check_llm(self) -> None:
        if self.llm_checkpoint is None:
            return
        from tether.core.errors import TetherError
        from tether.partitioner.llm import make_hidden_codec
        try:
            make_hidden_codec(self.llm_codec)
        except TetherError as exc:
            raise ConfigError(f"llm_codec: {exc}") from exc
        if self.llm_split is not None and self.llm_split < 1:
            raise ConfigError(f"llm_split must be >= 1, got {self.llm_split}")
        if min(self.llm_timeout_seconds, self.llm_first_step_timeout_seconds) <= 0 \
                or self.llm_max_new_tokens < 1:
            raise ConfigError("llm_timeout_seconds must be > 0 and llm_max_new_tokens >= 1")


def _check_endpoint(name: str, value: str, allow_empty: bool) -> None:
    if not value and allow_empty:
        return
    if not value.startswith(_ENDPOINT_SCHEMES):
        raise ConfigError(f"{name} must be a ZeroMQ endpoint like tcp://127.0.0.1:5555 "
                          f"or ipc:///run/tether/edge.sock, got {value!r}")


def load_edge_config(path: str | Path | None = None, **overrides: Any) -> EdgeConfig:
    """Load the TOML file (keys at top level or in ``[edge]``) and apply non-None overrides."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        raw = load_toml(path)
        table, where = component_table(raw, "edge", path, siblings=("policy",))
        data = dict(table)
        if where and "policy" in raw:
            data.setdefault("policy", raw["policy"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(EdgeConfig, data, where=where)
