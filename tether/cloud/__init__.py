"""The cloud inference service: runs tails for many edges at once (issue 3).

API::

    from tether.cloud import CloudConfig, ServedBundle, CloudServer, InProcessCloud

    bundle = ServedBundle.load("bundles/cifar_resnet20")      # from `tether partition`
    server = CloudServer(CloudConfig(bind="tcp://127.0.0.1:5555", metrics_port=9100),
                         [bundle], CloudMetrics(CollectorRegistry()))
    await server.start(); ...; await server.stop()            # SIGTERM: request_stop()

    twin = InProcessCloud([bundle], CloudConfig())            # same core, no sockets (tests)

Layers: :mod:`.core` (admission, dynamic batching, decode + tail in compute threads; no
sockets), :mod:`.sessions` (LLM session steps: bounds, BUSY, drain, metrics), :mod:`.llm`
(the LLM engine: KV caches, batched decode steps), :mod:`.admission` (the completion estimate behind BUSY "deadline"), :mod:`.server`
(ZeroMQ ROUTER IO, CURVE, HTTP probes), :mod:`.curve` (key files, parsed at start), :mod:`.twin`,
:mod:`.bundles`, :mod:`.config`. The wire protocol is :mod:`tether.core.protocol`.
"""

from tether.cloud.bundles import INPUT, ServedBundle
from tether.cloud.config import CloudConfig, load_cloud_config
from tether.cloud.core import CloudCore
from tether.cloud.sessions import SessionHandler, SessionLimits

__all__ = ["INPUT", "CloudConfig", "CloudCore", "CloudServer", "InProcessCloud", "ServedBundle",
           "SessionHandler", "SessionLimits", "load_cloud_config"]


def __getattr__(name: str):  # lazy: zmq only when a server is built
    if name == "CloudServer":
        from tether.cloud.server import CloudServer
        return CloudServer
    if name == "InProcessCloud":
        from tether.cloud.twin import InProcessCloud
        return InProcessCloud
    raise AttributeError(name)
