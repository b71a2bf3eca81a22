"""A tiny asyncio HTTP server for operators: ``/metrics``, ``/healthz``, ``/readyz``.

No framework: GET only, one request per connection, bounded request size. ``/healthz`` is
200 while the process serves its socket; ``/readyz`` is 200 only while it accepts work
(503 while starting or draining) so a load balancer stops sending before shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tether.core.metrics import render

log = logging.getLogger(__name__)
Health = Callable[[], tuple[bool, bool]]     # () -> (alive, ready)


class HealthServer:
    """Serves the registry and the health probes on ``host:port`` (port 0: a free one)."""

    def __init__(self, registry: CollectorRegistry, health: Health) -> None:
        self.registry = registry
        self.health = health
        self._server: asyncio.base_events.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=8192)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            status, ctype, body = self._route(line.decode("latin-1").split())
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                    "\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _route(self, parts: list[str]) -> tuple[str, str, bytes]:
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = parts[1].split("?", 1)[0]
        alive, ready = self.health()
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, render(self.registry)
        if path == "/healthz":
            return ("200 OK", "text/plain", b"ok\n") if alive else \
                ("503 Service Unavailable", "text/plain", b"stopped\n")
        if path == "/readyz":
            return ("200 OK", "text/plain", b"ready\n") if ready else \
                ("503 Service Unavailable", "text/plain", b"not ready\n")
        return "404 Not Found", "text/plain", b"try /metrics, /healthz or /readyz\n"
