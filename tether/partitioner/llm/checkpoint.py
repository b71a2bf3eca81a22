"""Where an LLM's config and weights come from, read selectively by each side of the split.

An :class:`LLMCheckpoint` gives the HF config, a fingerprint both sides must agree on,
and :meth:`~LLMCheckpoint.state_dict` restricted to the keys a part needs (HF
``safetensors`` directories read only those tensors). :func:`open_llm` picks the right
kind from a path: a llama2.c ``.bin`` file or a Hugging Face model directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from tether.core.errors import UnknownModelError, WeightsError
from tether.partitioner.llm.llama2c import Llama2cTokenizer, read_llama2c

KeyFilter = Callable[[str], bool]


class LLMCheckpoint:
    """A config plus weights; subclasses implement :meth:`state_dict`."""

    config: Any
    fingerprint: str
    source: dict[str, Any]

    def state_dict(self, keep: KeyFilter) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokenizer(self) -> Any:
        """The matching tokenizer, or None when the checkpoint has none."""
        return None


class StateDictCheckpoint(LLMCheckpoint):
    """An in-memory model or state dict (tests, tiny models built from configs)."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor], tokenizer: Any = None,
                 source: dict[str, Any] | None = None) -> None:
        self.config = config
        self._state = {k: v.detach() for k, v in state.items()}
        self._tokenizer = tokenizer
        self.source = source or {"kind": "memory", "model_type": config.model_type}
        self.fingerprint = _hash_tensors(self._state)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any = None) -> "StateDictCheckpoint":
        return cls(model.config, model.state_dict(), tokenizer)

    def state_dict(self, keep: KeyFilter) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._state.items() if keep(k)}

    def tokenizer(self) -> Any:
        return self._tokenizer


class Llama2cCheckpoint(StateDictCheckpoint):
    """A llama2.c legacy ``.bin`` (parsed whole; each part keeps only its tensors)."""

    def __init__(self, path: str | Path, tokenizer_path: str | Path | None = None) -> None:
        path = Path(path)
        config, state = read_llama2c(path)
        tok_path = Path(tokenizer_path) if tokenizer_path else _sibling_tokenizer(path)
        tok = Llama2cTokenizer.load(tok_path) if tok_path else None
        super().__init__(config, state, tok, {"kind": "llama2c", "path": str(path),
                                              "tokenizer": str(tok_path) if tok_path else None})
        self.fingerprint = _hash_file(path)


class HFDirCheckpoint(LLMCheckpoint):
    """A Hugging Face model directory (``config.json`` + safetensors or ``pytorch_model.bin``)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        try:
            self.config = AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UnknownModelError(f"{path} is not a Hugging Face model directory: {exc}") from exc
        self._files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        if not self._files:
            raise WeightsError(f"{path} has no *.safetensors or *.bin weights; save the model "
                               f"with save_pretrained()")
        self.fingerprint = _hash_files(self._files)
        self.source = {"kind": "hf", "path": str(self.path)}

    def state_dict(self, keep: KeyFilter) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in self._files:
            try:
                out.update(_read_weights(f, keep))
            except (OSError, RuntimeError, ValueError) as exc:
                raise WeightsError(f"cannot read weights {f}: {exc}") from exc
        return out

    def tokenizer(self) -> Any:
        try:
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError):
            return None


#: checkpoint key prefixes older releases wrote -> today's names (GPT-NeoX / Pythia LM head)
LEGACY_PREFIXES = {"embed_out.": "lm_head."}


def canonical_key(key: str) -> str:
    for old, new in LEGACY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _read_weights(f: Path, keep: KeyFilter) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(f), framework="pt") as fh:
            return {canonical_key(k): fh.get_tensor(k) for k in fh.keys()
                    if keep(canonical_key(k))}
    state = torch.load(f, map_location="cpu", weights_only=True)
    return {canonical_key(k): v for k, v in state.items() if keep(canonical_key(k))}


def open_llm(path: str | Path, tokenizer: str | Path | None = None) -> LLMCheckpoint:
    """Open a llama2.c ``.bin`` or an HF model directory."""
    p = Path(path)
    if p.is_dir():
        return HFDirCheckpoint(p)
    if p.is_file():
        return Llama2cCheckpoint(p, tokenizer)
    raise UnknownModelError(f"LLM checkpoint {path} not found: pass a llama2.c .bin file "
                            f"(e.g. ../shared/assets/tinyllm/stories260K.bin) or an HF model directory")


def _sibling_tokenizer(path: Path) -> Path | None:
    for name in ("tok512.bin", "tokenizer.bin"):
        if (path.parent / name).is_file():
            return path.parent / name
    return None


def _hash_file(path: Path) -> str:
    return _hash_files([path])


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _hash_tensors(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(json.dumps([list(t.shape), str(t.dtype)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
