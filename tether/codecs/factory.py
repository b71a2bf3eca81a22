"""``make_codec``: the one literal mapping from codec ids to codec classes.

Ids: ``fp32``, ``fp16``, ``int8-channel`` (per-channel affine, scales in the header),
``int8-token`` and ``int4-token`` (one fp16 scale per row/token, for LLM hidden states); any
of them followed by ``+zlib`` or ``+zstd`` (lossless stage); input codecs ``jpeg<q>``,
``webp<q>`` (q = 1..100) and ``png``; learned codecs (``bottleneck-b<beta>``,
``student-b<beta>``) as listed in a bundle manifest's ``codecs`` entries.

Old names keep working through :data:`RENAMED` only: ``int8`` is ``int8-channel`` for DNN
features (bundles, profiles, ``--codec``) and ``int8-token`` for LLM hidden states, where
``int4`` is ``int4-token``. :func:`hidden_codec` builds the codec an LLM split sends.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from tether.core.bundle import CodecEntry, Manifest
from tether.core.errors import CodecError, UnknownCodecError
from tether.codecs.base import Codec
from tether.codecs.baseline import Fp16Codec, Fp32Codec, Int8ChannelCodec, ZlibCodec, ZstdCodec
from tether.codecs.image import ImageCodec
from tether.codecs.tokens import TokenIntCodec

TENSOR_CODECS: dict[str, Callable[[], Codec]] = {
    "fp32": lambda: Fp32Codec("fp32"),
    "fp16": lambda: Fp16Codec("fp16"),
    "int8-channel": lambda: Int8ChannelCodec("int8-channel"),
    "int8-token": lambda: TokenIntCodec("int8-token", 8),
    "int4-token": lambda: TokenIntCodec("int4-token", 4),
}
LOSSLESS_STAGES = ("zlib", "zstd")
#: Every tensor codec id (any tensor, LLM hidden states included): each base, then with stages.
TENSOR_CODEC_IDS: tuple[str, ...] = tuple(
    f"{base}{stage}" for base in TENSOR_CODECS for stage in ("", "+zlib", "+zstd"))
#: The one alias table: old codec names, per what they encode -> the name that says what it does.
RENAMED: dict[str, dict[str, str]] = {
    "features": {"int8": "int8-channel"},
    "hidden": {"int8": "int8-token", "int4": "int4-token"},
}
INPUT_CODEC_RE = re.compile(r"^(jpeg|webp)([1-9][0-9]?|100)$")
#: Learned codec kinds: manifest ``kind`` -> loader module attribute (imported lazily).
LEARNED_KINDS = ("bottleneck", "student")
KNOWN_IDS_TEXT = (f"{', '.join(TENSOR_CODECS)}, <any of those>+zlib or +zstd, jpeg<1-100>, "
                  f"webp<1-100>, png (old name: int8 = int8-channel)")


def canonical_codec_id(codec_id: str, role: str = "features") -> str:
    """The current name of ``codec_id``; ``role`` is ``"features"`` or ``"hidden"`` (LLM)."""
    base, plus, stage = codec_id.partition("+")
    new = RENAMED[role].get(base)
    return codec_id if new is None else f"{new}{plus}{stage}"


def hidden_codec(codec_id: str) -> Codec:
    """The codec an LLM split sends its ``[tokens, hidden]`` states with (any tensor codec).

    Old LLM names ``int8``/``int4`` (+``zlib``) mean ``int8-token``/``int4-token``.
    Raises :class:`UnknownCodecError` naming the valid ids.
    """
    name = canonical_codec_id(codec_id, "hidden") if isinstance(codec_id, str) else codec_id
    if name not in TENSOR_CODEC_IDS:
        raise UnknownCodecError(f"unknown hidden-state codec {codec_id!r}; LLM split codecs: "
                                f"{', '.join(TENSOR_CODECS)}, each alone or +zlib or +zstd "
                                f"(old names: int8 = int8-token, int4 = int4-token)")
    return make_codec(name)


def make_codec(codec_id: str, bundle_dir: str | Path | None = None,
               manifest: Manifest | None = None, split: str | None = None) -> Codec:
    """Build the codec named ``codec_id``.

    Learned codecs need the bundle: ``bundle_dir`` (and its ``manifest``, loaded from
    ``bundle_dir`` if not given); ``split`` picks the entry when several split points
    have a codec of that id. Raises :class:`UnknownCodecError` naming the known ids.
    """
    if not isinstance(codec_id, str) or not codec_id:
        raise UnknownCodecError(f"codec id must be a non-empty string, got {codec_id!r}; "
                                f"known ids: {KNOWN_IDS_TEXT}")
    base, _, stage = canonical_codec_id(codec_id).partition("+")
    if stage:
        if stage not in LOSSLESS_STAGES or base not in TENSOR_CODECS:
            raise _unknown(codec_id, bundle_dir, manifest)
        return (ZlibCodec if stage == "zlib" else ZstdCodec)(TENSOR_CODECS[base]())
    if base in TENSOR_CODECS:
        return TENSOR_CODECS[base]()
    if codec_id == "png":
        return ImageCodec("png")
    match = INPUT_CODEC_RE.match(codec_id)
    if match:
        return ImageCodec(match.group(1), int(match.group(2)))
    entry = _find_entry(codec_id, bundle_dir, manifest, split)
    if entry is None:
        raise _unknown(codec_id, bundle_dir, manifest)
    return _load_learned(entry, Path(bundle_dir))  # type: ignore[arg-type]


def learned_codec_ids(manifest: Manifest | None, split: str | None = None) -> list[str]:
    """Ids of the learned codecs a bundle holds (for ``split`` only, if given)."""
    if manifest is None:
        return []
    return [c.codec for c in manifest.codecs
            if c.kind in LEARNED_KINDS and (split is None or c.split == split)]


def _find_entry(codec_id: str, bundle_dir: str | Path | None, manifest: Manifest | None,
                split: str | None) -> CodecEntry | None:
    if bundle_dir is None:
        return None
    if manifest is None:
        manifest = Manifest.load(bundle_dir)
    found = [c for c in manifest.codecs if c.codec == codec_id and c.kind in LEARNED_KINDS
             and (split is None or c.split == split)]
    if len(found) > 1:
        raise CodecError(f"codec {codec_id!r} exists at split points "
                         f"{[c.split for c in found]}: pass split= to choose one")
    return found[0] if found else None


def _load_learned(entry: CodecEntry, bundle_dir: Path) -> Codec:
    if entry.kind == "student":
        from tether.codecs.student_codec import StudentCodec
        return StudentCodec.from_entry(entry, bundle_dir)
    from tether.codecs.bottleneck import BottleneckCodec   # compressai is imported lazily
    return BottleneckCodec.from_entry(entry, bundle_dir)


def _unknown(codec_id: str, bundle_dir: str | Path | None,
             manifest: Manifest | None) -> UnknownCodecError:
    learned: list[str] = []
    if manifest is None and bundle_dir is not None:
        try:
            manifest = Manifest.load(bundle_dir)
        except Exception:   # noqa: BLE001 - only used to enrich the message
            manifest = None
    if manifest is not None:
        learned = [f"{c.codec}@{c.split}" for c in manifest.codecs if c.kind in LEARNED_KINDS]
    hint = (f"; learned codecs in this bundle: {learned}" if learned else
            "; learned codecs (bottleneck-b<beta>) need a bundle trained with `tether codec train`")
    return UnknownCodecError(f"unknown codec {codec_id!r}; known ids: {KNOWN_IDS_TEXT}{hint}")
