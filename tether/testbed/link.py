"""Userspace trace-driven link: a TCP relay that shapes each direction of a byte stream.

The edge connects to the relay's listening port; the relay connects to the real target
(the cloud) and moves bytes through one :class:`Pipe` per direction. A pipe is

    bounded queue  ->  trace-driven shaper  ->  delay line (propagation delay, loss)

* Rate: every tick (1 ms by default) the shaper earns ``trace.bytes_between(prev, now)``
  bytes of credit. With a mahimahi trace that is 1500 bytes per delivery opportunity, so
  the stream drains exactly at the trace's opportunities; credit earned while the queue
  is empty is lost, as in mahimahi (an idle link cannot bank opportunities).
* Queue: at most ``queue_bytes`` wait in a pipe; beyond that the relay stops reading the
  sender's socket (TCP back-pressure) instead of dropping, since a byte stream cannot lose
  bytes. Drop-tail behaviour therefore shows up as sender-side queueing, not as loss.
* Loss: each 1500-byte segment is lost with probability ``loss``. TCP repairs the loss,
  so the model charges one extra opportunity for the retransmission and holds that
  segment and everything behind it (head-of-line blocking) for ``rto_ms``.
* Outages: ``outages`` (start, duration) windows in trace seconds deliver nothing; traces
  can also carry outages themselves (zero-rate periods).
* Delay: delivered bytes wait ``delay_ms`` in a FIFO delay line before the relay writes
  them to the destination socket.

All pipes of a link share one trace clock that starts when the link starts (or at
``start_offset`` seconds into the trace). Several connections over the same link share
its queues, so they compete for the same bottleneck. Fidelity figures: docs/testbed.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from tether.core.errors import ConfigError, PeerUnavailableError

log = logging.getLogger(__name__)

SEGMENT = 1500
#: Kernel receive buffer of the relay's sockets: small, so that bytes wait in the pipe's
#: bounded queue (where they are shaped) rather than in hidden kernel buffers.
SOCKET_BUFFER = 32 * 1024


class RateTrace(Protocol):
    """What the link needs from a trace (``tether.core.traces.Trace`` provides it)."""

    def bytes_between(self, t0: float, t1: float) -> float: ...


@dataclass(frozen=True)
class LinkConfig:
    """Shaping parameters of one link (both directions share delay, loss and queue size)."""

    delay_ms: float = 0.0          # one-way propagation delay, each direction
    loss: float = 0.0              # probability that a 1500-byte segment is lost
    rto_ms: float = 200.0          # retransmission delay charged for a lost segment
    queue_bytes: int = 256 * 1024  # bound of each direction's queue
    tick_ms: float = 1.0           # shaper period while data is queued
    start_offset: float = 0.0      # trace seconds at which the link starts
    outages: tuple[tuple[float, float], ...] = ()   # (start_s, duration_s) in trace time
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.rto_ms < 0:
            raise ConfigError("link delay_ms and rto_ms must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"link loss must be in [0, 1), got {self.loss}")
        if self.queue_bytes < SEGMENT:
            raise ConfigError(f"link queue_bytes must be >= {SEGMENT}")
        if not 0.05 <= self.tick_ms <= 50:
            raise ConfigError("link tick_ms must be within [0.05, 50]")
        for start, dur in self.outages:
            if start < 0 or dur <= 0:
                raise ConfigError(f"bad outage ({start}, {dur}): need start >= 0, duration > 0")


class OutageTrace:
    """A trace with extra zero-capacity windows (trace seconds)."""

    def __init__(self, trace: RateTrace, outages: tuple[tuple[float, float], ...]) -> None:
        self.trace = trace
        self.outages = tuple(sorted(outages))

    def bytes_between(self, t0: float, t1: float) -> float:
        total = self.trace.bytes_between(t0, t1)
        for start, dur in self.outages:
            lo, hi = max(t0, start), min(t1, start + dur)
            if hi > lo:
                total -= self.trace.bytes_between(lo, hi)
        return max(total, 0.0)

    @property
    def name(self) -> str:
        return getattr(self.trace, "name", "trace")

    def transfer_time(self, t: float, nbytes: float) -> float:
        """Seconds from trace time ``t`` until ``nbytes`` are carried (to 0.1 ms; at most
        one hour, past which the trace is taken as stalled)."""
        lo, hi = 0.0, 3600.0
        if nbytes <= 0 or self.bytes_between(t, t + hi) < nbytes:
            return 0.0 if nbytes <= 0 else hi
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.bytes_between(t, t + mid) < nbytes else (lo, mid)
        return hi


class Pipe:
    """One direction of a link: bounded queue -> trace-driven shaper -> delay line."""

    def __init__(self, name: str, trace: RateTrace, cfg: LinkConfig,
                 clock: Callable[[], float], t0: float) -> None:
        self.name = name
        self.trace = OutageTrace(trace, cfg.outages) if cfg.outages else trace
        self.cfg = cfg
        self.clock = clock
        self.t0 = t0 - cfg.start_offset       # clock value at trace time 0
        self.rng = random.Random(f"{cfg.seed}:{name}")
        self.queue: deque[tuple[Any, bytes | None]] = deque()
        self.queued = 0
        self.inflight: deque[tuple[float, Any, bytes | None]] = deque()
        self.delivered: dict[int, int] = {}   # trace second -> bytes delivered
        self.lost_segments = 0
        self._credit = 0.0
        self._prev = clock()
        self._seg_fill = 0
        self._last_due = 0.0
        self._paused: set[Any] = set()
        self._has_data = asyncio.Event()
        self._has_inflight = asyncio.Event()

    # -- input side -----------------------------------------------------------------
    def push(self, sink: Any, data: bytes, source: Any = None) -> None:
        """Queue ``data`` for ``sink``; pause ``source`` when the queue is full."""
        if not self.queue:
            self._prev = self.clock()
            self._has_data.set()
        self.queue.append((sink, data))
        self.queued += len(data)
        if source is not None and self.queued >= self.cfg.queue_bytes:
            source.pause_reading()
            self._paused.add(source)

    def push_close(self, sink: Any) -> None:
        """Close ``sink`` once everything queued before now has been delivered."""
        if not self.queue:
            self._has_data.set()
        self.queue.append((sink, None))

    def reset_clock(self, t0: float) -> None:
        """Restart the trace at ``start_offset`` from clock value ``t0`` (stats restart too)."""
        self.t0 = t0 - self.cfg.start_offset
        self._prev = max(self._prev, t0)
        self.delivered.clear()
        self.lost_segments = 0

    def trace_time(self, t: float | None = None) -> float:
        return (self.clock() if t is None else t) - self.t0

    # -- shaper ---------------------------------------------------------------------
    async def shape(self) -> None:
        """Drain the queue at the trace's rate, forever."""
        while True:
            if not self.queue:
                self._has_data.clear()
                await self._has_data.wait()
                self._prev = self.clock()
            now = self.clock()
            self._credit += self.trace.bytes_between(self.trace_time(self._prev),
                                                     self.trace_time(now))
            self._prev = now
            self._drain(now)
            if not self.queue:
                self._credit = 0.0   # an idle link does not bank opportunities
                continue
            await asyncio.sleep(self._next_wake(now))

    def _next_wake(self, now: float) -> float:
        """Seconds until the head chunk can go: one tick at most, earlier for small chunks."""
        tick = self.cfg.tick_ms / 1000.0
        transfer_time = getattr(self.trace, "transfer_time", None)
        head = self.queue[0][1] if self.queue else None
        if transfer_time is None or head is None:
            return tick
        need = len(head) - self._credit
        if need <= 0:
            return 0.0
        return min(tick, transfer_time(self.trace_time(now), need) + 2e-5)

    def _drain(self, now: float) -> None:
        while self.queue and self._credit >= 1.0:
            sink, data = self.queue[0]
            if data is None:
                self.queue.popleft()
                self._schedule(now, sink, None, 0.0)
                continue
            take = min(len(data), int(self._credit))
            extra = self._segment_losses(take)
            if take == len(data):
                self.queue.popleft()
            else:
                self.queue[0] = (sink, data[take:])
                data = data[:take]
            self._credit -= take
            self.queued -= take
            self._schedule(now, sink, data, extra)
        self._pass_close_markers(now)
        if self._paused and self.queued < self.cfg.queue_bytes // 2:
            for source in self._paused:
                source.resume_reading()
            self._paused.clear()

    def _pass_close_markers(self, now: float) -> None:
        while self.queue and self.queue[0][1] is None:
            sink, _ = self.queue.popleft()
            self._schedule(now, sink, None, 0.0)

    def _segment_losses(self, nbytes: int) -> float:
        """Roll loss for each segment completed by ``nbytes``; return the extra delay."""
        if self.cfg.loss <= 0.0:
            return 0.0
        self._seg_fill += nbytes
        extra = 0.0
        while self._seg_fill >= SEGMENT:
            self._seg_fill -= SEGMENT
            if self.rng.random() < self.cfg.loss:
                self.lost_segments += 1
                self._credit -= SEGMENT          # the retransmission uses an opportunity
                extra = self.cfg.rto_ms / 1000.0
        return extra

    def _schedule(self, now: float, sink: Any, data: bytes | None, extra: float) -> None:
        due = max(now + self.cfg.delay_ms / 1000.0 + extra, self._last_due)
        self._last_due = due
        if data is not None:
            second = int(self.trace_time(now))
            self.delivered[second] = self.delivered.get(second, 0) + len(data)
        if due <= now and not self.inflight:
            _write(sink, data)
            return
        self.inflight.append((due, sink, data))
        self._has_inflight.set()

    # -- delay line -----------------------------------------------------------------
    async def deliver(self) -> None:
        """Write delayed bytes to their sinks when due, forever."""
        while True:
            if not self.inflight:
                self._has_inflight.clear()
                await self._has_inflight.wait()
            due = self.inflight[0][0]
            wait = due - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            now = self.clock()
            while self.inflight and self.inflight[0][0] <= now:
                _, sink, data = self.inflight.popleft()
                _write(sink, data)


def _write(sink: Any, data: bytes | None) -> None:
    if sink.is_closing():
        return
    if data is None:
        sink.close()
    else:
        sink.write(data)


class _Side(asyncio.Protocol):
    """One TCP endpoint of a relayed connection; its bytes go into ``pipe``."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self._pending: list[bytes] = []
        self._eof_pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.peer is None:
            transport.pause_reading()   # nothing to shape into until the peer is connected

    def attach(self, peer: "_Side") -> None:
        self.peer = peer
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        for data in self._pending:
            self.pipe.push(peer.transport, data, self.transport)
        self._pending.clear()
        if self._eof_pending:
            self.pipe.push_close(peer.transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self._pending.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
        else:
            self.pipe.push(self.peer.transport, data, self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is None:
            self._eof_pending = True
        else:
            self.pipe.push_close(self.peer.transport)


class Link:
    """A listening relay between ``listen`` and ``target`` with an uplink and a downlink pipe.

    Uplink = bytes from the connecting client (the edge) to the target (the cloud).
    """

    def __init__(self, up: RateTrace, down: RateTrace, target: tuple[str, int],
                 cfg: LinkConfig = LinkConfig(), listen: tuple[str, int] = ("127.0.0.1", 0),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.up_trace, self.down_trace = up, down
        self.target, self.listen, self.cfg, self.clock = target, listen, cfg, clock
        self.up: Pipe | None = None
        self.down: Pipe | None = None
        self.connections = 0
        self.start_wall = 0.0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._sides: list[_Side] = []

    @property
    def port(self) -> int:
        if self._server is None:
            raise PeerUnavailableError("link not started: call await link.start() first")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> int:
        """Start the shapers and listen; returns the listening port."""
        t0 = self.clock()
        self.start_wall = time.time()
        self.up = Pipe("up", self.up_trace, self.cfg, self.clock, t0)
        self.down = Pipe("down", self.down_trace, self.cfg, self.clock, t0)
        for pipe in (self.up, self.down):
            self._tasks += [asyncio.ensure_future(pipe.shape()),
                            asyncio.ensure_future(pipe.deliver())]
        loop = asyncio.get_running_loop()
        sock = socket.create_server(self.listen)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # inherited
        self._server = await loop.create_server(self._accept, sock=sock)
        return self.port

    def _accept(self) -> _Side:
        client = _Side(self.up)
        self._sides = [x for x in self._sides if x.transport is None or not x.transport.is_closing()]
        self._sides.append(client)
        asyncio.ensure_future(self._connect_upstream(client))
        return client

    async def _connect_upstream(self, client: _Side) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.target)
            _, upstream = await loop.create_connection(lambda: _Side(self.down), sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("link: cannot reach target %s:%s: %s", *self.target, exc)
            if client.transport is not None:
                client.transport.close()
            return
        self.connections += 1
        self._sides.append(upstream)
        upstream.attach(client)
        client.attach(upstream)

    def reset_clock(self) -> None:
        """Trace time restarts now (the testbed does this when the first request is due)."""
        now = self.clock()
        self.start_wall = time.time()
        for pipe in (self.up, self.down):
            if pipe is not None:
                pipe.reset_clock(now)

    async def stop(self) -> None:
        """Stop listening and shaping; close every relayed connection at once (bytes still
        queued are dropped: a stalled trace would otherwise hold its peers open forever)."""
        if self._server is not None:
            self._server.close()
        for side in self._sides:
            if side.transport is not None and not side.transport.is_closing():
                side.transport.abort()
        self._sides.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def stats(self) -> dict[str, Any]:
        """Delivered bytes per trace second and lost segments, per direction."""
        out: dict[str, Any] = {"start_wall": self.start_wall, "connections": self.connections,
                               "start_offset": self.cfg.start_offset}
        for pipe in (self.up, self.down):
            if pipe is not None:
                delivered = {str(k): v for k, v in sorted(pipe.delivered.items())}
                out[pipe.name] = {"delivered": delivered,
                                  "lost_segments": pipe.lost_segments, "queued": pipe.queued}
        return out


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed, else the default asyncio loop."""
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()


async def serve_links(links: list[Link], ready: Callable[[list[int]], None] | None = None,
                      stop: asyncio.Event | None = None,
                      stats_path: str | None = None) -> None:
    """Run ``links`` until ``stop`` is set; writes ``stats_path`` (JSON) every second."""
    ports = [await link.start() for link in links]
    if ready is not None:
        ready(ports)
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            if stats_path:
                _write_stats(stats_path, links)
    finally:
        for link in links:
            await link.stop()
        if stats_path:
            _write_stats(stats_path, links)


def _write_stats(path: str, links: list[Link]) -> None:
    from pathlib import Path
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps([link.stats() for link in links]))
    tmp.replace(path)
