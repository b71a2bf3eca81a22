"""Policies that choose, per request, local answer, exit, split point + codec or offload.

Build one with :func:`build_policy` from a :class:`PolicyConfig` (TOML ``[policy]`` table)
and a bundle's :class:`~tether.core.types.CostTable`. Every policy implements
:class:`tether.core.policy.Policy`. The trace-driven simulator is
:mod:`tether.policies.simulator`.
"""

from __future__ import annotations

from typing import Callable

from tether.core.bundle import Manifest
from tether.core.config import load_config, with_overrides
from tether.core.errors import ConfigError
from tether.core.policy import Policy
from tether.core.types import CostTable
from tether.policies.adaptive import CausalReference, TetherAdaptive
from tether.policies.bandit import LinUcbPolicy
from tether.policies.baselines import (HindsightOracle, LocalOnly, Neurosurgeon, StaticPolicy,
                                       cloud_only, static_at_prior)
from tether.policies.actions import action_space, check_accuracies
from tether.policies.config import PolicyConfig
from tether.policies.costmodel import ActionCost, CostModel, scale_edge

#: The one literal mapping: policy name -> factory(cost model, config).
POLICIES: dict[str, Callable[[CostModel, PolicyConfig], Policy]] = {
    "local": lambda model, cfg: LocalOnly(),
    "cloud": cloud_only,
    "static": static_at_prior,
    "neurosurgeon": Neurosurgeon,
    "adaptive": TetherAdaptive,
    "causal": CausalReference,
    "bandit": LinUcbPolicy,
    "oracle": HindsightOracle,
}


def build_cost_model(config: PolicyConfig, cost_table: CostTable,
                     manifest: Manifest | None = None) -> CostModel:
    """The action space of a bundle (``manifest``: only what its edge can run), priced.

    Raises :class:`~tether.core.errors.BundleError` naming the fix when an accuracy floor is
    in force and an action's accuracy (or the full model's) was never measured.
    """
    model = CostModel(cost_table, overhead_bytes=config.overhead_bytes,
                      result_bytes=config.result_bytes, actions=config.actions, manifest=manifest)
    if config.accuracy_floor is not None or config.max_accuracy_drop is not None:
        check_accuracies(model.costs, cost_table, manifest=manifest)
    return model


def build_policy(config: PolicyConfig, cost_table: CostTable,
                 model: CostModel | None = None, manifest: Manifest | None = None) -> Policy:
    """The policy ``config.name`` over ``cost_table`` (pass ``model`` to share one cost model)."""
    factory = POLICIES.get(config.name)
    if factory is None:
        raise ConfigError(f"unknown policy {config.name!r}; valid: {sorted(POLICIES)}")
    return factory(model or build_cost_model(config, cost_table, manifest), config)


def load_policy_config(path: str, **overrides: object) -> PolicyConfig:
    """Read the ``[policy]`` table of a TOML file (missing table: defaults); non-None overrides win."""
    return with_overrides(load_config(PolicyConfig, path, table="policy"), **overrides)


__all__ = ["POLICIES", "ActionCost", "action_space", "check_accuracies", "CostModel", "HindsightOracle", "LinUcbPolicy", "LocalOnly",
           "Neurosurgeon", "PolicyConfig", "StaticPolicy", "TetherAdaptive", "build_cost_model",
           "build_policy", "load_policy_config", "scale_edge"]
