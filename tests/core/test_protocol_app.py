"""The edge's application-endpoint messages: round trips and strict validation (issue 13)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from tether.core import frames as F
from tether.core import protocol as P
from tether.core.errors import PeerUnavailableError, ProtocolError


def _roundtrip(msg):
    return P.decode([bytes(f) for f in P.encode(msg)])


def _frames(msg, **header_changes):
    frames = [bytes(f) for f in P.encode(msg)]
    header = msgpack.unpackb(frames[1], raw=False)
    header.update(header_changes)
    return [frames[0], msgpack.packb(header, use_bin_type=True), *frames[2:]]


def _image(rid=3):
    desc, view = P.tensor_frame(np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    return P.ImageRequest(rid, (desc,), (view,), 0.5)


def test_every_app_message_round_trips():
    image = _roundtrip(_image())
    assert image.deadline_s == 0.5 and image.tensors[0].shape == (2, 2, 3)
    np.testing.assert_array_equal(P.frame_array(image.tensors[0], image.payload[0]),
                                  np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    desc, view = P.tensor_frame(np.array([[0.5, 2.0]], dtype=np.float32))
    record = {"action": "split:layer2:fp32", "outcome": "cloud", "total_seconds": 0.01,
              "prediction": 1, "bytes_sent": 100, "fallback_reason": ""}
    reply = _roundtrip(P.ImageReply(3, (desc,), (view,), record, "cat"))
    assert reply.record == record and reply.label == "cat"
    gen = P.Generate(4, "Once", (), 8, 0.7, 40, 0.9, 1234)
    assert _roundtrip(gen) == gen and P.Generate(5, "x").temperature == 0.0
    ids = P.Generate(5, token_ids=(1, 403, 2**31 - 1))
    assert _roundtrip(ids).token_ids == (1, 403, 2**31 - 1)
    chunk = P.TokenChunk(4, (17,), "é", "exit")
    assert _roundtrip(chunk) == chunk
    end = P.StreamEnd(4, cloud=5, exit=2, local=1, seconds=0.25, finish="stop")
    assert _roundtrip(end) == end and end.by_source() == {"cloud": 5, "exit": 2, "local": 1}
    assert end.to_exception() is None


def test_a_stream_end_carries_its_typed_error():
    end = _roundtrip(P.StreamEnd(9, cloud=3, finish="error", code="unavailable",
                                 message="cloud gone at token 4"))
    exc = end.to_exception()
    assert isinstance(exc, PeerUnavailableError) and "token 4" in str(exc)
    assert end.cloud == 3


@pytest.mark.parametrize("msg, changes, match", [
    (_image(), {"tensors": []}, "one tensor"),
    (_image(), {"deadline_s": 0}, "deadline_s"),
    (_image(), {"tensors": [{"shape": [2, 2, 3], "dtype": "object"}]}, "dtype"),
    (P.Generate(1, "hi"), {"prompt": ""}, "prompt or token_ids"),
    (P.Generate(1, "hi"), {"token_ids": [5]}, "exactly one"),
    (P.Generate(1, token_ids=(5,)), {"token_ids": [5, -1]}, "non-negative"),
    (P.Generate(1, token_ids=(5,)), {"token_ids": [1 << 40]}, r"2\*\*31"),
    (P.Generate(1, token_ids=(5,)), {"token_ids": [True]}, "non-negative ints"),
    (P.Generate(1, token_ids=(5,)), {"token_ids": "5"}, "list"),
    (P.Generate(1, "hi"), {"max_new_tokens": 0}, "max_new_tokens"),
    (P.Generate(1, "hi"), {"temperature": -0.1}, "temperature"),
    (P.Generate(1, "hi"), {"temperature": float("inf")}, "finite"),
    (P.Generate(1, "hi"), {"top_p": 0.0}, "top_p"),
    (P.Generate(1, "hi"), {"top_k": -1}, "top_k"),
    (P.Generate(1, "hi"), {"seed": -5}, "seed"),
    (P.Generate(1, "hi"), {"seed": 1.5}, "int"),
    (P.TokenChunk(1, (3,)), {"source": "oracle"}, "source"),
    (P.TokenChunk(1, (3,)), {"tokens": []}, "token ids"),
    (P.TokenChunk(1, (3,)), {"text": b"x"}, "string"),
    (P.StreamEnd(1), {"finish": "done"}, "finish"),
    (P.StreamEnd(1), {"cloud": -1}, "counts"),
    (P.StreamEnd(1), {"code": "busy"}, "exactly when"),
    (P.StreamEnd(1, finish="error", code="busy"), {"code": ""}, "exactly when"),
])
def test_app_messages_are_strict(msg, changes, match):
    with pytest.raises(ProtocolError, match=match):
        P.decode(_frames(msg, **changes))


@pytest.mark.parametrize("record", [{"nested": {"a": 1}}, {"x": [1]}, {"t": float("nan")},
                                    {"b": b"raw"}])
def test_an_image_reply_record_holds_scalars_only(record):
    desc, view = P.tensor_frame(np.zeros((1, 2), dtype=np.float32))
    good = P.ImageReply(1, (desc,), (view,), {"outcome": "cloud"})
    with pytest.raises(ProtocolError, match="record"):
        P.decode(_frames(good, record=record))


def test_bad_settings_are_refused_when_the_app_builds_the_request():
    with pytest.raises(ProtocolError, match="top_p"):
        P.Generate(1, "hi", temperature=0.8, top_p=1.5)
    with pytest.raises(ProtocolError, match="one tensor"):
        P.ImageRequest(1)


def test_tensor_frame_helpers_live_in_frames_and_stay_reexported():
    for name in ("tensor_frame", "frame_array", "frame_tensor", "result_for", "TensorDesc",
                 "Limits", "DEFAULT_LIMITS", "BundleInfo"):
        assert getattr(P, name) is getattr(F, name)
    result = P.result_for(2, np.ones((1, 3), dtype=np.float32))
    assert isinstance(result, P.Result) and result.tensor().shape == (1, 3)
