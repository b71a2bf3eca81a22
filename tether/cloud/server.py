"""The cloud inference service on a ZeroMQ ROUTER socket (asyncio, uvloop at the entry point).

IO and compute are separate: the reader callback only decodes frames and hands messages to
:class:`~tether.cloud.core.CloudCore`; replies are encoded and sent from the event loop
when their futures resolve. The socket is driven by the event loop directly
(``loop.add_reader`` on ``ZMQ_FD``, non-blocking recv/send, the edge-triggered FD re-checked
after every send) rather than through ``zmq.asyncio``, whose per-message futures cost
about 45 % more per round trip on loopback (measured with bench/runtime_overhead.py's
machinery: 0.265 vs 0.187 ms median for a 1 KB echo; bare blocking pyzmq 0.177 ms). The ROUTER uses ``ROUTER_MANDATORY`` (a reply to a vanished
edge raises instead of vanishing silently; it is counted and dropped) and
``ROUTER_HANDOVER`` (a reconnecting edge with the same identity takes its place).
``MAXMSGSIZE`` drops a connection that sends one frame above ``max_message_bytes``
before it is buffered; messages whose frames add up to more get an ERROR.

Without CURVE the link must be trusted (a private network or a tunnel): anyone who can
reach the port can use the service. With ``curve_secret_key`` + ``curve_allowed_keys`` the
socket is a CurveZMQ server and a ZAP authenticator admits only the listed client keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any, Iterable

import zmq
import zmq.asyncio

from tether.cloud.bundles import ServedBundle
from tether.cloud.config import CloudConfig
from tether.cloud.core import CloudCore
from tether.cloud.sessions import SessionHandler
from tether.cloud.curve import AllowList, load_allowed_keys, load_server_keys
from tether.core.http import HealthServer
from tether.core import protocol as P
from tether.core.sockets import open_socket
from tether.core.errors import ConfigError, ProtocolError
from tether.core.metrics import CloudMetrics

log = logging.getLogger(__name__)
# plain ints: pyzmq's enum flags cost an Enum construction per operation on the hot path
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
_NOBLOCK_MORE = _NOBLOCK | int(zmq.SNDMORE)
_get_option = zmq.backend.Socket.get     # returns a plain int (the sugar wraps EVENTS in an Enum)
#: received frames smaller than this are handed to the protocol as bytes (its fast path);
#: larger ones stay zero-copy views of the zmq frame
_COPY_BELOW = P.ZERO_COPY_BYTES


class CloudServer:
    """``tether cloud``: serves bundles on ``config.bind`` until :meth:`stop`."""

    def __init__(self, config: CloudConfig, bundles: Iterable[ServedBundle],
                 metrics: CloudMetrics | None = None, sessions: SessionHandler | None = None,
                 context: zmq.Context | None = None, compute: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        # compute: executor.py; sessions: admitted and bounded by the core's SessionGate
        self.core = CloudCore(bundles, config, metrics, sessions, compute)
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._sock: zmq.Socket | None = None
        self._auth: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self._http: HealthServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._stop_task: asyncio.Future | None = None
        self._stop_lock = asyncio.Lock()
        self._peers: dict[bytes, float] = {}
        self._peers_pruned = 0.0
        self.endpoint = ""
        self.dropped_replies = 0

    # ---- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the keys, load tails, bind the socket and the HTTP endpoint, start serving."""
        curve = None
        if self.config.curve.enabled:    # every key file parsed before anything starts
            curve = (load_server_keys(self.config.curve.secret_key),
                     load_allowed_keys(self.config.curve.allowed_keys))
        await self.core.start()
        sock = open_socket(self._ctx, zmq.ROUTER, linger_ms=1000, ROUTER_MANDATORY=1,
                           ROUTER_HANDOVER=1, MAXMSGSIZE=self.config.max_message_bytes,
                           SNDHWM=10000, RCVHWM=10000)
        if curve is not None:
            await self._setup_curve(sock, *curve)
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"cannot bind {self.config.bind}: {exc} (is another service "
                              "using the port? pick another --bind)") from exc
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.metrics_port is not None and self.metrics is not None:
            self._http = HealthServer(self.metrics.registry, self._health)
            await self._http.start(self.config.metrics_host, self.config.metrics_port)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._on_readable)
        self._on_readable()
        served = ", ".join(f"{b.model_id}@{b.fingerprint[:12]} ({len(b.splits)} split points)"
                           for b in self.core.info())
        log.info("tether cloud %s serving %s on %s%s%s", self.core.server_id, served, self.endpoint,
                 f", metrics on http://{self.config.metrics_host}:{self.metrics_port}/metrics"
                 if self._http else "", " (CURVE)" if self.config.curve.enabled else " (no CURVE: trusted link only)")

    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http else None

    def request_stop(self) -> None:
        """Signal-safe: begin a graceful stop (SIGTERM handler)."""
        if not self._stopping:
            self._stopping = True
            self._stop_task = asyncio.ensure_future(self.stop())

    async def stop(self) -> None:
        """Stop accepting (BUSY "draining"), finish queued work, flush replies, close."""
        self._stopping = True
        async with self._stop_lock:          # a second caller waits for the first to finish
            if self._sock is not None:
                await self._shutdown()

    async def _shutdown(self) -> None:
        log.info("draining: %d requests in flight", self.core.inflight)
        drained = await self.core.drain(self.config.drain_timeout_s)
        if not drained:
            log.warning("drain timeout after %.1f s: %d requests unanswered",
                        self.config.drain_timeout_s, self.core.inflight)
        await asyncio.sleep(0)                   # let the last replies hit the socket
        self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        await self.core.close()                  # anything left is answered BUSY "draining"
        await asyncio.sleep(0)
        if self._http:
            await self._http.stop()
        self._sock.close(linger=1000)
        self._sock = None
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            self._ctx.term()
        log.info("tether cloud stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> "CloudServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def _health(self) -> tuple[bool, bool]:
        """(alive, ready) for /healthz and /readyz."""
        return self._sock is not None, self._sock is not None and self.core.accepting

    async def _setup_curve(self, sock: zmq.Socket, keys: tuple[bytes, bytes],
                           allowed: AllowList) -> None:
        from zmq.auth.asyncio import AsyncioAuthenticator
        # ZAP is per libzmq context: the authenticator shares ours through a shadow
        self._auth = AsyncioAuthenticator(zmq.asyncio.Context.shadow(self._ctx.underlying))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=allowed)
        sock.curve_publickey, sock.curve_secretkey = keys
        sock.curve_server = True

    # ---- IO -------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Receive everything the socket holds (bounded per call, then yield to the loop)."""
        self._drain_scheduled = False
        sock = self._sock
        if sock is None:
            return
        for _ in range(256):
            try:
                if not _get_option(sock, _EVENTS) & _POLLIN:
                    return
                frames = _recv_frames(sock)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EAGAIN:
                    log.warning("receive failed: %s", exc)
                return
            try:
                self._on_message(frames[0].bytes, [f.bytes if len(f) < _COPY_BELOW else f.buffer
                                                   for f in frames[1:]], time.perf_counter())
            except Exception:  # noqa: BLE001 - one bad message must not stop the service
                log.exception("failed to handle a message")
                self._send(frames[0].bytes, P.Error(P.peek_request_id(frames[1:]), "internal",
                                                    "the cloud failed on this message; see its log"))
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _on_message(self, peer: bytes, frames: list[Any], received: float) -> None:
        size = sum(map(len, frames))
        self._touch(peer, received)
        if self.metrics:
            self.metrics.observe_bytes(received=size)
        try:
            msg = P.decode(frames, self.config.limits)
        except ProtocolError as exc:
            self._send(peer, P.Error.from_exception(P.peek_request_id(frames), exc))
            if self.metrics:
                self.metrics.errors.labels(exc.code).inc()
            return
        if self._stopping and isinstance(msg, (P.Infer, P.Prefill, P.Decode)):
            self._send(peer, P.Busy(msg.request_id, "draining", self.core.queue_depth))
            return
        # an admitted INFER is answered through the hook, a refused one at once
        on_reply = partial(self._send, peer) if type(msg) is P.Infer else None
        future = self.core.handle(msg, received, size, on_reply)
        if future.done():
            self._send(peer, future.result())
        elif on_reply is None:
            future.add_done_callback(partial(self._reply, peer))

    def _reply(self, peer: bytes, future: asyncio.Future) -> None:
        self._send(peer, future.result())

    def _touch(self, peer: bytes, now: float) -> None:
        """Track edges heard from in the last minute (identities change on reconnect)."""
        self._peers[peer] = now
        if now - self._peers_pruned > 5.0 or len(self._peers) > 4096:
            self._peers = {p: t for p, t in self._peers.items() if now - t < 60.0}
            self._peers_pruned = now
            if self.metrics:
                self.metrics.peers.set(len(self._peers))

    def _send(self, peer: bytes, reply: Any) -> None:
        sock = self._sock
        if sock is None:
            self.dropped_replies += 1
            return
        frames = P.encode(reply)
        try:       # frame by frame with int flags: send_multipart builds an Enum per frame
            sock.send(peer, _NOBLOCK_MORE)
            for frame in frames[:-1]:
                sock.send(frame, _NOBLOCK_MORE, copy=False)
            sock.send(frames[-1], _NOBLOCK, copy=False)
        except zmq.ZMQError as exc:     # EHOSTUNREACH: the edge left; EAGAIN: it stopped reading
            self.dropped_replies += 1
            log.debug("reply to %r dropped: %s", peer, exc)
        else:
            if self.metrics:
                self.metrics.observe_bytes(sent=P.wire_size(frames))
        # a send can consume the edge-triggered FD's read event: look now, drain if readable
        if not self._drain_scheduled and _get_option(sock, _EVENTS) & _POLLIN:
            self._schedule_drain()


def _recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """One multipart message, zero-copy frames (``recv_multipart`` without its per-frame
    Enum flags and RCVMORE queries: a frame knows whether more follow)."""
    frames = [sock.recv(_NOBLOCK, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(_NOBLOCK, copy=False))
    return frames


async def serve(config: CloudConfig, bundles: list[ServedBundle], metrics: CloudMetrics,
                sessions: SessionHandler | None = None) -> CloudServer:
    """Start a server and return it (the caller installs signal handlers and waits)."""
    server = CloudServer(config, bundles, metrics, sessions)
    await server.start()
    return server
