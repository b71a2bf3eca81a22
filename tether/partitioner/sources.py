"""Where a model comes from: the zoo, a Python reference, a Hugging Face folder, an object.

``resolve_model(spec, weights, normalize)`` understands:

- ``cifar_resnet20|32|44|56`` and torchvision classification names (:mod:`.models`);
- ``pkg.module:attr`` (imported with the current directory on ``sys.path``) and
  ``path/to/file.py:attr``; ``attr`` is an ``nn.Module`` instance, an ``nn.Module`` class
  (built with no arguments) or a factory function returning a module;
- ``hf:DIR`` or a directory holding a Hugging Face ``config.json`` (``save_pretrained``):
  vision models (ViT, ConvNeXt, ResNet, ...) take ``pixel_values``, text encoders (BERT, ...)
  take ``input_ids``; the output is ``logits`` (else ``last_hidden_state``). Local files only.

The manifest's ``source`` records how to rebuild a model traced with torch.fx; models that
went through torch.export are rebuilt from the bundle's own ``model.pt2``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tether.core.errors import ModelError, UnknownModelError
from tether.core.types import TensorSpec
from tether.partitioner.models import (
    CIFAR_DEPTHS, IMAGENET_MEAN, IMAGENET_STD, LoadedModel, apply_normalization, build_model,
    fingerprint, load_model, load_state, preprocess_info, read_state_dict,
)

_REF = re.compile(r"^(?P<target>[A-Za-z_][\w.]*|.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")
TEXT_SEQ_LEN = 16
#: source kinds a bundle can rebuild from code (the others ship ``model.pt2``)
REBUILDABLE = ("cifar_resnet", "torchvision", "python")


def parse_normalize(text: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None | str:
    """``imagenet`` -> ImageNet mean/std, ``none`` -> None, ``M1,M2,M3,S1,S2,S3`` or
    ``M,S`` (one value for every channel) -> (mean, std); None/``default`` -> ``"default"``."""
    if text is None or text == "default":
        return "default"
    if text == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if text == "none":
        return None
    try:
        values = tuple(float(v) for v in text.replace("/", ",").split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 6) or any(v <= 0 for v in values[len(values) // 2:]):
        raise ModelError(f"--normalize {text!r}: use imagenet, none, MEAN,STD or "
                         f"M1,M2,M3,S1,S2,S3 (std > 0), e.g. 0.5,0.5")
    half = len(values) // 2
    mean, std = values[:half], values[half:]
    if half == 1:
        mean, std = mean * 3, std * 3
    return mean, std


def is_reference(spec: str) -> bool:
    return bool(_REF.match(spec))


def hf_folder(spec: str) -> Path | None:
    """The folder of an ``hf:DIR`` spec or of a directory with a ``config.json``."""
    path = Path(spec.removeprefix("hf:"))
    if spec.startswith("hf:") or (path.is_dir() and (path / "config.json").is_file()):
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{spec}: {path} holds no config.json; pass a folder written "
                                    f"by save_pretrained() (no downloads happen here)")
        return path
    return None


def resolve_model(spec: str, weights: str | Path | None = None,
                  normalize: Any = "default") -> LoadedModel:
    """A :class:`LoadedModel` for a CLI model spec (see the module docstring)."""
    folder = hf_folder(spec)
    if folder is not None:
        return load_hf(folder, normalize)
    if is_reference(spec):
        return load_reference(spec, weights, normalize)
    if spec.endswith(".py") or (":" in spec and not Path(spec).exists()):
        raise UnknownModelError(f"model {spec!r}: write pkg.module:attr or path/to/file.py:attr")
    return load_model(spec, weights, normalize=normalize)


def load_reference(ref: str, weights: str | Path | None, normalize: Any,
                   root: str | Path | None = None) -> LoadedModel:
    """Import ``ref`` and build its module (seeded, eval), optionally loading ``weights``."""
    root = Path(root or Path.cwd()).resolve()
    module = build_reference(ref, root)
    norm = None if normalize == "default" else normalize
    if norm is not None:
        apply_normalization(module, *norm)
    source = {"model_id": ref.rsplit(":", 1)[1], "kind": "python", "ref": ref,
              "root": str(root), "weights": None, "normalize": _norm_dict(norm)}
    if weights is not None:
        load_state(module, read_state_dict(weights), origin=str(weights))
        source["weights"] = str(Path(weights).resolve())
    return LoadedModel(module=module, input=TensorSpec((1, 3, 224, 224)), source=source,
                       fingerprint=fingerprint(module), preprocess=image_contract(norm))


def build_reference(ref: str, root: Path) -> nn.Module:
    """``pkg.module:attr`` or ``file.py:attr`` -> a fresh eval module (seeded weights)."""
    match = _REF.match(ref)
    if match is None:
        raise UnknownModelError(f"model {ref!r}: write pkg.module:attr or path/to/file.py:attr")
    target, attr = match["target"], match["attr"]
    pymod = _import_file(root / target if not Path(target).is_absolute() else Path(target)) \
        if target.endswith(".py") else _import_module(target, root)
    obj: Any = pymod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownModelError(f"{ref}: {getattr(obj, '__name__', obj)!r} has no "
                                    f"attribute {part!r}")
        obj = getattr(obj, part)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            module = obj() if not isinstance(obj, nn.Module) and callable(obj) else obj
        except Exception as exc:  # noqa: BLE001 - the user's code: any error, one line
            raise ModelError(f"{ref}: calling it failed: {exc}; point at a module instance, a "
                             f"class or a factory that takes no arguments") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"{ref} gave a {type(module).__name__}, not a torch.nn.Module: point "
                         f"at a module instance, a module class or a factory returning one")
    return module.eval()


def _import_module(name: str, root: Path) -> Any:
    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UnknownModelError(f"cannot import {name!r} (from {root}): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise ModelError(f"importing {name!r} (from {root}) failed: {exc}") from exc
    finally:
        if added:
            sys.path.remove(str(root))


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UnknownModelError(f"model file {path} does not exist")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"tether_user_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UnknownModelError(f"cannot import {path} as Python")
    pymod = importlib.util.module_from_spec(spec)
    sys.modules[name] = pymod
    try:
        spec.loader.exec_module(pymod)
    except Exception as exc:
        del sys.modules[name]
        raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return pymod


def rebuild(source: dict[str, Any], model_id: str) -> nn.Module:
    """The architecture a fx-traced bundle was cut from (weights loaded by the caller)."""
    kind = source.get("kind")
    norm = _norm_tuple(source.get("normalize", "default"))
    if kind == "python":
        module = build_reference(source["ref"], Path(source.get("root") or Path.cwd()))
        if norm is not None and norm != "default":
            apply_normalization(module, *norm)
        return module
    return build_model(model_id, normalize=norm)


def _norm_dict(norm: Any) -> Any:
    if norm == "default":
        return "default"
    return None if norm is None else {"mean": list(norm[0]), "std": list(norm[1])}


def _norm_tuple(value: Any) -> Any:
    if value == "default" or value is None:
        return value
    return tuple(value["mean"]), tuple(value["std"])


def image_contract(norm: Any) -> dict[str, Any]:
    """The manifest's ``preprocess`` for an image model normalised with ``norm``."""
    return preprocess_info("", norm)


class HFOutput(nn.Module):
    """A transformers model as one tensor in, one tensor out (``logits``, else the last
    hidden state)."""

    def __init__(self, model: nn.Module, input_name: str) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(**{self.input_name: x}, return_dict=True)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def load_hf(folder: Path, normalize: Any = "default") -> LoadedModel:
    """A Hugging Face model saved with ``save_pretrained`` (local files only)."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("Hugging Face models need transformers: pip install "
                         "'tether[llm]'") from exc
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        model = (cls or transformers.AutoModel).from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"transformers cannot load {folder}: {exc}") from exc
    model.eval()
    name = getattr(model, "main_input_name", "input_ids")
    wrapped = HFOutput(model, name).eval()
    source = {"model_id": folder.resolve().name, "kind": "hf", "path": str(folder.resolve()),
              "architecture": arch, "weights": None}
    if name == "pixel_values":
        norm = _hf_normalization(folder) if normalize == "default" else normalize
        if norm is not None:
            apply_normalization(wrapped, *norm)
        size = config.get("image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        spec, preprocess = TensorSpec((1, config.get("num_channels", 3), size, size)), \
            image_contract(norm)
        source["normalize"] = _norm_dict(norm)
    else:
        spec = TensorSpec((1, TEXT_SEQ_LEN), "int64")
        preprocess = {"layout": "NL", "dtype": "int64", "contract": "token ids [N, L] from the "
                      "model's tokenizer", "vocab_size": config.get("vocab_size")}
    return LoadedModel(module=wrapped, input=spec, source=source,
                       fingerprint=fingerprint(wrapped), preprocess=preprocess)


def _hf_normalization(folder: Path) -> Any:
    """mean/std from the folder's image-processor config, else none."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if not cfg.get("do_normalize", True) or "image_mean" not in cfg:
        return None
    return tuple(cfg["image_mean"]), tuple(cfg["image_std"])


def default_kind_is_rgb(source: dict[str, Any]) -> bool:
    return source.get("kind") in ("cifar_resnet", "torchvision") or \
        source.get("model_id") in CIFAR_DEPTHS
