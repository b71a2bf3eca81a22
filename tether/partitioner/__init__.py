"""DNN partitioner: split points, head/tail modules, ONNX heads, profiling and bundles.

API (stable; others build on it):

- ``load_model(model_id, weights=None) -> LoadedModel`` with ``.module`` (eval ``nn.Module``
  taking float RGB NCHW in [0, 1]; normalisation is inside), ``.input`` (``TensorSpec``, batch
  1), ``.source`` (dict to rebuild it), ``.fingerprint`` (sha256 of the state dict),
  ``.preprocess``. Ids: ``cifar_resnet20|32|44|56`` and any torchvision classification name;
  ``weights`` = state-dict path, torchvision enum name (``DEFAULT``...), or None (seeded random).
- ``find_split_points(module, example, leaf_modules=()) -> list[SplitPoint]`` (input -> output;
  ``name, index, shape, dtype, bytes, node``); ``split_at(module, example, name) -> (head, tail)``
  with ``tail(head(x)) == module(x)``. ``SplitGraph(module, example)`` does both from one trace.
  Untraceable models raise ``NotTraceableError`` naming the module to pass in ``leaf_modules``.
- ``resolve_model(spec, weights=None, normalize="default") -> LoadedModel`` for any CLI model
  spec: zoo names, ``pkg.module:attr``, ``path/file.py:attr``, ``hf:DIR`` (:mod:`.sources`).
- ``export_bundle(model, out_dir, weights=None, splits=None, input_shape=None, example=None,
  method="auto"|"fx"|"export", normalize=..., source=None, threads=1, repeats=20, rounds=3,
  ...) -> Manifest`` writes the layout of :mod:`tether.core.bundle` (manifest last); ``model``
  is a spec string, an ``nn.Module`` or a ``LoadedModel``. The torch.export path
  (:mod:`.exported`) stores the program as ``model.pt2`` (self-contained bundle).
- ``BundleModel.load(dir)``: ``.manifest``, ``.full_model()``, ``.head(split)``, ``.tail(split)``
  (torch, eval, cached), ``.head_onnx_path(split)``, ``.onnx_head(split, threads)``,
  ``.full_onnx_path()``, ``.cost_table()`` (points with an ONNX head; ``exported_only=False``:
  all), ``.exported_splits``,
  ``.example()``. ``profile_bundle(dir)`` re-profiles and rewrites ``costs.json``.
- ``OnnxModule(path, threads=1)``: ONNX Runtime CPU session, ``__call__(ndarray) -> ndarray``.

Importing this package needs only torch/torchvision/onnx/onnxruntime (not transformers).
"""

from tether.partitioner.bundles import BundleModel, export_bundle, input_spec, profile_bundle
from tether.partitioner.models import (
    CIFAR10_CLASSES, LoadedModel, build_model, fingerprint, known_model_ids, load_model,
)
from tether.partitioner.onnxrt import OnnxModule, export_onnx
from tether.partitioner.profile import (
    example_input, format_cost_table, pareto_front, profile_graph, split_flops,
)
from tether.partitioner.sources import resolve_model
from tether.partitioner.splits import SplitGraph, SplitPoint, find_split_points, split_at, trace

__all__ = [
    "BundleModel", "CIFAR10_CLASSES", "LoadedModel", "OnnxModule", "SplitGraph", "SplitPoint",
    "build_model", "example_input", "export_bundle", "export_onnx", "find_split_points",
    "fingerprint", "format_cost_table", "input_spec", "known_model_ids", "load_model",
    "pareto_front", "profile_bundle", "profile_graph", "resolve_model", "split_at", "split_flops",
    "trace",
]
