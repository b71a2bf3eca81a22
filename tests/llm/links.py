"""The edge's cloud link for LLM tests: the real ZeroMQ link, or the in-process twin."""

from __future__ import annotations

from contextlib import asynccontextmanager

from tether.cloud.config import CloudConfig
from tether.cloud.twin import InProcessCloud
from tether.core import protocol as P
from tether.edge.inproc import InProcessLink
from tether.edge.zmq_link import LinkTiming, ZmqCloudLink

#: quick loss detection and reconnects (the defaults suit a LAN daemon)
FAST = LinkTiming(heartbeat_interval=0.1, heartbeat_timeout=1.0, handshake_timeout=0.5,
                  reconnect_min=0.05, reconnect_max=0.3)


def zmq_link(endpoint: str, fingerprint: str, curve=None, timing: LinkTiming = FAST,
             model_id: str = "stories260K") -> ZmqCloudLink:
    """A ZeroMQ link whose handshake asks for the LLM weights ``fingerprint``."""
    return ZmqCloudLink(endpoint, P.BundleInfo(model_id, fingerprint), "llm-test-edge",
                        timing, curve)


@asynccontextmanager
async def local_cloud(engine, fingerprint: str | None = None, config: CloudConfig | None = None):
    """An in-process cloud core serving ``engine``'s sessions and a started link to it
    (asking for ``fingerprint``, the engine's by default); closes both (and the engine)."""
    cloud = InProcessCloud([], config or CloudConfig(preload=False), sessions=engine)
    await cloud.start()
    link = InProcessLink(cloud, P.BundleInfo(engine.model_id, fingerprint or engine.fingerprint))
    try:
        yield link
    finally:
        await link.close()
        await cloud.close()
        await engine.close()
