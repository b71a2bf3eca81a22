"""tether: split computing and cloud-edge offloading for DNNs and LLMs.

Public API (imported lazily: ``import tether`` stays fast)::

    bundle = tether.partition(model, example_input, "out/mynet")   # any torch module
    bundle.manifest.split_names, bundle.head("layer2"), bundle.tail("layer2")
    tether.find_split_points(model, x); head, tail = tether.split_at(model, x, "layer2")
    tether.Bundle.load("out/mynet"); tether.load_model("resnet18")
    tether.EdgeClient, tether.CloudServer, tether.EdgeAgent ... (see ``__all__``)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "partition": "tether.api",
    "Bundle": "tether.api",
    "find_split_points": "tether.partitioner",
    "split_at": "tether.partitioner",
    "SplitPoint": "tether.partitioner",
    "load_model": "tether.partitioner",
    "export_bundle": "tether.partitioner",
    "profile_bundle": "tether.partitioner",
    "Manifest": "tether.core.bundle",
    "CostTable": "tether.core.types",
    "TensorSpec": "tether.core.types",
    "TetherError": "tether.core.errors",
    "make_codec": "tether.codecs",
    "EdgeClient": "tether.edge",
    "EdgeAgent": "tether.edge",
    "CloudServer": "tether.cloud",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from tether.api import Bundle, partition
    from tether.cloud import CloudServer
    from tether.codecs import make_codec
    from tether.core.bundle import Manifest
    from tether.core.errors import TetherError
    from tether.core.types import CostTable, TensorSpec
    from tether.edge import EdgeAgent, EdgeClient
    from tether.partitioner import (
        SplitPoint, export_bundle, find_split_points, load_model, profile_bundle, split_at,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
