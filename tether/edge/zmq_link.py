"""The real cloud link: a ZeroMQ DEALER speaking :mod:`tether.core.protocol`.

One supervisor task owns the connection's life::

    new DEALER -> HELLO/READY handshake (this bundle's fingerprint must be served)
      -> ready: reader, heartbeat (PING/PONG = RTT samples) and monitor tasks run
      -> lost (peer disconnected, heartbeat timeout, socket error): pending requests fail
         with PeerUnavailableError at once, the socket is dropped
    -> retry after a backoff (doubling from ``reconnect_min`` to ``reconnect_max``)

Sockets use ``IMMEDIATE`` (nothing queues for a peer that is not there) and ``LINGER 0``.
Nothing is sent before the handshake for every bundle of the link (an image bundle, an LLM,
or both: one socket) completed. Tail requests (INFER) and LLM session steps
(PREFILL/DECODE/CLOSE) share the connection, its deadlines and its typed errors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tether.core import protocol as P
from tether.core.sockets import close_monitor, monitor_socket, open_socket
from tether.core.errors import (ConfigError, DeadlineExceededError,
                                PeerUnavailableError, ProtocolError, TetherError)
from tether.edge.link import (CloudReply, CloudRequest, LinkReadiness, SessionMessage,
                              SessionReply, message_error, reply_from_message, session_reply,
                              with_bytes, with_request_id)

log = logging.getLogger(__name__)

_MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH \
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


@dataclass(frozen=True)
class LinkTiming:
    """Heartbeat, handshake and reconnect timing of a link (seconds)."""

    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 2.0
    handshake_timeout: float = 0.5
    reconnect_min: float = 0.05
    reconnect_max: float = 1.0


@dataclass(frozen=True)
class CurveClientKeys:
    """CurveZMQ client keys: the server's public key and this client's key pair (Z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str, client_cert: str | Path) -> "CurveClientKeys":
        """``server_key``: Z85 text or a certificate file; ``client_cert``: a ``.key_secret`` file."""
        import zmq.auth
        try:
            if Path(server_key).is_file():
                server_public, _ = zmq.auth.load_certificate(server_key)
            else:
                server_public = server_key.encode("ascii")
            public, secret = zmq.auth.load_certificate(str(client_cert))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load CURVE keys ({exc}); create them with "
                              "`tether keys generate`") from exc
        if len(server_public) != 40 or secret is None:
            raise ConfigError("curve_server_key must be a 40-character Z85 public key (or its "
                              "file) and curve_client_cert a secret certificate (.key_secret)")
        return cls(server_public, public, secret)


class ZmqCloudLink(LinkReadiness):
    """:class:`~tether.edge.link.CloudLink` over a ZeroMQ DEALER socket."""

    def __init__(self, endpoint: str, bundle: P.BundleInfo, edge_id: str = "edge",
                 timing: LinkTiming = LinkTiming(), curve: CurveClientKeys | None = None,
                 limits: P.Limits = P.DEFAULT_LIMITS,
                 context: zmq.asyncio.Context | None = None) -> None:
        super().__init__(bundle)
        self.endpoint = endpoint
        self.edge_id = edge_id
        self.timing = timing
        self.curve = curve
        self.limits = limits
        self._ctx = context or zmq.asyncio.Context.instance()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._lost: asyncio.Event | None = None
        self._lost_reason = ""
        self._hello: asyncio.Future | None = None
        self._supervisor: asyncio.Task | None = None
        self._last_seen = 0.0
        self.server: P.Ready | None = None
        self.connects = 0
        self.cloud_queue_seconds = 0.0   # the cloud's queue delay, from its last PONG
        self._closing = False

    # ---- CloudLink interface -----------------------------------------------------------

    async def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="tether-edge-link")

    def add_bundle(self, bundle: P.BundleInfo) -> None:
        """Also require ``bundle``; a link already connected handshakes again for it."""
        known = len(self.bundles)
        super().add_bundle(bundle)
        if len(self.bundles) > known and self.ready:
            self._lose("a bundle was added: handshake again")

    async def infer(self, request: CloudRequest) -> CloudReply:
        wire_id = next(self._ids)
        frames = P.encode(P.Infer(wire_id, self.bundle.fingerprint, request.split, request.codec,
                                  request.header, request.budget_seconds, tuple(request.payload)))
        msg, sent, received, rtt = await self._request("infer", wire_id, frames,
                                                       request.budget_seconds)
        return reply_from_message(request.request_id, msg, rtt, sent, received)

    async def session(self, msg: SessionMessage, timeout: float) -> SessionReply:
        wire_id = next(self._ids)
        frames = P.encode(with_request_id(msg, wire_id))
        reply, sent, received, rtt = await self._request(msg.TYPE.name.lower(), wire_id,
                                                         frames, timeout)
        return session_reply(reply, rtt, sent, received)

    async def _request(self, kind: str, wire_id: int, frames: list[Any],
                       timeout: float) -> tuple[Any, int, int, float]:
        """Send ``frames``, await the answer to ``wire_id``: (message, sent, received, rtt)."""
        sent = P.wire_size(frames)
        t0 = time.perf_counter()
        sock = self._sock
        if not self.ready or sock is None:
            error = self._not_connected(self.endpoint)
            self._observe(kind, t0, 0, 0, error)
            raise error
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[wire_id] = future
        try:
            send = sock.send_multipart(frames, copy=False)   # done at once unless the socket
            if send.done():                                  # is full: then wait_for covers both
                send.result()
                msg, received, t1 = await _within(loop, future, timeout)
            else:
                msg, received, t1 = await asyncio.wait_for(_sent_then(send, future), timeout)
        except asyncio.TimeoutError as exc:
            error = with_bytes(DeadlineExceededError(
                f"no answer from {self.endpoint} within {timeout:.3f} s"), sent)
            self._observe(kind, t0, sent, 0, error)
            raise error from exc
        except TetherError as exc:
            self._observe(kind, t0, sent, getattr(exc, "bytes_received", 0), exc)
            raise with_bytes(exc, sent) from None
        except zmq.ZMQError as exc:
            error = with_bytes(PeerUnavailableError(f"send to {self.endpoint} failed: {exc}"), sent)
            self._observe(kind, t0, sent, 0, error)
            raise error from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise                   # our caller is cancelled: not a link failure
            # the connection was dropped while the send waited for a peer (zmq.asyncio
            # cancels a pending send when its socket closes)
            error = with_bytes(PeerUnavailableError(
                f"cloud {self.endpoint}: connection lost while sending"), sent)
            self._observe(kind, t0, sent, 0, error)
            raise error from None
        finally:
            self._pending.pop(wire_id, None)
        self._observe(kind, t0, sent, received)
        return msg, sent, received, t1 - t0

    async def ping(self, timeout: float) -> float:
        wire_id = next(self._ids)
        frames = P.encode(P.Ping(wire_id, time.monotonic()))
        return (await self._request("ping", wire_id, frames, timeout))[3]

    async def close(self) -> None:
        self._closing = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._drop_socket("link closed")

    # ---- connection life ---------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = self.timing.reconnect_min
        while True:
            sock = self._new_socket()
            self._lost, self._lost_reason = asyncio.Event(), ""
            tasks = [asyncio.create_task(self._read(sock)), asyncio.create_task(self._monitor(sock))]
            try:
                if await self._handshake(sock):
                    backoff = self.timing.reconnect_min
                    tasks.append(asyncio.create_task(self._heartbeat(sock)))
                    await self._lost.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._drop_socket(self._lost_reason or "handshake failed")
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self.timing.reconnect_max)

    def _new_socket(self) -> zmq.asyncio.Socket:
        sock = open_socket(self._ctx, zmq.DEALER, IMMEDIATE=1, RECONNECT_IVL=50,
                           RECONNECT_IVL_MAX=int(self.timing.reconnect_max * 1000))
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        sock.connect(self.endpoint)
        self._sock = sock
        return sock

    async def _handshake(self, sock: zmq.asyncio.Socket) -> bool:
        self._hello = asyncio.get_running_loop().create_future()
        hello = P.Hello(0, self.edge_id, self.bundles)
        try:
            ready: P.Ready = await asyncio.wait_for(
                _send_then(sock, P.encode(hello), self._hello), self.timing.handshake_timeout)
        except asyncio.TimeoutError:
            return False
        except TetherError as exc:
            self._refused(f"cloud {self.endpoint} refused the handshake: {exc}")
            return False
        missing = self.missing_bundles(ready)
        if missing:
            served = [f"{b.model_id}:{b.fingerprint[:12]}" for b in ready.bundles]
            wanted = [f"{b.model_id}:{b.fingerprint[:12]}" for b in missing]
            self._refused(f"cloud {self.endpoint} does not serve this bundle ({', '.join(wanted)}); "
                          f"it serves {served}: deploy the same bundle on both sides")
            return False
        self.server, self.last_refusal = ready, ""
        self._last_seen = time.monotonic()
        self.connects += 1
        self._ready.set()
        log.info("edge %s connected to cloud %s (%s) for %s", self.edge_id, self.endpoint,
                 ready.server_id, ", ".join(b.model_id for b in self.bundles))
        return True

    def _refused(self, message: str) -> None:
        if message != self.last_refusal:
            log.error("%s", message)
        self.last_refusal = message

    def _drop_socket(self, reason: str) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(PeerUnavailableError(f"cloud {self.endpoint}: {reason}"))
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)
        if was_ready and not self._closing:
            log.warning("edge %s lost cloud %s: %s", self.edge_id, self.endpoint, reason)

    def _lose(self, reason: str) -> None:
        if self._lost is not None and not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    # ---- background tasks of one connection --------------------------------------------

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                self._lose(f"receive failed: {exc}")
                return
            t = time.perf_counter()
            self._last_seen = time.monotonic()
            try:       # small frames as bytes: the protocol's fast path
                msg = P.decode([f.bytes if len(f) < P.ZERO_COPY_BYTES else f.buffer
                                for f in frames], self.limits)
            except ProtocolError as exc:
                log.warning("bad message from cloud %s dropped: %s", self.endpoint, exc)
                continue
            self._dispatch(msg, sum(map(len, frames)), t)

    def _dispatch(self, msg: Any, nbytes: int, t: float) -> None:
        if isinstance(msg, P.Ready):
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(msg)
            return
        if isinstance(msg, P.Pong):
            self.cloud_queue_seconds = msg.queue_s
            rtt = time.monotonic() - msg.t
            if self._rtt_callback is not None and msg.request_id == 0 and rtt >= 0:
                try:
                    self._rtt_callback(rtt)
                except Exception:   # noqa: BLE001 - a policy bug must not stop the reader
                    log.exception("RTT callback failed")
        if isinstance(msg, P.Error) and msg.request_id == 0:
            if self._hello is not None and not self._hello.done():
                self._hello.set_exception(msg.to_exception())
            return
        future = self._pending.get(msg.request_id)
        if future is None or future.done():
            return   # a late answer to a request that already fell back
        error = message_error(msg)
        if error is not None:
            future.set_exception(with_bytes(error, 0, nbytes))
        else:
            future.set_result((msg, nbytes, t))

    async def _heartbeat(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            await asyncio.sleep(self.timing.heartbeat_interval)
            silent = time.monotonic() - self._last_seen
            if silent > self.timing.heartbeat_timeout:
                self._lose(f"no message for {silent:.2f} s (heartbeat timeout)")
                return
            try:
                await sock.send_multipart(P.encode(P.Ping(0, time.monotonic())), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass   # no peer right now; the timeout above decides
            except zmq.ZMQError as exc:
                self._lose(f"heartbeat send failed: {exc}")
                return

    async def _monitor(self, sock: zmq.asyncio.Socket) -> None:
        mon = monitor_socket(sock, _MONITOR_EVENTS)
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                kind = event["event"]
                if kind == zmq.EVENT_DISCONNECTED:
                    self._lose("peer disconnected")
                elif kind != zmq.EVENT_CONNECTED:
                    self._refused(f"cloud {self.endpoint}: security handshake failed "
                                  f"({zmq.Event(kind).name}); check the CURVE keys")
        except zmq.ZMQError:
            return
        finally:
            close_monitor(sock, mon)


async def _send_then(sock: zmq.asyncio.Socket, frames: list[Any], future: asyncio.Future) -> Any:
    """Send ``frames`` and await the answer ``future`` (one deadline covers both)."""
    await sock.send_multipart(frames, copy=False)
    return await future


async def _sent_then(send: asyncio.Future, future: asyncio.Future) -> Any:
    """Await a send that could not complete at once, then the answer ``future``."""
    await send
    return await future


async def _within(loop: asyncio.AbstractEventLoop, future: asyncio.Future, seconds: float) -> Any:
    """``await future`` with a deadline: a timer instead of ``wait_for``'s task per call."""
    timer = loop.call_later(seconds, _expire, future)
    try:
        return await future
    finally:
        timer.cancel()


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())
