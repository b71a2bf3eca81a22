"""``tether.partition``: any torch module -> a bundle the cloud and edge daemons serve.

The bundle is the one ``tether partition`` writes (see :mod:`tether.core.bundle`), so
``tether cloud --bundle DIR`` and ``tether edge --bundle DIR`` serve it unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tether.partitioner.bundles import BundleModel, export_bundle

#: a loaded bundle: ``.manifest``, ``.head(split)``, ``.tail(split)``, ``.full_model()``,
#: ``.head_onnx_path(split)``, ``.cost_table()``, ``.dir``
Bundle = BundleModel


def partition(model: nn.Module | str, example_input: torch.Tensor | None = None,
              out: str | Path | None = None, *, splits: Sequence[str] | None = None,
              method: str = "auto", source: str | None = None,
              leaf_modules: Iterable[str] = (), normalize: Any = "default",
              weights: str | Path | None = None, input_shape: Sequence[int] | None = None,
              threads: int = 1, repeats: int = 10, warmup: int = 2, rounds: int = 3,
              profile: str = "all", progress: bool = False, overwrite: bool = False) -> Bundle:
    """Cut ``model`` at every valid split point, profile it and write a bundle to ``out``.

    ``model``: any ``nn.Module`` (with ``example_input``, a batch-first tensor of the shape and
    dtype it takes) or a model spec string as the CLI takes it (``resnet18``,
    ``pkg.module:attr``, ``file.py:attr``, ``hf:DIR``). ``method``: ``"fx"`` (torch.fx; the
    cloud rebuilds the module from code, so pass ``source="pkg.module:attr"`` for an
    object), ``"export"`` (torch.export; the bundle carries the whole program in
    ``model.pt2``) or ``"auto"`` (fx where it can rebuild and trace, export otherwise).
    ``splits``: names to export ONNX heads for, ``["all"]``, or None (Pareto front).
    ``normalize``: ``"imagenet"``, ``None``/``"none"``, ``(mean, std)`` or ``"default"`` (see
    docs/partitioner.md: the input contract is stated in ``manifest.preprocess``).
    ``out`` defaults to a new temporary directory. Returns the loaded :data:`Bundle`.
    """
    if isinstance(model, nn.Module) and example_input is None and input_shape is None:
        raise TypeError("partition(module, example_input): pass an example input tensor "
                        "(batch first), e.g. torch.rand(1, 3, 224, 224)")
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="tether-bundle-"))
    export_bundle(model, out, weights, splits, input_shape=input_shape, example=example_input,
                  leaf_modules=leaf_modules, method=method, normalize=_normalize(normalize),
                  source=source, threads=threads, repeats=repeats, warmup=warmup,
                  rounds=rounds, progress=progress, overwrite=overwrite,
                  profile_all=profile == "all")
    return BundleModel.load(out)


def _normalize(value: Any) -> Any:
    if isinstance(value, str):
        from tether.partitioner.sources import parse_normalize
        return parse_normalize(value)
    if value is None:
        return None
    mean, std = value
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)

