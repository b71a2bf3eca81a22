"""The one exception tree of tether.

Every error tether raises on purpose derives from :class:`TetherError`. Third-party
exceptions are mapped at the boundary with ``raise ... from exc`` so callers only
ever need to catch this tree. Each class carries a stable ``code`` string; the wire
protocol's ERROR message carries that code so the peer can rebuild the same class
(see :func:`error_from_code`).

    TetherError
    ├── ConfigError            bad or missing config key, unreadable TOML
    ├── ModelError             unknown model, untraceable model, bad input shape
    │   ├── UnknownModelError
    │   ├── NotTraceableError
    │   └── InputShapeError
    │       └── NonFiniteInputError   NaN/Inf in an input tensor
    ├── WeightsError           unreadable, corrupt or mismatched weights file
    ├── SplitError             unknown split point (message lists the valid ones)
    ├── BundleError            missing/corrupt bundle or manifest, fingerprint mismatch
    ├── CodecError
    │   ├── UnknownCodecError
    │   ├── CodecStateError    e.g. "Uninitialized CDFs. Run update() first"
    │   └── PayloadError       truncated, wrong length or corrupt codec payload
    ├── ProtocolError          malformed frames, bad header, oversized message
    │   └── VersionMismatchError
    ├── SessionError           unknown or expired LLM session
    ├── BusyError              peer refused: queue full or deadline cannot be met
    ├── DeadlineExceededError  no answer within the request's deadline
    ├── PeerUnavailableError   not connected / handshake not done
    ├── RemoteError            the peer reported an error with an unknown code
    ├── TraceError             unreadable or invalid bandwidth trace
    └── PlatformError          the machine lacks a capability (root, cgroups, netns)
"""

from __future__ import annotations


class TetherError(Exception):
    """Base of every error tether raises on purpose."""

    code = "internal"


class ConfigError(TetherError):
    code = "config"


class ModelError(TetherError):
    code = "model"


class UnknownModelError(ModelError):
    code = "unknown_model"


class NotTraceableError(ModelError):
    code = "not_traceable"


class InputShapeError(ModelError):
    code = "bad_input"


class NonFiniteInputError(InputShapeError):
    code = "non_finite"


class WeightsError(TetherError):
    code = "weights"


class SplitError(TetherError):
    code = "unknown_split"


class BundleError(TetherError):
    code = "bundle"


class CodecError(TetherError):
    code = "codec"


class UnknownCodecError(CodecError):
    code = "unknown_codec"


class CodecStateError(CodecError):
    code = "codec_state"


class PayloadError(CodecError):
    code = "bad_payload"


class ProtocolError(TetherError):
    code = "protocol"


class VersionMismatchError(ProtocolError):
    code = "version"


class SessionError(TetherError):
    code = "session"


class BusyError(TetherError):
    code = "busy"


class DeadlineExceededError(TetherError):
    code = "deadline"


class PeerUnavailableError(TetherError):
    code = "unavailable"


class RemoteError(TetherError):
    code = "remote"


class TraceError(TetherError):
    code = "trace"


class PlatformError(TetherError):
    code = "platform"


_ALL: tuple[type[TetherError], ...] = (
    TetherError, ConfigError, ModelError, UnknownModelError, NotTraceableError,
    InputShapeError, NonFiniteInputError, WeightsError, SplitError, BundleError, CodecError,
    UnknownCodecError, CodecStateError, PayloadError, ProtocolError,
    VersionMismatchError, SessionError, BusyError, DeadlineExceededError,
    PeerUnavailableError, RemoteError, TraceError, PlatformError,
)
ERROR_CLASSES: dict[str, type[TetherError]] = {cls.code: cls for cls in _ALL}


def error_from_code(code: str, message: str) -> TetherError:
    """Rebuild the error a peer reported; unknown codes become :class:`RemoteError`."""
    cls = ERROR_CLASSES.get(code, RemoteError)
    if cls is RemoteError and code != RemoteError.code:
        return RemoteError(f"[{code}] {message}")
    return cls(message)
