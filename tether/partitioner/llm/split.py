"""Split a decoder-only HF causal LM at decoder layer ``k`` into an edge part and a cloud part.

The edge part (:class:`EdgeLM`) holds the embeddings and layers ``[0, k)``, plus the final
norm and LM head for early exits; the cloud part (:class:`CloudLM`) holds layers
``[k, L)``, the final norm and the LM head. Each part is an HF model of the same family
built from a copy of the config with fewer layers and loaded from the checkpoint keys it
needs only (renumbered), so each side keeps its own HF ``DynamicCache`` per session and the
family's own attention, RoPE and masking code runs unchanged. ``k = 0`` puts every layer in
the cloud (Petals-style thin client), ``k = L`` everything on the edge.

Every family whose blocks follow embed -> blocks -> final norm -> LM head: Llama, Qwen2,
Mistral, Phi-3 (``model.layers``, ``model.norm``), Phi (``model.final_layernorm``),
GPT-NeoX / Pythia (``gpt_neox.layers``, ``gpt_neox.final_layer_norm``) and GPT-2
(``transformer.h``); :data:`FAMILIES` is the one mapping of them.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tether.core.errors import SplitError, UnknownModelError, WeightsError
from tether.partitioner.llm.checkpoint import LLMCheckpoint


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its parts (state-dict prefixes and config names)."""

    base: str                   # attribute of the CausalLM holding the base model
    layers: str                 # attribute of the base model holding the layer list
    embeds: tuple[str, ...]     # base-model attributes used only by the edge
    norm: str                   # base-model attribute of the final norm
    n_layers_attr: str          # config attribute with the layer count
    zero_on_cloud: tuple[str, ...] = ()   # embeddings the cloud must neutralise (GPT-2 wpe)

    def prefix(self, attr: str) -> str:
        return f"{self.base}.{attr}."


_HF_STD = Family("model", "layers", ("embed_tokens",), "norm", "num_hidden_layers")
FAMILIES: dict[str, Family] = {
    "llama": _HF_STD, "qwen2": _HF_STD, "mistral": _HF_STD, "phi3": _HF_STD,
    "phi": Family("model", "layers", ("embed_tokens",), "final_layernorm", "num_hidden_layers"),
    "gpt_neox": Family("gpt_neox", "layers", ("embed_in",), "final_layer_norm",
                       "num_hidden_layers"),
    "gpt2": Family("transformer", "h", ("wte", "wpe"), "ln_f", "n_layer", ("wpe",)),
}


def family_of(config: Any) -> Family:
    fam = FAMILIES.get(getattr(config, "model_type", ""))
    if fam is None:
        raise UnknownModelError(f"LLM family {config.model_type!r} is not supported for splitting; "
                                f"supported: {sorted(FAMILIES)}")
    return fam


def num_layers(config: Any) -> int:
    return int(getattr(config, family_of(config).n_layers_attr))


def sub_config(config: Any, first: int, count: int, tie: bool) -> Any:
    """A copy of ``config`` for layers ``[first, first + count)``."""
    fam = family_of(config)
    cfg = copy.deepcopy(config)
    setattr(cfg, fam.n_layers_attr, count)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)):
        cfg.layer_types = list(types)[first:first + count]
    cfg.tie_word_embeddings = tie
    return cfg


def _check_k(config: Any, k: int) -> int:
    n = num_layers(config)
    if not isinstance(k, int) or not 0 <= k <= n:
        raise SplitError(f"split layer {k!r} out of range: valid split layers are 0..{n} "
                         f"(edge keeps layers [0, k), the cloud [k, {n}))")
    return n


class _ZeroPositions(nn.Module):
    """Stands in for absolute position embeddings the edge already added (GPT-2 wpe)."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1)


def _layer_keys(fam: Family, first: int, count: int):
    """Filter and renamer: checkpoint keys of layers [first, first+count) -> 0-based."""
    pre = fam.prefix(fam.layers)

    def rename(key: str) -> str | None:
        if not key.startswith(pre):
            return None
        idx, rest = key[len(pre):].split(".", 1)
        i = int(idx) - first
        return f"{pre}{i}.{rest}" if 0 <= i < count else None
    return rename


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:
    """How ``cls.forward`` takes the KV cache: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword arguments that hand ``cache`` to ``model`` (any transformers version)."""
    return {_cache_keyword(type(model)): cache, "use_cache": cache is not None}


def _build(cfg: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except (ValueError, ImportError):
        return AutoModelForCausalLM.from_config(cfg)


def _load(model: nn.Module, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...]) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if not any(k.startswith(a) for a in allowed_missing) and "rotary" not in k
               and not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if missing or result.unexpected_keys:
        raise WeightsError(f"checkpoint does not fit the split model: missing {missing[:4]}, "
                           f"unexpected {result.unexpected_keys[:4]}; is the checkpoint complete?")


def _head_state(ckpt: LLMCheckpoint, fam: Family) -> dict[str, torch.Tensor]:
    """Final norm and LM head with its bias if any (from the embeddings when the checkpoint
    ties them)."""
    norm = fam.prefix(fam.norm)
    emb = fam.prefix(fam.embeds[0]) + "weight"
    state = ckpt.state_dict(lambda k: k.startswith(norm) or k.startswith("lm_head."))
    if "lm_head.weight" not in state:   # tied: the head is the embedding table
        tied = ckpt.state_dict(lambda k: k == emb)
        if emb not in tied:
            raise WeightsError("checkpoint has neither lm_head.weight nor tied embeddings")
        state["lm_head.weight"] = tied[emb]
    return state


class EdgeLM(nn.Module):
    """Embeddings + layers ``[0, k)``; ``forward`` returns pre-norm hidden states at layer k."""

    def __init__(self, ckpt: LLMCheckpoint, k: int, with_exit: bool = True) -> None:
        super().__init__()
        self.n_layers = _check_k(ckpt.config, k)
        self.k, self.fam, self.config = k, family_of(ckpt.config), ckpt.config
        tie = bool(getattr(ckpt.config, "tie_word_embeddings", False))
        lm = _build(sub_config(ckpt.config, 0, k, tie=tie and with_exit))
        rename = _layer_keys(self.fam, 0, k)
        embeds = tuple(self.fam.prefix(e) for e in self.fam.embeds)
        raw = ckpt.state_dict(lambda key: rename(key) is not None or key.startswith(embeds))
        state = {rename(key) or key: v for key, v in raw.items()}
        if with_exit:
            state.update(_head_state(ckpt, self.fam))
        allowed = () if with_exit else ("lm_head", self.fam.prefix(self.fam.norm))
        _load(lm, state, allowed)
        self.base = getattr(lm, self.fam.base).eval()
        self.exit_norm: nn.Module | None = getattr(self.base, self.fam.norm) if with_exit else None
        setattr(self.base, self.fam.norm, nn.Identity())
        self.lm_head: nn.Module | None = lm.lm_head.eval() if with_exit else None
        self.exit_head: nn.Module | None = None     # a trained ExitHead, if attached
        self.eval()

    def new_cache(self) -> Any:
        from transformers import DynamicCache
        return DynamicCache()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: Any = None, start: int = 0) -> torch.Tensor:
        """Hidden states ``[B, T, D]`` after layer ``k`` for positions ``start..start+T``.

        Appends to ``cache``; ``start`` must equal the tokens already in it.
        """
        pos = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
        out = self.base(input_ids=input_ids, position_ids=pos, **with_cache(self.base, cache))
        return out.last_hidden_state

    @torch.no_grad()
    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits at layer ``k`` (the CE-CoLLM early exit).

        The attached trained :attr:`exit_head` if any, else the raw final norm + LM head.
        """
        if self.lm_head is None or self.exit_norm is None:
            raise SplitError("this edge part was built without the early-exit head "
                             "(build it with with_exit=True)")
        if self.exit_head is not None:
            return self.exit_head(hidden).float()
        return self.lm_head(self.exit_norm(hidden)).float()


class CloudLM(nn.Module):
    """Layers ``[k, L)`` + final norm + LM head, fed hidden states from the edge."""

    def __init__(self, ckpt: LLMCheckpoint, k: int) -> None:
        super().__init__()
        self.n_layers = _check_k(ckpt.config, k)
        self.k, self.fam, self.config = k, family_of(ckpt.config), ckpt.config
        count = self.n_layers - k
        lm = _build(sub_config(ckpt.config, k, count, tie=False))
        base = getattr(lm, self.fam.base)
        for name in self.fam.embeds:   # the cloud never looks tokens up: drop the tables
            setattr(base, name, _ZeroPositions() if name in self.fam.zero_on_cloud
                    else nn.Embedding(1, 1))
        rename = _layer_keys(self.fam, k, count)
        state = {rename(key): v for key, v in ckpt.state_dict(lambda x: rename(x) is not None).items()}
        state.update(_head_state(ckpt, self.fam))
        _load(lm, state, tuple(self.fam.prefix(e) for e in self.fam.embeds))
        self.base, self.lm_head = base.eval(), lm.lm_head.eval()
        self.eval()

    def new_cache(self) -> Any:
        from transformers import DynamicCache
        return DynamicCache()

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, cache: Any = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        """Logits (float32) for ``hidden`` ``[B, T, D]``; only the last position if ``last_only``."""
        dtype = next(self.lm_head.parameters()).dtype
        out = self.base(inputs_embeds=hidden.to(dtype), attention_mask=attention_mask,
                        position_ids=position_ids, **with_cache(self.base, cache))
        h = out.last_hidden_state
        return self.lm_head(h[:, -1:] if last_only else h).float()


def split_llm(ckpt: LLMCheckpoint, k: int, with_exit: bool = True) -> tuple[EdgeLM, CloudLM]:
    """Both parts at layer ``k`` (in one process: tests, benchmarks, local fallback)."""
    return EdgeLM(ckpt, k, with_exit), CloudLM(ckpt, k)


def full_model(ckpt: LLMCheckpoint) -> nn.Module:
    """The whole causal LM (reference for equality tests and perplexity)."""
    model = _build(copy.deepcopy(ckpt.config))
    state = ckpt.state_dict(lambda key: True)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state[family_of(ckpt.config).prefix(
            family_of(ckpt.config).embeds[0]) + "weight"]
    _load(model, state, ())
    return model.eval()


def split_name(k: int) -> str:
    """Wire name of the split at layer ``k`` (``"layer3"``)."""
    return f"layer{k}"


def parse_split(name: str, config: Any) -> int:
    """Layer index of a split name (``"layer3"`` or ``"3"``), validated against ``config``."""
    text = name.removeprefix("layer") if isinstance(name, str) else ""
    if not text.isdigit():
        raise SplitError(f"LLM split {name!r} is not of the form layer<k>; valid: "
                         f"layer0..layer{num_layers(config)}")
    k = int(text)
    _check_k(config, k)
    return k
