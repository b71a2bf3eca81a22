"""Codec names: one mapping, names that say what they do, old names only via RENAMED."""

from __future__ import annotations

import pytest
import torch

from tether.codecs import (RENAMED, TENSOR_CODEC_IDS, canonical_codec_id, hidden_codec,
                           make_codec)
from tether.codecs.factory import LOSSLESS_STAGES, TENSOR_CODECS
from tether.core.errors import UnknownCodecError
from tether.policies import actions


def test_every_tensor_codec_id_builds_and_carries_its_own_name():
    assert len(TENSOR_CODEC_IDS) == len(set(TENSOR_CODEC_IDS)) == \
        len(TENSOR_CODECS) * (1 + len(LOSSLESS_STAGES))
    for cid in TENSOR_CODEC_IDS:
        codec = make_codec(cid)
        assert codec.codec_id == cid and hidden_codec(cid).codec_id == cid
        assert codec.encode(torch.randn(2, 6)).header["codec"] == cid


@pytest.mark.parametrize("role, old, new", [
    (role, old + stage, new + stage)
    for role, table in RENAMED.items() for old, new in table.items()
    for stage in ("", "+zlib", "+zstd")])
def test_old_names_resolve_by_what_is_encoded(role, old, new):
    assert canonical_codec_id(old, role) == new and new in TENSOR_CODEC_IDS
    built = make_codec(old) if role == "features" else hidden_codec(old)
    assert built.codec_id == new


def test_int8_means_per_channel_for_features_and_per_token_for_hidden_states():
    assert make_codec("int8").codec_id == "int8-channel"
    assert hidden_codec("int8").codec_id == "int8-token"
    with pytest.raises(UnknownCodecError, match="int4-token"):
        make_codec("int4")                     # never a feature codec: the error lists the new one
    assert all(old not in TENSOR_CODEC_IDS for table in RENAMED.values() for old in table)


def test_the_policies_baseline_list_matches_the_codec_mapping():
    """tether.policies may not import tether.codecs; this keeps its copy of the names honest."""
    assert set(actions._BASELINES) == set(TENSOR_CODECS) | set(RENAMED["features"])
    for cid in TENSOR_CODEC_IDS + ("int8", "int8+zlib"):
        assert actions._is_baseline(cid)
    assert not actions._is_baseline("bottleneck-b0.01")
