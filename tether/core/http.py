"""The operators' HTTP endpoint of both daemons: ``/metrics``, ``/healthz``, ``/readyz``, 404 elsewhere.

One module for the edge and the cloud (no framework, asyncio streams only): GET/HEAD only,
one request per connection, bounded request size.

* ``/healthz`` (liveness): 200 while the process serves, 503 once it stopped.
* ``/readyz`` (readiness): 200 only while the daemon should get traffic; 503 while it
  starts, drains or cannot answer. The body is JSON naming each check, e.g.
  ``{"ready": false, "checks": {"loaded": true, "not_draining": true, "cloud_link": false,
  "local_fallback": false}}``, so an operator sees *why*.
* ``/metrics``: the injected registry in Prometheus text format.

The daemon supplies a ``health()`` callable returning :class:`Health` (or the older
``(alive, ready)`` tuple). :func:`probe_response` is the routing, reusable by any front.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tether.core.metrics import render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Health:
    """Liveness, readiness and the named readiness checks behind it."""

    alive: bool
    ready: bool
    checks: Mapping[str, bool] = field(default_factory=dict)

    @classmethod
    def from_checks(cls, alive: bool, **checks: bool) -> "Health":
        """Ready when alive and every check passes."""
        return cls(alive, alive and all(checks.values()), dict(checks))


HealthFn = Callable[[], Union[Health, "tuple[bool, bool]"]]
Response = tuple[int, str, bytes]        # status, content type, body
PROBE_PATHS = ("/metrics", "/healthz", "/readyz")
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def _as_health(value: Health | tuple[bool, bool]) -> Health:
    if isinstance(value, Health):
        return value
    alive, ready = value
    return Health(bool(alive), bool(ready))


def probe_response(path: str, registry: CollectorRegistry, health: HealthFn) -> Response:
    """The answer to ``GET path`` (query string ignored); 404 for anything but the probes."""
    path = path.split("?", 1)[0]
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, render(registry)
    if path == "/healthz":
        alive = _as_health(health()).alive
        return (200, "text/plain", b"ok\n") if alive else (503, "text/plain", b"stopped\n")
    if path == "/readyz":
        h = _as_health(health())
        body = json.dumps({"ready": h.ready, "checks": dict(h.checks)}).encode() + b"\n"
        return (200 if h.ready else 503), "application/json", body
    return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"


class HealthServer:
    """Serves the registry and the probes on ``host:port`` (port 0: a free one)."""

    def __init__(self, registry: CollectorRegistry, health: HealthFn) -> None:
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
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        except Exception:   # noqa: BLE001 - a failing probe must not kill the server
            log.exception("health endpoint failed")
        finally:
            writer.close()

    def _route(self, parts: list[str]) -> Response:
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        return probe_response(parts[1], self.registry, self.health)
