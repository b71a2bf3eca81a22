"""Sampling settings of one generation: temperature, top-k, top-p and the seed (no torch).

A frozen, validated value shared by the wire (the session's PREFILL), the edge, the cloud's
LLM engine, the OpenAI front and the CLI; the sampler itself (torch) is
:mod:`tether.partitioner.llm.sampling`. ``temperature == 0`` is greedy (the default), exactly
the whole model's argmax; ``top_k == 0`` and ``top_p == 1`` switch those filters off. A seed
makes sampling reproducible: the random draw for token position ``t`` is a pure function
of ``(seed, t)``, so whoever produces that token (cloud, edge exit, local fallback, the whole
model) draws the same number. ``seed=None`` asks for a fresh random seed per stream
(:meth:`SamplingParams.resolved`), recorded so the stream can be replayed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace

from tether.core.errors import ConfigError

SEED_LIMIT = 1 << 64        # seeds are unsigned 64-bit integers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the model's logits."""

    temperature: float = 0.0      # 0: greedy (argmax)
    top_k: int = 0                # keep the k most likely tokens; 0: all
    top_p: float = 1.0            # keep the smallest set holding this probability; 1: all
    seed: int | None = None       # None: a fresh random seed per stream

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), "
                              f"got {self.temperature!r:.40}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r:.40}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r:.40}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r:.40}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def resolved(self) -> "SamplingParams":
        """These settings with a seed: a fresh random one when sampling without one."""
        if self.seed is not None or self.greedy:
            return self
        return replace(self, seed=secrets.randbits(63))

    def describe(self) -> str:
        """One line for logs and summaries."""
        if self.greedy:
            return "greedy"
        return (f"temperature {self.temperature:g}, top_k {self.top_k}, top_p {self.top_p:g}, "
                f"seed {self.seed}")


GREEDY = SamplingParams()
