"""CurveZMQ key files for the cloud: the server's key pair and the allow-list of edge keys.

Everything is parsed at start and any defect refuses to start, naming the file and line: a
single unparsable allow-list file must not silently lock out every edge (pyzmq's loader gives
up on the whole directory when one file fails). Key files are the ZPL certificates that
``tether keys generate`` (``zmq.auth.create_certificates``) writes::

    curve
        public-key = "<40 Z85 characters>"
        secret-key = "<40 Z85 characters>"      (only in NAME.key_secret)
"""

from __future__ import annotations

from pathlib import Path

from tether.core.errors import ConfigError

KEY_CHARS = 40      # Z85 text of a 32-byte Curve25519 key


class AllowList:
    """The ZAP credentials provider: admits exactly the parsed public keys (Z85 bytes)."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def read_key_file(path: Path, setting: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of one key file, as Z85 bytes; ConfigError naming file:line."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc}") from exc
    found: dict[bytes, bytes] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith(b"#") or b"=" not in line:
            continue
        name, value = (part.strip() for part in line.split(b"=", 1))
        if name in (b"public-key", b"secret-key"):
            found[name] = _z85_key(value.strip(b"'\""), path, number, setting)
    if b"public-key" not in found:
        raise ConfigError(f"{setting}: {path} holds no public-key line: not a CurveZMQ key "
                          "file (create one with `tether keys generate --out DIR --name NAME`)")
    return found[b"public-key"], found.get(b"secret-key")


def _z85_key(value: bytes, path: Path, line: int, setting: str) -> bytes:
    from zmq.utils import z85
    try:
        ok = len(value) == KEY_CHARS and len(z85.decode(value)) == 32
    except (ValueError, KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        shown = value.decode("ascii", "replace")[:48]
        raise ConfigError(f"{setting}: {path}:{line}: {shown!r} is not a {KEY_CHARS}-character "
                          "Z85 Curve key; regenerate it with `tether keys generate`")
    return value


def load_allowed_keys(directory: Path | None) -> AllowList:
    """Every ``*.key`` in ``directory``, all parsed (one bad file refuses to start)."""
    allowed = Path(directory) if directory is not None else Path()
    files = sorted(allowed.glob("*.key")) if allowed.is_dir() else []
    if not files:
        raise ConfigError(f"curve_allowed_keys: {allowed} must be a directory holding client "
                          "public keys (*.key from `tether keys generate`)")
    return AllowList(frozenset(read_key_file(f, "curve_allowed_keys")[0] for f in files))


def load_server_keys(path: Path | None) -> tuple[bytes, bytes]:
    """The server's (public, secret) key pair from its ``.key_secret`` file."""
    if path is None or not Path(path).is_file():
        raise ConfigError(f"curve_secret_key: {path} is not a file; create one with "
                          "`tether keys generate --out DIR`")
    public, secret = read_key_file(Path(path), "curve_secret_key")
    if secret is None:
        raise ConfigError(f"curve_secret_key: {path} holds no secret key; use the .key_secret file")
    return public, secret
