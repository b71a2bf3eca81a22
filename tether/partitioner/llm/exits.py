"""Learned early exits for the edge part (CE-CoLLM style), trained by distillation.

The raw exit (final norm + LM head applied at layer ``k``) mostly copies the current token
on small models: the residual stream at early layers still looks like the input embedding.
:class:`ExitHead` adds a zero-initialised linear adapter and its own copy of the final norm
in front of the (frozen, shared) LM head; :func:`train_exit_head` fits them so the exit's
distribution matches the whole model's (KL divergence, teacher forcing). Only the adapter
and norm are saved (``torch.save`` of a small state dict; loaded with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tether.core.errors import WeightsError
from tether.core.types import read_json, write_json_atomic
from tether.partitioner.llm.split import CloudLM, EdgeLM


class ExitHead(nn.Module):
    """``lm_head(norm(h + adapter(h)))`` at layer ``k``."""

    def __init__(self, dim: int, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.adapter = nn.Linear(dim, dim)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        self.norm = copy.deepcopy(norm)
        self.lm_head = lm_head
        for p in self.lm_head.parameters():
            p.requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden + self.adapter(hidden)))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm_head.")}


def new_exit_head(edge: EdgeLM) -> ExitHead:
    if edge.exit_norm is None or edge.lm_head is None:
        raise WeightsError("the edge part has no final norm / LM head: build it with with_exit=True")
    return ExitHead(int(edge.config.hidden_size), edge.exit_norm, edge.lm_head)


def train_exit_head(edge: EdgeLM, cloud: CloudLM, token_lists: Sequence[Sequence[int]],
                    steps: int = 300, lr: float = 3e-3, seed: int = 0) -> ExitHead:
    """Distil the whole model's next-token distribution into an exit head at layer ``k``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        hidden, teacher = [], []
        for ids in token_lists:
            h = edge(torch.tensor([list(ids)]))[0]
            hidden.append(h)
            teacher.append(cloud(h.unsqueeze(0), last_only=False)[0].log_softmax(-1))
        h_all, t_all = torch.cat(hidden), torch.cat(teacher)
    head = new_exit_head(edge)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    batch = min(1024, len(h_all))
    for _ in range(steps):
        idx = torch.randint(0, len(h_all), (batch,))
        loss = F.kl_div(head(h_all[idx]).log_softmax(-1), t_all[idx], log_target=True,
                        reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def save_exit_head(head: ExitHead, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write the adapter + norm to ``path`` and ``meta`` (split, threshold, ...) beside it."""
    torch.save(head.trainable_state(), Path(path))
    if meta is not None:
        write_json_atomic(Path(path).with_suffix(".json"), meta)


def read_exit_meta(path: str | Path) -> dict[str, Any]:
    """The JSON written beside an exit head (empty when there is none)."""
    side = Path(path).with_suffix(".json")
    return dict(read_json(side)) if side.is_file() else {}


def load_exit_head(edge: EdgeLM, path: str | Path) -> ExitHead:
    """An exit head for ``edge`` with the adapter and norm saved at ``path``."""
    head = new_exit_head(edge)
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        result = head.load_state_dict(state, strict=False)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"cannot load exit head {path}: {exc}") from exc
    bad = [k for k in result.missing_keys if not k.startswith("lm_head.")]
    if bad or result.unexpected_keys:
        raise WeightsError(f"exit head {path} does not fit this model (missing {bad[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]})")
    return head.eval()
