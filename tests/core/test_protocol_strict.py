"""Strict header types (issue 15): a bool is not a version, ints are ints, strings strings."""

from __future__ import annotations

import msgpack
import pytest

from tether.core import protocol as P
from tether.core.errors import ProtocolError, VersionMismatchError


def _frames(msg, **header_changes):
    frames = P.encode(msg)
    header = msgpack.unpackb(frames[1], raw=False)
    header.update(header_changes)
    return [frames[0], msgpack.packb(header, use_bin_type=True), *frames[2:]]


INFER = P.Infer(7, "f" * 64, "layer1", "fp16", {"shape": [1, 4]}, 0.5, (b"\x00" * 8,))


@pytest.mark.parametrize("version", [True, 1.0, "1", [1], None])
def test_a_version_must_be_the_int_one(version):
    with pytest.raises(ProtocolError, match="'v'|version") as info:
        P.decode(_frames(P.Ping(1, 0.5), v=version))
    assert not isinstance(info.value, VersionMismatchError) or version is None


def test_another_int_version_is_a_version_mismatch():
    with pytest.raises(VersionMismatchError):
        P.decode(_frames(P.Ping(1, 0.5), v=2))


@pytest.mark.parametrize("key,value", [
    ("id", True), ("id", 7.0), ("id", "7"),
    ("fingerprint", 5), ("split", True), ("codec", b"fp16"),
    ("deadline_s", True), ("deadline_s", "0.5"), ("deadline_s", float("nan")),
    ("codec_header", [1]), ("sizes", [True]),
])
def test_header_fields_have_strict_types(key, value):
    with pytest.raises(ProtocolError):
        P.decode(_frames(INFER, **{key: value}))


def test_result_tensor_descriptors_are_strict():
    result = P.result_for(3, __import__("numpy").zeros((1, 2), dtype="float32"))
    for bad in ({"shape": [1, 2], "dtype": ["float32"]}, {"shape": [True, 2], "dtype": "float32"},
                {"shape": [1.0, 2], "dtype": "float32"}):
        with pytest.raises(ProtocolError):
            P.decode(_frames(result, tensors=[bad]))
    assert P.decode(_frames(result)).tensors[0].shape == (1, 2)    # the untouched one decodes


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_floats_are_refused_on_the_fast_path(value):
    with pytest.raises(ProtocolError, match="deadline_s"):
        P.decode(_frames(INFER, deadline_s=value))


def test_fast_path_keeps_conversions_defaults_and_equality():
    assert P.decode(_frames(INFER, deadline_s=2)).deadline_s == 2.0          # int -> float
    assert type(P.decode(_frames(INFER, deadline_s=2)).deadline_s) is float
    assert P.decode(_frames(INFER, deadline_s=None)).deadline_s is None      # optional
    assert P.decode(P.encode(INFER)) == P.Infer(*INFER.__dict__.values())   # same message
    bare = P.Prefill(1, "s", "f" * 64, "layer1", "fp16")
    one, two = P.decode(P.encode(bare)), P.decode(P.encode(bare))
    assert one.codec_header == {} and one.codec_header is not two.codec_header   # fresh default
    with pytest.raises(ProtocolError, match="lacks required field 'split'"):
        header = msgpack.unpackb(P.encode(INFER)[1], raw=False)
        del header["split"]
        P.decode([P.encode(INFER)[0], msgpack.packb(header), *P.encode(INFER)[2:]])
