"""The one exception tree of tether.

Every error tether raises on purpose derives from :class:`TetherError`, and every concrete
class is exactly one of :class:`TransientError` (the same request may succeed later or
elsewhere: fall back, retry, re-route) or :class:`FatalError` (it fails the same way again
until input, config or deployment change). Callers test the category with ``isinstance(exc,
TransientError)``, never with tuples of classes. Third-party exceptions are mapped at the
boundary with ``raise ... from exc``. Each class carries a stable ``code``; the wire
protocol's ERROR message carries it so the peer rebuilds the same class
(:func:`error_from_code`).

    TetherError
    ├── TransientError           try again later, elsewhere, or answer locally
    │   ├── BusyError              peer refused: queue full or deadline cannot be met
    │   ├── DeadlineExceededError  no answer within the request's deadline
    │   └── PeerUnavailableError   not connected / handshake not done
    └── FatalError               the same request fails the same way again
        ├── ConfigError            bad or missing config key, unreadable TOML
        ├── ModelError             unknown model, untraceable model, bad input shape
        │   ├── UnknownModelError
        │   ├── NotTraceableError
        │   └── InputShapeError
        │       ├── NonFiniteInputError   NaN/Inf in an input tensor
        │       └── TooLargeError         an upload over the configured size limit
        ├── WeightsError           unreadable, corrupt or mismatched weights file
        ├── SplitError             unknown split point (message lists the valid ones)
        ├── BundleError            missing/corrupt bundle or manifest, fingerprint mismatch
        ├── CodecError
        │   ├── UnknownCodecError
        │   ├── CodecStateError    e.g. "Uninitialized CDFs. Run update() first"
        │   └── PayloadError       truncated, wrong length or corrupt codec payload
        ├── ProtocolError          malformed frames, bad header, oversized message
        │   └── VersionMismatchError
        ├── SessionError           unknown or expired LLM session (re-prefill to go on)
        ├── RemoteError            the peer reported an error with an unknown code
        ├── TraceError             unreadable or invalid bandwidth trace
        ├── PlatformError          the machine lacks a capability (root, cgroups, netns)
        └── InternalError          a bug: an unexpected exception, reported as "internal"

Byte accounting: an error that ends a request after bytes went on the socket carries them
as constructor fields (``bytes_sent``, ``bytes_received``); :meth:`TetherError.with_traffic`
returns a copy with the counts, so nothing sets attributes on an exception after the fact.
"""

from __future__ import annotations

from typing import Any


class TetherError(Exception):
    """Base of every error tether raises on purpose."""

    code = "internal"

    def __init__(self, *args: Any, bytes_sent: int = 0, bytes_received: int = 0) -> None:
        super().__init__(*args)
        self.bytes_sent = bytes_sent            # bytes on the socket before it failed
        self.bytes_received = bytes_received

    def with_traffic(self, sent: int, received: int = 0) -> "TetherError":
        """A copy carrying the request's socket byte counts (a count already known wins)."""
        return type(self)(*self.args, bytes_sent=self.bytes_sent or sent,
                          bytes_received=self.bytes_received or received, **self._fields())

    def _fields(self) -> dict[str, Any]:
        """Constructor fields of a subclass beyond the message and byte counts."""
        return {}


class TransientError(TetherError):
    """The request may succeed later or elsewhere: fall back, retry or re-route."""

    code = "transient"


class FatalError(TetherError):
    """The request fails the same way again until input, config or deployment change."""

    code = "fatal"


class BusyError(TransientError):
    """The peer refused the request; ``retry_after_s`` is its own estimate of when it will
    have room (0: no estimate)."""

    code = "busy"

    def __init__(self, *args: Any, retry_after_s: float = 0.0, **traffic: int) -> None:
        super().__init__(*args, **traffic)
        self.retry_after_s = retry_after_s

    def _fields(self) -> dict[str, Any]:
        return {"retry_after_s": self.retry_after_s}


class DeadlineExceededError(TransientError):
    code = "deadline"


class PeerUnavailableError(TransientError):
    code = "unavailable"


class ConfigError(FatalError):
    code = "config"


class ModelError(FatalError):
    code = "model"


class UnknownModelError(ModelError):
    code = "unknown_model"


class NotTraceableError(ModelError):
    code = "not_traceable"


class InputShapeError(ModelError):
    code = "bad_input"


class NonFiniteInputError(InputShapeError):
    code = "non_finite"


class TooLargeError(InputShapeError):
    code = "too_large"


class WeightsError(FatalError):
    code = "weights"


class SplitError(FatalError):
    code = "unknown_split"


class BundleError(FatalError):
    code = "bundle"


class CodecError(FatalError):
    code = "codec"


class UnknownCodecError(CodecError):
    code = "unknown_codec"


class CodecStateError(CodecError):
    code = "codec_state"


class PayloadError(CodecError):
    code = "bad_payload"


class ProtocolError(FatalError):
    code = "protocol"


class VersionMismatchError(ProtocolError):
    code = "version"


class SessionError(FatalError):
    code = "session"


class RemoteError(FatalError):
    code = "remote"


class TraceError(FatalError):
    code = "trace"


class PlatformError(FatalError):
    code = "platform"


class InternalError(FatalError):
    code = "internal"


#: Every class a peer can name on the wire (the root TetherError is reported as "internal").
ERRORS: tuple[type[TetherError], ...] = (
    TransientError, BusyError, DeadlineExceededError, PeerUnavailableError,
    FatalError, ConfigError, ModelError, UnknownModelError, NotTraceableError,
    InputShapeError, NonFiniteInputError, TooLargeError, WeightsError, SplitError, BundleError, CodecError,
    UnknownCodecError, CodecStateError, PayloadError, ProtocolError, VersionMismatchError,
    SessionError, RemoteError, TraceError, PlatformError, InternalError,
)
ERROR_CLASSES: dict[str, type[TetherError]] = {cls.code: cls for cls in ERRORS}


def error_from_code(code: str, message: str) -> TetherError:
    """Rebuild the error a peer reported; unknown codes become :class:`RemoteError`."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return RemoteError(f"[{code}] {message}")
    return cls(message)
