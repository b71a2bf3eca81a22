"""The cloud's ``/metrics``, ``/healthz``, ``/readyz``: the shared :mod:`tether.core.http` server."""

from __future__ import annotations

from tether.core.http import Health, HealthServer, probe_response

__all__ = ["Health", "HealthServer", "probe_response"]
