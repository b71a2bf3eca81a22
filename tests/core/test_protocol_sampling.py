"""PREFILL carries the session's sampling settings: round trip, greedy defaults for peers that
send none, and strict validation of hostile values (one ProtocolError line, nothing built)."""

from __future__ import annotations

import msgpack
import pytest

from tether.core import protocol as P
from tether.core.errors import ProtocolError
from tether.core.sampling import SamplingParams


def _prefill(**sampling):
    return P.Prefill(6, "s1", "fp", "layer3", "fp16", 0, 12, {"n": 1}, 1.0, (b"abc",), **sampling)


def _with_header(msg, drop=(), **changes):
    frames = P.encode(msg)
    header = msgpack.unpackb(frames[1], raw=False)
    for key in drop:
        header.pop(key)
    header.update(changes)
    return [frames[0], msgpack.packb(header, use_bin_type=True), *frames[2:]]


def test_sampling_settings_round_trip():
    msg = _prefill(temperature=0.7, top_k=40, top_p=0.9, seed=(1 << 64) - 1)
    back = P.decode(P.encode(msg))
    assert back.sampling == SamplingParams(0.7, 40, 0.9, (1 << 64) - 1)
    assert (back.temperature, back.top_k, back.top_p, back.seed) == (0.7, 40, 0.9, (1 << 64) - 1)
    unseeded = P.decode(P.encode(_prefill(temperature=1.0)))
    assert unseeded.seed is None and not unseeded.sampling.greedy


def test_a_prefill_without_sampling_fields_is_greedy():
    frames = _with_header(_prefill(), drop=("temperature", "top_k", "top_p", "seed"))
    back = P.decode(frames)
    assert back.sampling == SamplingParams() and back.sampling.greedy


@pytest.mark.parametrize("key,value", [
    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", "0.5"),
    ("temperature", True), ("top_k", -3), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.01),
    ("seed", -1), ("seed", 0.5), ("seed", "7"),
])
def test_hostile_sampling_values_are_refused_in_one_line(key, value):
    with pytest.raises(ProtocolError) as info:
        P.decode(_with_header(_prefill(), **{key: value}))
    assert key in str(info.value) and "\n" not in str(info.value)


def test_building_an_invalid_prefill_is_refused_too():
    with pytest.raises(ProtocolError, match="top_p"):
        _prefill(top_p=2.0)
