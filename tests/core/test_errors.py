"""The error tree: every class transient or fatal, unique codes, codes round-trip on the wire."""

from __future__ import annotations

import pickle

import pytest

from tether.core import errors
from tether.core import protocol as P
from tether.core.errors import FatalError, TetherError, TransientError


def _all_error_classes() -> list[type[TetherError]]:
    found = [cls for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, TetherError)]
    assert len(found) > 20
    return found


def test_every_error_is_exactly_one_of_transient_or_fatal():
    for cls in _all_error_classes():
        if cls is TetherError:
            continue
        assert issubclass(cls, TransientError) != issubclass(cls, FatalError), cls.__name__


def test_transient_means_try_later_or_elsewhere():
    transient = {c for c in _all_error_classes() if issubclass(c, TransientError)}
    assert {errors.BusyError, errors.DeadlineExceededError, errors.PeerUnavailableError} <= transient
    for fatal in (errors.ConfigError, errors.BundleError, errors.ProtocolError,
                  errors.PayloadError, errors.UnknownCodecError, errors.SplitError):
        assert issubclass(fatal, FatalError)


def test_every_class_is_on_the_wire_with_a_unique_code():
    listed = set(errors.ERRORS)
    assert listed == set(_all_error_classes()) - {TetherError}
    codes = [cls.code for cls in errors.ERRORS]
    assert len(codes) == len(set(codes))
    assert errors.ERROR_CLASSES == {cls.code: cls for cls in errors.ERRORS}


@pytest.mark.parametrize("cls", errors.ERRORS, ids=lambda c: c.__name__)
def test_codes_round_trip_through_the_protocol(cls):
    frames = P.encode(P.Error.from_exception(9, cls("what went wrong")))
    rebuilt = P.decode([bytes(memoryview(f)) for f in frames]).to_exception()
    assert type(rebuilt) is cls and str(rebuilt) == "what went wrong"


def test_unknown_and_foreign_errors_keep_their_category():
    assert isinstance(errors.error_from_code("martian", "hi"), FatalError)
    rebuilt = P.Error.from_exception(1, RuntimeError("boom")).to_exception()
    assert type(rebuilt) is errors.InternalError and isinstance(rebuilt, FatalError)
    assert isinstance(P.Error.from_exception(1, TetherError("bug")).to_exception(),
                      errors.InternalError)


def test_byte_counts_are_constructor_fields_and_copies_carry_them():
    exc = errors.DeadlineExceededError("late", bytes_received=7)
    assert (exc.bytes_sent, exc.bytes_received) == (0, 7)
    counted = exc.with_traffic(120, 99)
    assert counted is not exc and type(counted) is type(exc) and str(counted) == "late"
    assert (counted.bytes_sent, counted.bytes_received) == (120, 7)   # a known count wins
    assert (exc.bytes_sent, exc.bytes_received) == (0, 7)              # the original is untouched
    for cls in errors.ERRORS:
        assert cls("m").with_traffic(3, 4).bytes_received == 4
    again = pickle.loads(pickle.dumps(counted))     # Ray ships exceptions between processes
    assert (type(again), again.bytes_sent, again.bytes_received) == (type(counted), 120, 7)


def test_busy_carries_the_peers_retry_estimate_through_copies_and_pickling():
    from tether.core import protocol as P
    from tether.edge.link import MAX_RETRY_ESTIMATE_S, message_error

    busy = message_error(P.Busy(5, "sessions_full", 3, 2.5))
    assert isinstance(busy, errors.BusyError) and busy.retry_after_s == 2.5
    assert "retry in ~2.5 s" in str(busy)
    counted = busy.with_traffic(10)
    assert (counted.retry_after_s, counted.bytes_sent) == (2.5, 10)
    assert pickle.loads(pickle.dumps(counted)).retry_after_s == 2.5
    assert message_error(P.Busy(5, "queue_full", 3, 1e9)).retry_after_s == MAX_RETRY_ESTIMATE_S
    assert message_error(P.Busy(5, "queue_full", 3, float("nan"))).retry_after_s == 0.0
    assert message_error(P.Busy(5, "queue_full", 3, -4.0)).retry_after_s == 0.0
    assert errors.BusyError("plain").retry_after_s == 0.0
