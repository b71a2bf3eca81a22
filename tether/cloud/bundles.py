"""What the cloud serves: one :class:`ServedBundle` per model fingerprint.

A served bundle answers three questions for a request: which tail runs for split ``s``
(``"input"`` = the whole model, full offload), what tensor the tail expects (batch 1), and
which codec decodes the payload. Tails and codecs are built once and cached; building
them is thread-safe because compute threads ask for them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tether.core.bundle import Manifest
from tether.core.errors import BundleError, SplitError, TetherError, UnknownCodecError
from tether.core.protocol import BundleInfo, TensorDesc
from tether.core.types import TensorSpec

log = logging.getLogger(__name__)
INPUT = "input"
#: Parametric image codecs the "input" split accepts besides every tensor codec.
INPUT_CODECS = ("jpeg<q>", "webp<q>", "png")

TailFactory = Callable[[str], Callable[[Any], Any]]


@dataclass
class ServedBundle:
    """One model the cloud serves: its identity, split points, tails and codecs."""

    model_id: str
    fingerprint: str
    input: TensorSpec
    splits: dict[str, TensorSpec]           # crossing tensor (batch 1) per split point
    tail_factory: TailFactory               # split name ("input": whole model) -> callable
    bundle_dir: Path | None = None
    manifest: Manifest | None = None
    _tails: dict[str, Any] = field(default_factory=dict, repr=False)
    _codecs: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "ServedBundle":
        """Serve a bundle directory written by ``tether partition``."""
        from tether.partitioner import BundleModel     # heavy import, only when serving
        model = BundleModel.load(bundle_dir)
        m = model.manifest
        return cls(m.model_id, m.fingerprint, m.input,
                   {e.name: TensorSpec(e.shape, e.dtype) for e in m.split_points},
                   lambda s: model.full_model() if s == INPUT else model.tail(s),
                   Path(bundle_dir), m)

    @classmethod
    def from_module(cls, model_id: str, module: Any, input_spec: TensorSpec, fingerprint: str,
                    splits: list[str] | None = None) -> "ServedBundle":
        """Serve an in-memory model (tests, benchmarks): tails cut with the partitioner."""
        import torch
        from tether.partitioner import find_split_points, split_at
        module.eval()
        example = torch.zeros(input_spec.shape)
        points = {p.name: p for p in find_split_points(module, example)}
        names = list(points) if splits is None else splits
        specs = {n: TensorSpec((1, *points[n].shape[1:]), points[n].dtype) for n in names
                 if _known(n, points, model_id)}
        return cls(model_id, fingerprint, input_spec, specs,
                   lambda s: module if s == INPUT else split_at(module, example, s)[1])

    def expected(self, split: str) -> TensorSpec:
        """The tensor the tail of ``split`` takes (batch 1); SplitError names the valid ones."""
        if split == INPUT:
            return self.input
        spec = self.splits.get(split)
        if spec is None:
            raise SplitError(f"{self.model_id} has no split point {split!r}; valid split "
                             f"points: {[INPUT, *self.splits]}")
        return spec

    def tail(self, split: str) -> Callable[[Any], Any]:
        """The cached tail module of ``split``."""
        self.expected(split)
        tail = self._tails.get(split)
        if tail is None:
            with self._lock:
                tail = self._tails.get(split)
                if tail is None:
                    tail = self._build_tail(split)
                    self._tails[split] = tail
        return tail

    def _build_tail(self, split: str) -> Callable[[Any], Any]:
        try:
            tail = self.tail_factory(split)
        except TetherError:
            raise
        except Exception as exc:
            raise BundleError(f"cannot build the tail of {self.model_id} at {split!r}: {exc}") from exc
        if hasattr(tail, "eval"):
            tail.eval()
        return tail

    def codec(self, split: str, codec_id: str) -> Any:
        """The cached decoder for ``codec_id`` at ``split``; UnknownCodecError if none."""
        key = (split, codec_id)
        codec = self._codecs.get(key)
        if codec is None:
            self.expected(split)
            from tether.codecs import make_codec
            try:
                codec = make_codec(codec_id, self.bundle_dir, self.manifest, split=split)
            except UnknownCodecError:
                raise
            except TetherError as exc:
                raise UnknownCodecError(f"codec {codec_id!r} unavailable at {split!r}: {exc}") from exc
            with self._lock:
                if len(self._codecs) < 1024:     # ids come from the network: bound the cache
                    self._codecs[key] = codec
        return codec

    def warm(self) -> None:
        """Build the tails edges can ask for now (splits with exported heads, or all when the
        bundle has no manifest) and run each once on a dummy batch (first-call allocations,
        kernel selection), so the first requests are not cold."""
        splits = list(self.splits)
        if self.manifest is not None:
            splits = [e.name for e in self.manifest.split_points if e.head] or splits
        for split in (INPUT, *splits):
            self._run_once(split, self.tail(split))
        for entry in self.manifest.codecs if self.manifest is not None else ():
            try:                                   # learned codecs load weights: do it now
                self.codec(entry.split, entry.codec)
            except TetherError as exc:
                log.warning("codec %s at %s unavailable: %s", entry.codec, entry.split, exc)

    def _run_once(self, split: str, tail: Callable[[Any], Any]) -> None:
        import torch
        spec = self.expected(split)
        try:
            with torch.inference_mode():
                tail(torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype)))
        except Exception as exc:  # a tail that cannot run on zeros will say so on real input
            log.warning("warm-up of %s at %s failed: %s", self.model_id, split, exc)

    def info(self) -> BundleInfo:
        """What READY says about this bundle."""
        from tether.codecs import TENSOR_CODEC_IDS     # torch, like every codec: lazily
        learned: list[str] = []
        if self.manifest is not None:
            learned = [c.codec for c in self.manifest.codecs]
        codecs = tuple(dict.fromkeys((*TENSOR_CODEC_IDS, *learned, *INPUT_CODECS)))
        return BundleInfo(self.model_id, self.fingerprint, (INPUT, *self.splits), codecs,
                          TensorDesc(self.input.shape, self.input.dtype))


def _known(name: str, points: dict[str, Any], model_id: str) -> bool:
    if name not in points:
        raise SplitError(f"{model_id} has no split point {name!r}; valid: {list(points)}")
    return True
