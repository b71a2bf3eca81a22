"""Wire protocol: round trips, awkward tensors, validation of hostile input, fuzzing."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.core import protocol as P
from tether.core.errors import (
    BusyError, ProtocolError, SplitError, TetherError, VersionMismatchError,
)


def roundtrip(msg):
    frames = P.encode(msg)
    # what a socket delivers: independent bytes per frame
    return P.decode([bytes(f) for f in frames])


def test_every_message_type_roundtrips():
    info = P.BundleInfo("cifar_resnet20", "ab" * 32, ("layer1", "layer2"), ("fp32", "int8"),
                        P.TensorDesc((1, 3, 32, 32)))
    msgs = [
        P.Hello(1, "edge-a", (P.BundleInfo("cifar_resnet20", "ab" * 32),)),
        P.Ready(1, "cloud-1", (info,), 1 << 20),
        P.Infer(2, "ab" * 32, "layer2", "int8", {"scale": 0.5, "shape": [1, 32, 16, 16]}, 0.25,
                (b"\x01" * 100, b"")),
        P.Error(3, "unknown_split", "no such split"),
        P.Busy(4, "deadline", 17, 0.01),
        P.Ping(5, 123.5), P.Pong(5, 123.5, 0.002),
        P.Prefill(6, "s1", "fp", "layer3", "fp16", 0, 12, {"n": 1}, 1.0, (b"abc",)),
        P.Decode(7, "s1", "fp", "layer3", "fp16", 12, 1, {}, None, (b"x",)),
        P.Close(8, "s1"),
    ]
    for msg in msgs:
        back = roundtrip(msg)
        assert type(back) is type(msg)
        for name in msg.__dataclass_fields__:
            a, b = getattr(msg, name), getattr(back, name)
            if name == "payload":
                assert [bytes(x) for x in a] == [bytes(x) for x in b]
            else:
                assert a == b, name


def test_frame_layout_is_type_byte_header_payload():
    frames = P.encode(P.Infer(9, "fp", "input", "fp32", {}, None, (b"abcd",)))
    assert frames[0] == bytes([P.MsgType.INFER])
    header = msgpack.unpackb(frames[1])
    assert header["v"] == P.PROTOCOL_VERSION and header["id"] == 9 and header["sizes"] == [4]
    assert frames[2] == b"abcd"


@pytest.mark.parametrize("tensor", [
    torch.randn(4, 6)[:, ::2],                    # non-contiguous
    torch.randn(3, 4).t(),                        # transposed
    torch.empty(0, 10),                           # empty
    torch.randn(2, 16, 8, 8).half(),              # fp16
    torch.randn(2, 3).to(torch.bfloat16),         # bfloat16 bits
    torch.randint(-5, 5, (7,), dtype=torch.int64),
    torch.tensor([True, False, True]),
    torch.tensor(3.5),                            # rank 0
    torch.randn(4, 64, 32, 32),                   # 1 MiB: zero-copy path
])
def test_tensor_frames_roundtrip_exactly(tensor):
    msg = P.result_for(1, tensor, queue_s=0.1, decode_s=0.2, tail_s=0.3, batch_size=4)
    back = roundtrip(msg)
    out = back.tensor()
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)
    assert back.cloud_s == pytest.approx(0.6) and back.batch_size == 4
    out.add_(0) if out.is_floating_point() else None   # writable copy


def test_numpy_big_endian_and_zero_copy_views():
    arr = np.arange(12, dtype=">f4").reshape(3, 4)
    desc, view = P.tensor_frame(arr)
    assert desc == P.TensorDesc((3, 4), "float32")
    np.testing.assert_array_equal(P.frame_array(desc, view), arr)
    contiguous = np.arange(6, dtype=np.float32)
    _, view = P.tensor_frame(contiguous)
    contiguous[0] = 42.0                          # same memory: no copy was made
    assert np.frombuffer(view, np.float32)[0] == 42.0


def test_large_frames_are_sent_as_views_not_copies():
    big = torch.zeros(1 << 18)                    # 1 MiB
    frames = P.encode(P.result_for(1, big))
    assert isinstance(frames[2], memoryview) and frames[2].nbytes == 1 << 20
    assert P.wire_size(frames) == 1 + len(frames[1]) + (1 << 20)


def test_unsupported_dtype_is_refused():
    with pytest.raises(ProtocolError, match="cannot go on the wire"):
        P.tensor_frame(np.zeros(3, dtype=np.complex64))


def test_error_rebuilds_the_typed_exception():
    err = roundtrip(P.Error.from_exception(3, SplitError("unknown split point 'x'")))
    exc = err.to_exception()
    assert isinstance(exc, SplitError) and "unknown split" in str(exc)
    assert isinstance(P.Error(1, "busy", "full").to_exception(), BusyError)
    assert P.Error.from_exception(1, RuntimeError("boom")).code == "internal"


def _header(**fields):
    return msgpack.packb({"v": P.PROTOCOL_VERSION, "id": 1, **fields})


INFER = bytes([P.MsgType.INFER])
RESULT = bytes([P.MsgType.RESULT])


@pytest.mark.parametrize("frames, match", [
    ([INFER], "frames"),
    ([b"", _header()], "message-type byte"),
    ([b"\x63", _header()], "message-type byte"),
    ([b"\x03\x03", _header()], "message-type byte"),
    ([INFER, b"\xc1"], "msgpack"),
    ([INFER, msgpack.packb([1, 2])], "map"),
    ([INFER, _header(fingerprint="f", split="s")], "codec"),
    ([INFER, _header(fingerprint=1, split="s", codec="c")], "string"),
    ([INFER, _header(fingerprint="f", split="s", codec="c", deadline_s=float("nan"))], "finite"),
    ([INFER, _header(fingerprint="f", split="s", codec="c", sizes=[5]), b"abc"], "declared 5"),
    ([INFER, _header(fingerprint="f", split="s", codec="c"), b"abc"], "declares 0"),
    ([INFER, _header(fingerprint="f", split="s", codec="c", sizes="x")], "sizes"),
    ([INFER, _header(fingerprint="f", split="s", codec="c", codec_header=[1])], "map"),
    ([RESULT, _header(sizes=[8], tensors=[{"shape": [2], "dtype": "complex"}]), b"x" * 8], "dtype"),
    ([RESULT, _header(sizes=[8], tensors=[{"shape": [3], "dtype": "float32"}]), b"x" * 8], "needs 12"),
    ([RESULT, _header(sizes=[8], tensors=[{"shape": [-2], "dtype": "float32"}]), b"x" * 8], "non-negative"),
    ([RESULT, _header(sizes=[0], tensors=[{"shape": [1] * 9, "dtype": "int8"}]), b""], "at most 8"),
    ([RESULT, _header(sizes=[0], tensors=[{"shape": [1 << 14, 1 << 14], "dtype": "int8"}]),
      b""], "elements"),
    ([RESULT, _header(tensors=[{"shape": [1], "dtype": "int8"}])], "one payload frame"),
    ([bytes([P.MsgType.PING]), _header(sizes=[1]), b"x"], "no payload"),
    ([INFER, msgpack.packb({"v": 1, "id": 1, "fingerprint": "f", "split": "s", "codec": "c",
                            "codec_header": msgpack.ExtType(1, b"x")})], "extension"),
    ([bytes([P.MsgType.READY]), _header(bundles=[{"model_id": "m"}])], "fingerprint"),
])
def test_malformed_messages_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        P.decode(frames)


def test_version_mismatch_is_its_own_error():
    with pytest.raises(VersionMismatchError, match="upgrade"):
        P.decode([INFER, msgpack.packb({"v": 99, "id": 1})])


def test_limits_refuse_oversized_messages_and_headers():
    limits = P.Limits(max_message_bytes=1000, max_header_bytes=100, max_frames=4)
    ok = P.encode(P.Infer(1, "f", "s", "c", {}, None, (b"x" * 500,)))
    assert P.decode(ok, limits).payload[0].nbytes == 500
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        P.decode(P.encode(P.Infer(1, "f", "s", "c", {}, None, (b"x" * 1000,))), limits)
    with pytest.raises(ProtocolError, match="header of"):
        P.decode(P.encode(P.Infer(1, "f", "s", "c", {"k": "y" * 200})), limits)
    with pytest.raises(ProtocolError, match="frames"):
        P.decode(P.encode(P.Infer(1, "f", "s", "c", {}, None, (b"",) * 3)), limits)


def test_unknown_header_fields_are_ignored_for_forward_compatibility():
    frames = [INFER, _header(fingerprint="f", split="s", codec="c", future_field=[1, 2])]
    assert P.decode(frames).split == "s"


def test_zmq_frames_are_accepted():
    zmq = pytest.importorskip("zmq")
    frames = [zmq.Frame(bytes(f)) for f in P.encode(P.Ping(3, 1.5))]
    assert P.decode(frames) == P.Ping(3, 1.5)


VALID = [P.encode(m) for m in (
    P.Infer(2, "fp", "layer2", "int8", {"scale": 0.5, "shape": [1, 4]}, 0.25, (b"\x01" * 40,)),
    P.result_for(3, torch.arange(6, dtype=torch.float32)),
    P.Ready(1, "c", (P.BundleInfo("m", "f", ("a",), ("fp32",), P.TensorDesc((1, 3))),)),
)]


def _mutations():
    raw = st.lists(st.binary(max_size=64), min_size=0, max_size=6)

    @st.composite
    def mutated(draw):
        frames = [bytes(f) for f in draw(st.sampled_from(VALID))]
        i = draw(st.integers(0, len(frames) - 1))
        data = bytearray(frames[i])
        op = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup"]))
        if op == "flip" and data:
            j = draw(st.integers(0, len(data) - 1))
            data[j] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        frames[i] = bytes(data)
        if op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, frames[i])
        return frames

    header_maps = st.dictionaries(
        st.sampled_from(["v", "id", "sizes", "tensors", "fingerprint", "split", "codec",
                         "codec_header", "deadline_s", "bundles", "queue_s", "batch_size"]),
        st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=5)
                     | st.binary(max_size=5),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                          max_size=3),
                     max_leaves=8))
    crafted = st.tuples(st.sampled_from([bytes([t]) for t in P.MsgType]), header_maps,
                        st.lists(st.binary(max_size=32), max_size=3)).map(
        lambda t: [t[0], msgpack.packb({"v": 1, **t[1]}), *t[2]])
    return raw | mutated() | crafted


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_fuzzed_input_never_raises_anything_but_protocol_error(frames):
    try:
        msg = P.decode(frames)
    except ProtocolError:
        return
    except TetherError as exc:      # pragma: no cover - a wrong subclass is still a bug
        pytest.fail(f"decode raised {type(exc).__name__} instead of ProtocolError: {exc}")
    # whatever decodes must re-encode and decode to the same message
    again = P.decode([bytes(f) for f in P.encode(msg)])
    assert type(again) is type(msg)
    if isinstance(msg, P.Result):
        for i, desc in enumerate(msg.tensors):
            assert msg.tensor(i).numel() == desc.numel
