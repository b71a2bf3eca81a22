"""The one token sampler of the split LLM: cloud engine, edge exits and the whole model.

:func:`choose_token` turns next-token logits into a token under :class:`SamplingParams`:
greedy (``temperature == 0``) is the argmax; otherwise temperature, then top-k, then top-p
(the order of Hugging Face's logits warpers), then one inverse-CDF draw in token-id order.

The draw for token position ``t`` (the token's index in the whole sequence, prompt
included) is :func:`uniform` ``(seed, t)``: output number ``t`` of SplitMix64 started from
the mixed seed, a counter-based generator that needs no state and is specified in a few
lines (any language reproduces it). Whoever produces token ``t`` -- the cloud, a confident
edge exit, the edge alone when the cloud is down, or the whole model in one process --
draws the same number, so seeded sampling through the split gives the whole model's
tokens. The CDF runs in token-id order (not sorted by probability), so logits that differ
in the last float bits (a split, a batch, an fp32 codec) move the choice only when the draw
falls within that difference of a boundary. Pure torch, no IO.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tether.core.errors import ConfigError
from tether.core.sampling import GREEDY, SamplingParams

__all__ = ["GREEDY", "SamplingParams", "choose_token", "choose_tokens", "generate_whole",
           "sampling_probs", "uniform"]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15      # SplitMix64's increment (2**64 / golden ratio)


def _mix64(z: int) -> int:
    """SplitMix64's output function (Stafford's variant 13)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, position: int) -> float:
    """The draw in ``[0, 1)`` for token position ``position`` of a stream seeded ``seed``."""
    if position < 0:
        raise ConfigError(f"token position must be >= 0, got {position}")
    state = (_mix64(seed & _MASK64) + (position + 1) * _GAMMA) & _MASK64
    return (_mix64(state) >> 11) * 2.0 ** -53


def _candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (ascending) that survive the filters, and their probabilities (float64)."""
    if params.greedy:
        raise ConfigError("greedy settings have no sampling distribution: use choose_token")
    z = logits.detach().reshape(-1).to(torch.float64)
    z = (z - z.max()) / params.temperature          # max first: a tiny temperature cannot overflow
    if 0 < params.top_k < z.numel():
        kth = torch.topk(z, params.top_k, sorted=False).values.min()
        ids = torch.nonzero(z >= kth).reshape(-1)   # ties with the k-th stay, as in HF
    else:
        ids = torch.arange(z.numel(), device=z.device)
    probs = torch.softmax(z[ids], -1)
    if params.top_p < 1.0:
        keep = _nucleus(probs, params.top_p)
        ids, probs = ids[keep], probs[keep]
        probs = probs / probs.sum()
    return ids, probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Positions of the smallest most-likely set holding ``top_p`` (ascending). Partial
    sorts of growing size: a peaked distribution never sorts the whole vocabulary."""
    k, n = min(64, probs.numel()), probs.numel()
    while True:
        ordered, order = torch.topk(probs, k)             # descending
        if k == n or float(ordered.sum()) >= top_p:
            break
        k = min(8 * k, n)
    before = ordered.cumsum(0) - ordered                  # mass of the more likely tokens
    keep = before < top_p
    keep[0] = True                                        # the most likely token always stays
    return order[keep].sort().values


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from (float64 ``[V]``): temperature, top-k, then top-p."""
    ids, probs = _candidates(logits, params)
    out = torch.zeros(logits.numel(), dtype=torch.float64, device=probs.device)
    out[ids] = probs
    return out


def choose_token(logits: torch.Tensor, params: SamplingParams, position: int) -> tuple[int, float]:
    """The token for ``position`` and its probability (greedy: under the model; sampling:
    under the filtered distribution). ``logits`` is ``[V]`` (or ``[1, V]``)."""
    if params.greedy:
        probs = logits.detach().reshape(-1).float().softmax(-1)
        p, token = probs.max(-1)
        return int(token), float(p)
    if params.seed is None:
        raise ConfigError("sampling needs a seed: call SamplingParams.resolved() first")
    ids, probs = _candidates(logits, params)
    cdf = probs.cumsum(0)                                 # in token-id order
    target = torch.tensor([uniform(params.seed, position) * float(cdf[-1])], dtype=torch.float64,
                          device=cdf.device)
    pick = min(int(torch.searchsorted(cdf, target, right=True)[0]), probs.numel() - 1)
    if not float(probs[pick]) > 0:                        # NaN logits: no usable distribution
        raise ConfigError("the logits hold no finite distribution to sample from")
    return int(ids[pick]), float(probs[pick])


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  positions: Sequence[int]) -> list[tuple[int, float]]:
    """:func:`choose_token` for each row of ``[B, V]`` logits (a batched decode step)."""
    if len(params) != logits.shape[0] or len(positions) != logits.shape[0]:
        raise ConfigError(f"{logits.shape[0]} logit rows but {len(params)} settings and "
                          f"{len(positions)} positions")
    return [choose_token(row, p, t) for row, p, t in zip(logits, params, positions)]


@torch.no_grad()
def generate_whole(model: Any, prompt: Sequence[int], max_new_tokens: int,
                   params: SamplingParams = GREEDY) -> list[int]:
    """The whole model's continuation of ``prompt`` under ``params`` (the reference the
    split must reproduce); ``model`` is a Hugging Face causal LM (:func:`full_model`)."""
    from transformers import DynamicCache

    from tether.partitioner.llm.split import with_cache
    params = params.resolved()
    ids = list(prompt)
    if not ids:
        raise ConfigError("empty prompt: pass at least one token id")
    cache = with_cache(model, DynamicCache())
    logits = model(torch.tensor([ids]), **cache).logits[0, -1]
    new: list[int] = []
    for _ in range(max_new_tokens):
        token, _p = choose_token(logits, params, len(ids))
        ids.append(token)
        new.append(token)
        logits = model(torch.tensor([[token]]), **cache).logits[0, -1]
    return new
