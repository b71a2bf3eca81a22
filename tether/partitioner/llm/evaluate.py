"""Quality of the LLM split: loss through a hidden-state codec, early-exit calibration.

Texts are tokenised with BOS first; the loss is the mean next-token cross-entropy in nats
over all predicted tokens of all texts (the shared assets' 1.266 nats/token protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tether.core.errors import ConfigError
from tether.partitioner.llm.split import CloudLM, EdgeLM


def split_stories(text: str, separator: str = "<|endoftext|>") -> list[str]:
    """Stories of a TinyStories-style file, stripped, empty ones dropped."""
    return [s.strip() for s in text.split(separator) if s.strip()]


@torch.no_grad()
def split_loss(edge: EdgeLM, cloud: CloudLM, token_lists: Sequence[Sequence[int]],
               through: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean nats/token of the split model, ``[T, D]`` hidden states passed ``through`` what
    crosses the cut (e.g. ``tether.codecs.wire_roundtrip(codec)``)."""
    total, count = 0.0, 0
    for ids in token_lists:
        x = torch.tensor([list(ids)])
        h = edge(x)[0]
        if through is not None:
            h = through(h)
        logits = cloud(h.unsqueeze(0), last_only=False)[0]
        total += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return total / max(count, 1)


@dataclass(frozen=True)
class ExitPoint:
    """Early exit at one confidence threshold: how often it fires, how often it is right."""

    threshold: float
    exit_rate: float       # fraction of tokens answered on the edge
    agreement: float       # of those, fraction equal to the full model's greedy token
    overall_agreement: float   # all tokens, exits and cloud answers together


@torch.no_grad()
def exit_curve(edge: EdgeLM, cloud: CloudLM, token_lists: Sequence[Sequence[int]],
               thresholds: Sequence[float]) -> list[ExitPoint]:
    """Teacher-forced exit statistics: edge max-softmax vs the full model's argmax."""
    conf, agree = [], []
    for ids in token_lists:
        h = edge(torch.tensor([list(ids)]))
        probs = edge.exit_logits(h)[0].softmax(-1)
        full = cloud(h, last_only=False)[0].argmax(-1)
        top, arg = probs.max(-1)
        conf.append(top)
        agree.append(arg == full)
    c, a = torch.cat(conf), torch.cat(agree)
    points = []
    for t in thresholds:
        fire = c >= t
        n = int(fire.sum())
        points.append(ExitPoint(float(t), n / len(c), float(a[fire].float().mean()) if n else 1.0,
                                float((a | ~fire).float().mean())))
    return points


def calibrate_threshold(points: Sequence[ExitPoint], min_agreement: float) -> ExitPoint:
    """The lowest threshold whose exits agree with the full model at least ``min_agreement``."""
    if not 0.0 < min_agreement <= 1.0:
        raise ConfigError(f"min_agreement must be in (0, 1], got {min_agreement}")
    ok = [p for p in points if p.exit_rate > 0 and p.agreement >= min_agreement]
    if not ok:
        return ExitPoint(math.inf, 0.0, 1.0, 1.0)
    return min(ok, key=lambda p: p.threshold)


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer.encode(t)) for t in texts]


def split_paragraphs(text: str, limit: int | None = None) -> list[str]:
    """Blank-line separated paragraphs (the validation-head file lost its story boundaries)."""
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return paras[:limit] if limit is not None else paras
