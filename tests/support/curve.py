"""CURVE key files for tests: a server, one allowed edge and a stranger, as ``tether keys``
would lay them out (``zmq.auth`` certificates; the allowed edge's public key alone in a
directory, the cloud's ``curve.allowed_keys``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from tether.cloud.config import CloudCurveConfig
from tether.edge.zmq_link import CurveClientKeys


@dataclass(frozen=True)
class CurveKeys:
    server_public: Path
    server_secret: Path
    allowed: Path               # directory holding only the allowed edge's public key
    edge_secret: Path           # the allowed edge's secret certificate
    stranger_secret: Path       # a valid key pair the cloud does not know

    def cloud(self) -> CloudCurveConfig:
        """The cloud's ``[curve]``: its secret key, and only the allowed edge admitted."""
        return CloudCurveConfig(self.server_secret, self.allowed)

    def client(self, secret: Path) -> CurveClientKeys:
        """An edge's CURVE keys: the server's public key (given as a file) and ``secret``."""
        return CurveClientKeys.load(str(self.server_public), secret)


def curve_keys(directory: Path) -> CurveKeys:
    """Fresh certificates under ``directory`` (a test's ``tmp_path``)."""
    server_pub, server_sec = zmq.auth.create_certificates(str(directory), "server")
    edge_pub, edge_sec = zmq.auth.create_certificates(str(directory), "edge")
    _, stranger_sec = zmq.auth.create_certificates(str(directory), "stranger")
    allowed = Path(directory) / "allowed"
    allowed.mkdir()
    shutil.copy(edge_pub, allowed)
    return CurveKeys(Path(server_pub), Path(server_sec), allowed, Path(edge_sec),
                     Path(stranger_sec))
