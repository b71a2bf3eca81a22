"""Every Prometheus metric of tether, defined on an injected registry (never the global one).

Components never touch prometheus_client themselves: they hand plain stats records to
these classes (the cloud: :class:`CloudRequestStats` / :class:`BatchStats`; the edge:
:class:`tether.core.types.RequestRecord`). Names carry their unit (``_seconds``, ``_bytes``,
``_total``).

    registry = CollectorRegistry()
    cloud = CloudMetrics(registry)      tether_cloud_*
    edge = EdgeMetrics(registry)        tether_edge_*
    text = render(registry)             Prometheus text exposition (bytes)

Labels stay bounded: model, split and codec come from the served bundles, outcome/reason/
source from fixed sets. ``*_created`` series are disabled (they double every counter's
series and dashboards never use them).

Per-request records are queued (one list append on the request's path) and applied to
the Prometheus series in bulk when the registry is collected (a scrape, ``render``,
``get_sample_value``) or every :data:`FLUSH_EVERY` records: the series read the same, the
request path pays a fraction of the lock-and-bucket work.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

from tether.core.types import Action, RequestRecord

disable_created_metrics()

#: Latency buckets from 100 us to 10 s.
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
#: Queued records are applied at the latest after this many (bounded memory).
FLUSH_EVERY = 1024


class _Deferred:
    """Records queued on the request path, applied to the series by :meth:`flush`, which a
    collector registered ahead of the series runs on every collection of the registry."""

    def _defer_to(self, registry: CollectorRegistry) -> None:
        self._pending: list[tuple[Callable[[Any], None], Any]] = []
        registry.register(_FlushFirst(self.flush))

    def _queue(self, apply: Callable[[Any], None], record: Any) -> None:
        pending = self._pending
        pending.append((apply, record))
        if len(pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Apply every queued record now (thread-safe: each caller takes its own list)."""
        pending, self._pending = self._pending, []
        for apply, record in pending:
            apply(record)


class _FlushFirst:
    """A collector without series: collecting it applies the queued records."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self._flush()
        return []


@dataclass(frozen=True)
class CloudRequestStats:
    """One request as the cloud saw it. ``outcome``: ok, busy, error."""

    model: str
    split: str
    codec: str
    outcome: str
    reason: str = ""            # busy reason or error code
    queue_seconds: float = 0.0
    decode_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class SessionStepStats:
    """One LLM session step as the cloud saw it. ``outcome``: ok, busy, error."""

    kind: str                   # prefill, decode, close
    outcome: str
    reason: str = ""            # busy reason or error code
    seconds: float = 0.0        # receipt to answer


@dataclass(frozen=True)
class BatchStats:
    """One tail execution over a batch of requests with the same (bundle, split, codec)."""

    model: str
    split: str
    size: int                   # requests in the batch
    samples: int                # rows (sum of the requests' batch dimensions)
    tail_seconds: float


class CloudMetrics(_Deferred):
    """The ``tether_cloud_*`` metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._defer_to(registry)          # first: a collection flushes before reading series
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        labels = ("model", "split", "codec")
        self.requests = Counter("tether_cloud_requests_total", "Requests by outcome (ok, busy, error)",
                                labels + ("outcome",), registry=registry)
        self.busy = Counter("tether_cloud_busy_total", "BUSY answers by reason",
                            ("reason",), registry=registry)
        self.errors = Counter("tether_cloud_errors_total", "ERROR answers by error code",
                              ("code",), registry=registry)
        self.expired = Counter("tether_cloud_deadline_expired_total",
                               "Requests dropped before compute: their deadline passed in the queue "
                               "(answered with a DEADLINE error)", ("model", "split"),
                               registry=registry)
        self.queue_depth = Gauge("tether_cloud_queue_depth", "Requests waiting for a tail",
                                 registry=registry)
        self.queue_bytes = Gauge("tether_cloud_queue_bytes", "Bytes of requests waiting for a tail",
                                 registry=registry)
        self.inflight = Gauge("tether_cloud_inflight_requests", "Requests accepted, not answered",
                              registry=registry)
        self.peers = Gauge("tether_cloud_active_edges", "Edges heard from in the last minute",
                           registry=registry)
        self.ready = Gauge("tether_cloud_ready", "1 while serving, 0 while starting or draining",
                           registry=registry)
        self.batch_size = Histogram("tether_cloud_batch_size", "Requests per tail execution",
                                    ("model", "split"), buckets=BATCH_BUCKETS, registry=registry)
        self.queue_seconds = Histogram("tether_cloud_queue_seconds", "Time from receipt to tail start",
                                       ("model", "split"), buckets=SECONDS_BUCKETS, registry=registry)
        self.decode_seconds = Histogram("tether_cloud_decode_seconds", "Codec decode time per request",
                                        labels, buckets=SECONDS_BUCKETS, registry=registry)
        self.tail_seconds = Histogram("tether_cloud_tail_seconds", "Tail compute time per batch",
                                      ("model", "split"), buckets=SECONDS_BUCKETS, registry=registry)
        self.bytes_in = Counter("tether_cloud_received_bytes_total", "Bytes of all frames received",
                                registry=registry)
        self.bytes_out = Counter("tether_cloud_sent_bytes_total", "Bytes of all frames sent",
                                 registry=registry)
        self.llm_steps = Counter("tether_cloud_llm_steps_total",
                                 "LLM session steps by kind (prefill, decode, close) and outcome "
                                 "(ok, busy, error)", ("kind", "outcome"), registry=registry)
        self.llm_step_seconds = Histogram("tether_cloud_llm_step_seconds",
                                          "Receipt to answer of an LLM session step", ("kind",),
                                          buckets=SECONDS_BUCKETS, registry=registry)
        self._worker_metrics(registry)

    def _worker_metrics(self, registry: CollectorRegistry) -> None:
        """Tail workers of a Ray pool (``tether cloud --ray``); ``worker`` is the slot (w0..)."""
        self.worker_batches = Counter("tether_cloud_worker_batches_total",
                                      "Batches run per tail worker", ("worker",), registry=registry)
        self.worker_busy_seconds = Counter("tether_cloud_worker_busy_seconds_total",
                                           "Seconds a tail worker spent on batches", ("worker",),
                                           registry=registry)
        self.worker_queue_depth = Gauge("tether_cloud_worker_queue_depth",
                                        "Batches handed to a tail worker, not answered",
                                        ("worker",), registry=registry)
        self.workers_live = Gauge("tether_cloud_workers_live", "Tail workers able to run batches",
                                  registry=registry)
        self.worker_restarts = Gauge("tether_cloud_worker_restarts",
                                     "Tail workers placed to replace lost ones, last minute",
                                     registry=registry)
        self.worker_lost = Counter("tether_cloud_worker_lost_total",
                                   "Tail workers found dead (batches re-run elsewhere)",
                                   ("worker",), registry=registry)
        self.worker_info = Gauge("tether_cloud_worker_info",
                                 "1 per live tail worker: its Ray node and process id",
                                 ("worker", "node", "pid"), registry=registry)

    def track_llm(self, sessions: Callable[[], float], kv_bytes: Callable[[], float],
                  queued: Callable[[], float] | None = None) -> None:
        """Read the open LLM sessions, their KV-cache bytes and the session steps admitted
        but not answered at scrape time."""
        Gauge("tether_cloud_llm_sessions", "Open LLM sessions (admitted, not closed)",
              registry=self.registry).set_function(sessions)
        Gauge("tether_cloud_llm_kv_cache_bytes", "Bytes of all sessions' KV caches",
              registry=self.registry).set_function(kv_bytes)
        if queued is not None:
            Gauge("tether_cloud_llm_step_queue_depth",
                  "LLM session steps admitted, not answered (bounded: beyond it BUSY)",
                  registry=self.registry).set_function(queued)

    def observe_session_step(self, s: "SessionStepStats") -> None:
        """One PREFILL/DECODE/CLOSE answered (BUSY and ERROR counted by reason/code too)."""
        self._child(self.llm_steps, s.kind, s.outcome).inc()
        if s.outcome == "ok":
            self._child(self.llm_step_seconds, s.kind).observe(s.seconds)
        elif s.outcome == "busy":
            self._child(self.busy, s.reason or "queue_full").inc()
        else:
            self._child(self.errors, s.reason or "internal").inc()

    def track_queue(self, depth: Callable[[], float], nbytes: Callable[[], float],
                    inflight: Callable[[], float]) -> None:
        """Read queue depth, queued bytes and in-flight count at scrape time (no per-request cost)."""
        self.queue_depth.set_function(depth)
        self.queue_bytes.set_function(nbytes)
        self.inflight.set_function(inflight)

    def observe_request(self, s: CloudRequestStats) -> None:
        self._queue(self._apply_request, s)

    def _apply_request(self, s: CloudRequestStats) -> None:
        self._child(self.requests, s.model, s.split, s.codec, s.outcome).inc()
        if s.outcome == "busy":
            self._child(self.busy, s.reason or "queue_full").inc()
        elif s.outcome == "error":
            self._child(self.errors, s.reason or "internal").inc()
            if s.reason == "deadline":
                self._child(self.expired, s.model, s.split).inc()
        else:
            self._child(self.queue_seconds, s.model, s.split).observe(s.queue_seconds)
            self._child(self.decode_seconds, s.model, s.split, s.codec).observe(s.decode_seconds)

    def observe_batch(self, b: BatchStats) -> None:
        self._queue(self._apply_batch, b)

    def _apply_batch(self, b: BatchStats) -> None:
        self._child(self.batch_size, b.model, b.split).observe(b.size)
        self._child(self.tail_seconds, b.model, b.split).observe(b.tail_seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the hot path pays one dict lookup."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_bytes(self, received: int = 0, sent: int = 0) -> None:
        self._queue(self._apply_bytes, (received, sent))

    def _apply_bytes(self, sizes: tuple[int, int]) -> None:
        received, sent = sizes
        if received:
            self.bytes_in.inc(received)
        if sent:
            self.bytes_out.inc(sent)


class EdgeMetrics(_Deferred):
    """The ``tether_edge_*`` metrics, fed with the edge's :class:`RequestRecord` per request."""

    STAGES = ("head", "encode", "network", "cloud_queue", "cloud_decode", "tail", "local", "total")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._defer_to(registry)          # first: a collection flushes before reading series
        self.requests = Counter("tether_edge_requests_total", "Requests by action kind and outcome",
                                ("action", "outcome"), registry=registry)
        self.fallbacks = Counter("tether_edge_fallbacks_total", "Local fallbacks by reason",
                                 ("reason",), registry=registry)
        self.stage_seconds = Histogram("tether_edge_stage_seconds",
                                       "Per-request time by stage (head, encode, network, ...)",
                                       ("stage",), buckets=SECONDS_BUCKETS, registry=registry)
        self.request_seconds = Histogram("tether_edge_request_seconds", "End-to-end request latency",
                                         ("outcome",), buckets=SECONDS_BUCKETS, registry=registry)
        self.bytes_sent = Counter("tether_edge_sent_bytes_total", "Bytes of all frames sent",
                                  registry=registry)
        self.bytes_received = Counter("tether_edge_received_bytes_total",
                                      "Bytes of all frames received", registry=registry)
        self.request_bytes = Histogram("tether_edge_request_sent_bytes", "Bytes sent per request",
                                       buckets=BYTES_BUCKETS, registry=registry)
        self.rtt_seconds = Histogram("tether_edge_rtt_seconds", "Heartbeat PING/PONG round trips",
                                     buckets=SECONDS_BUCKETS, registry=registry)
        self.cloud_ready = Gauge("tether_edge_cloud_ready", "1 while the cloud link is ready",
                                 registry=registry)
        self.reconnects = Counter("tether_edge_reconnects_total",
                                  "Cloud handshakes after the first one (the link came back)",
                                  registry=registry)
        self.inflight = Gauge("tether_edge_inflight_requests", "Requests being served",
                              registry=registry)
        self.actions = Counter("tether_edge_actions_total",
                               "Actions the policy chose, by kind, split point and codec",
                               ("kind", "split", "codec"), registry=registry)
        self.bandwidth_estimate = Gauge("tether_edge_policy_bandwidth_bytes_per_second",
                                        "The policy's uplink throughput estimate (absent "
                                        "while the policy has none)", ("policy",),
                                        registry=registry)
        self.rtt_estimate = Gauge("tether_edge_policy_rtt_seconds",
                                  "Round-trip estimate: the policy's (policy=NAME) and the last "
                                  "heartbeat RTT (policy=\"heartbeat\")", ("policy",),
                                  registry=registry)
        self.races = Counter("tether_edge_races_total",
                             "Local answers started against a reply still awaited (an overdue "
                             "offload or a hedged probe), by the answer that came first (cloud: "
                             "the local run was stopped; local: the reply came later or never)",
                             ("winner",), registry=registry)
        self.link_messages = Counter("tether_edge_link_messages_total",
                                     "Requests on the cloud link by message kind (infer, prefill, "
                                     "decode, close, ping) and outcome (ok or error code)",
                                     ("kind", "outcome"), registry=registry)
        self.link_seconds = Histogram("tether_edge_link_round_trip_seconds",
                                      "Send to answer on the cloud link, by message kind",
                                      ("kind",), buckets=SECONDS_BUCKETS, registry=registry)
        self.link_bytes = Counter("tether_edge_link_bytes_total",
                                  "Bytes on the cloud link by message kind and direction "
                                  "(sent, received)", ("kind", "direction"), registry=registry)
        self.llm = LLMMetrics(registry)

    def observe_link_message(self, kind: str, outcome: str, seconds: float, sent: int,
                             received: int) -> None:
        """One request on the cloud link (the link's message callback)."""
        self.link_messages.labels(kind, outcome).inc()
        if outcome == "ok":
            self.link_seconds.labels(kind).observe(seconds)
        if sent:
            self.link_bytes.labels(kind, "sent").inc(sent)
        if received:
            self.link_bytes.labels(kind, "received").inc(received)

    def observe(self, r: RequestRecord) -> None:
        """Record one finished request."""
        self._queue(self._apply, r)

    def observe_race(self, winner: str) -> None:
        """A local answer raced a late reply; ``winner``: ``cloud`` or ``local``."""
        self._queue(self._apply_race, winner)

    def _apply_race(self, winner: str) -> None:
        self.races.labels(winner).inc()

    def _apply(self, r: RequestRecord) -> None:
        kind, split, codec = _action_labels(r.action)
        self.requests.labels(kind, r.outcome).inc()
        self.actions.labels(kind, split, codec).inc()
        if r.fallback_reason:
            self.fallbacks.labels(r.fallback_reason).inc()
        for stage in self.STAGES:
            value = getattr(r, f"{stage}_seconds")
            if value > 0 or stage == "total":
                self.stage_seconds.labels(stage).observe(value)
        self.request_seconds.labels(r.outcome).observe(r.total_seconds)
        if r.bytes_sent:
            self.bytes_sent.inc(r.bytes_sent)
            self.request_bytes.observe(r.bytes_sent)
        if r.bytes_received:
            self.bytes_received.inc(r.bytes_received)

    def observe_rtt(self, seconds: float) -> None:
        self.rtt_seconds.observe(seconds)
        self.rtt_estimate.labels("heartbeat").set(seconds)

    def observe_estimates(self, policy: str, bandwidth_bytes_per_second: float | None,
                          rtt_seconds: float | None) -> None:
        """The policy's current estimates; None leaves a series absent (a fixed policy
        estimates nothing)."""
        if bandwidth_bytes_per_second is not None:
            self.bandwidth_estimate.labels(policy).set(bandwidth_bytes_per_second)
        if rtt_seconds is not None:
            self.rtt_estimate.labels(policy).set(rtt_seconds)


class LLMMetrics:
    """The ``tether_edge_llm_*`` metrics: generated tokens, time to first token, streams."""

    SOURCES = ("cloud", "exit", "local")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter("tether_edge_llm_tokens_total",
                              "Generated tokens by source (cloud, exit, local)", ("source",),
                              registry=registry)
        self.ttft = Histogram("tether_edge_llm_time_to_first_token_seconds",
                              "Prompt received to first token out", buckets=SECONDS_BUCKETS,
                              registry=registry)
        self.token_seconds = Histogram("tether_edge_llm_token_seconds",
                                       "Edge wall time per generated token",
                                       buckets=SECONDS_BUCKETS, registry=registry)
        self.streams = Gauge("tether_edge_llm_active_streams", "Generations in progress",
                             registry=registry)
        self.generations = Counter("tether_edge_llm_generations_total",
                                   "Finished generations by outcome (ok, error)", ("outcome",),
                                   registry=registry)
        self._by_source = {s: self.tokens.labels(s) for s in self.SOURCES}

    def observe_token(self, source: str, seconds: float, since_start: float, first: bool) -> None:
        """One token: its source, its own time and (for the first) the time since the prompt."""
        (self._by_source.get(source) or self.tokens.labels(source)).inc()
        self.token_seconds.observe(seconds)
        if first:
            self.ttft.observe(since_start)

    def stream_started(self) -> None:
        self.streams.inc()

    def stream_finished(self, ok: bool) -> None:
        self.streams.dec()
        self.generations.labels("ok" if ok else "error").inc()


@lru_cache(maxsize=512)
def _action_labels(key: str) -> tuple[str, str, str]:
    """(kind, split, codec) of an action key (local: no split, no codec; offload: split "input")."""
    try:
        action = Action.parse(key)
    except ValueError:
        return key.split(":", 1)[0], "", ""
    kind = action.kind.value
    if kind == "local":
        return kind, "", ""
    return kind, str(action.split or "input"), str(action.codec)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (what ``/metrics`` serves)."""
    return generate_latest(registry)
