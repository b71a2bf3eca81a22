"""The edge agent daemon: heads on ONNX Runtime, tails on a cloud, always an answer.

Public API::

    EdgeConfig, load_edge_config           tether.edge.config   (TOML, validated)
    EdgeCompute                            tether.edge.compute  (ONNX heads, full model, exits, codecs)
    EdgeAgent, EdgeResult                  tether.edge.agent    (policy -> head -> cloud -> fallback)
    CloudLink, CloudRequest, CloudReply    tether.edge.link     (the interface)
    ZmqCloudLink, LinkTiming, CurveClientKeys   tether.edge.zmq_link (ZeroMQ DEALER)
    InProcessLink                          tether.edge.inproc   (twin for tests)
    EdgeServer                             tether.edge.server   (application endpoint: images, tokens)
    EdgeClient, EdgeAnswer, TokenStream    tether.edge.client   (light client: no torch)
    EdgeDaemon, build_agent, run_daemon    tether.edge.daemon   (`tether edge`)
    ListSink, JsonlSink, CsvSink, open_sink, read_records   tether.edge.records

See docs/runtime.md for operating the daemon.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EdgeConfig": "config", "load_edge_config": "config",
    "EdgeCompute": "compute",
    "EdgeAgent": "agent", "EdgeResult": "agent",
    "CloudLink": "link", "CloudRequest": "link", "CloudReply": "link",
    "ZmqCloudLink": "zmq_link", "LinkTiming": "zmq_link", "CurveClientKeys": "zmq_link",
    "InProcessLink": "inproc",
    "EdgeServer": "server",
    "EdgeClient": "client", "EdgeAnswer": "client", "TokenStream": "client",
    "EdgeDaemon": "daemon", "build_agent": "daemon", "run_daemon": "daemon",
    "ListSink": "records", "JsonlSink": "records", "CsvSink": "records",
    "open_sink": "records", "read_records": "records",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import lazily: ``EdgeClient`` must not pull in torch and ONNX Runtime."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tether.edge' has no attribute {name!r}")
    return getattr(import_module(f"tether.edge.{module}"), name)
