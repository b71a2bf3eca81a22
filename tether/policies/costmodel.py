"""Predicted latency and expected accuracy of every action, from a bundle's cost table.

Per request (the model the testbed measures)::

    latency = pre + (1 - p_exit) * (encode + up_bytes / up_bps + rtt + queue + cloud + down_bytes / down_bps)

``pre`` is edge compute before the send decision (whole model for LOCAL; head, plus exit
head for EXIT), ``encode`` the codec on the edge, ``cloud`` decode + tail (or the whole
model for OFFLOAD) and ``p_exit`` the fraction answered locally (1 for LOCAL, 0 for
SPLIT/OFFLOAD). Every action is a row of numpy arrays, so one call prices them all.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tether.core.bundle import Manifest
from tether.core.errors import ConfigError
from tether.core.types import LOCAL, Action, ActionKind, CostTable
from tether.policies.actions import INPUT, ActionCost, action_space

__all__ = ["INPUT", "ActionCost", "CostModel", "enumerate_costs", "prune_dominated", "scale_edge"]


class CostModel:
    """Prices every action of a bundle's action space; ``actions`` restricts the set (keys).

    ``manifest`` limits the space to what the edge can run (exported heads, the bundle's
    codecs and exits); without it every action of the cost table counts.
    """

    def __init__(self, table: CostTable, overhead_bytes: int = 256, result_bytes: int = 64,
                 actions: tuple[str, ...] | list[str] = (), prune: bool = True,
                 manifest: Manifest | None = None) -> None:
        self.table = table
        self.manifest = manifest
        self.overhead_bytes = overhead_bytes
        self.result_bytes = result_bytes
        costs = action_space(table, manifest, overhead_bytes, result_bytes)
        self._all = {c.action.key: c for c in costs}
        if actions:
            wanted = set(actions)
            unknown = wanted - {c.action.key for c in costs}
            if unknown:
                raise ConfigError(f"policy.actions {sorted(unknown)} not in the cost table; valid: "
                                  f"{[c.action.key for c in costs]}")
            costs = [c for c in costs if c.action.key in wanted]
        self.costs: tuple[ActionCost, ...] = tuple(prune_dominated(costs) if prune else costs)
        self.actions: tuple[Action, ...] = tuple(c.action for c in self.costs)
        self._index = {a.key: i for i, a in enumerate(self.actions)}
        self._arrays()

    def _arrays(self) -> None:
        c = self.costs
        self.pre = np.array([x.pre_seconds for x in c])
        self.remote_frac = np.array([1.0 - x.exit_rate for x in c])
        self.encode = np.array([x.encode_seconds for x in c])
        self.up = np.array([x.up_bytes for x in c])
        self.cloud = np.array([x.cloud_seconds for x in c])
        self.down = np.array([x.down_bytes for x in c])
        full = self.table.full_accuracy
        self.accuracy = np.array([x.accuracy if x.accuracy is not None else
                                  (full if full is not None else np.nan) for x in c])
        self.is_local = np.array([not x.remote for x in c])
        self.is_exit = np.array([x.action.kind is ActionKind.EXIT for x in c])

    def lower_bounds(self, rtt: float, queue: float = 0.0) -> np.ndarray:
        """Latency of every action on an infinitely fast link: no realisation can beat it."""
        return self.pre + self.remote_frac * (self.encode + rtt + queue + self.cloud)

    def edge_compute(self) -> np.ndarray:
        """Expected edge compute per action (head/exit, plus encode when it goes remote)."""
        return self.pre + self.remote_frac * self.encode

    @property
    def local_seconds(self) -> float:
        return self.table.edge_full_seconds

    def index(self, action: Action) -> int:
        return self._index[action.key]

    def cost(self, action: Action) -> ActionCost:
        """Components of any action the table supports (pruned ones included)."""
        found = self._all.get(action.key)
        if found is None:
            raise ConfigError(f"action {action.key!r} is not in the cost table of "
                              f"{self.table.model_id}; valid: {sorted(self._all)}")
        return found

    def exit_accuracy(self, action: Action) -> float | None:
        """Accuracy of the requests an exit answers locally (None if unknown)."""
        for e in self.table.exits:
            if e.split == action.split:
                return e.accuracy
        return None

    def latencies(self, up_bps: float | np.ndarray, rtt: float, queue: float = 0.0,
                  down_bps: float | None = None, edge: np.ndarray | float = 1.0,
                  cloud: np.ndarray | float = 1.0) -> np.ndarray:
        """Predicted latency (s) of every action at the given link state.

        ``edge`` / ``cloud``: per-action factors on the profiled edge and cloud compute
        (online calibration, :class:`tether.policies.calibration.Calibrator`).
        """
        up_bps = np.maximum(up_bps, 1.0)
        down_bps = np.maximum(down_bps if down_bps is not None else up_bps, 1.0)
        remote = (self.encode * edge + self.up * 8.0 / up_bps + rtt + queue + self.cloud * cloud
                  + self.down * 8.0 / down_bps)
        return self.pre * edge + self.remote_frac * remote

    def allowed(self, floor: float | None) -> np.ndarray:
        """Mask of actions whose expected accuracy meets ``floor`` (all if unknown)."""
        if floor is None:
            return np.ones(len(self.costs), dtype=bool)
        ok = np.isnan(self.accuracy) | (self.accuracy >= floor - 1e-12)
        return ok if ok.any() else self.accuracy >= np.nanmax(self.accuracy) - 1e-12

    def offload_mask(self, floor: float | None) -> np.ndarray:
        """Full-offload actions meeting ``floor`` (all full offloads if none does)."""
        offload = np.array([a.kind is ActionKind.OFFLOAD for a in self.actions])
        if not offload.any():
            raise ConfigError("no full-offload action in the cost table / policy.actions")
        allowed = offload & self.allowed(floor)
        return allowed if allowed.any() else offload

    def best_offload(self, floor: float | None, up_bps: float, rtt: float) -> Action:
        """The full offload (input codec) with the lowest predicted latency at this link."""
        lat = np.where(self.offload_mask(floor), self.latencies(up_bps, rtt), np.inf)
        return self.actions[int(np.argmin(lat))]


def enumerate_costs(table: CostTable, overhead: int = 256, result: int = 64) -> list[ActionCost]:
    """Every action of a bare cost table (see :func:`tether.policies.actions.action_space`)."""
    return action_space(table, None, overhead, result)


def prune_dominated(costs: list[ActionCost]) -> list[ActionCost]:
    """Drop actions no faster at any link state and no more accurate than another one.

    LOCAL is always kept (it is the fallback everybody needs).
    """
    def vec(c: ActionCost) -> tuple[float, ...]:
        # edge and cloud terms apart: a uniformly slower (calibrated) edge keeps the order
        f = 1.0 - c.exit_rate
        acc = -(c.accuracy if c.accuracy is not None else 1.0)
        return (c.pre_seconds, f * c.encode_seconds, f * c.cloud_seconds, f * c.up_bytes,
                f * c.down_bytes, f, acc)

    vecs = [vec(c) for c in costs]
    kept = []
    for i, c in enumerate(costs):
        dominated = any(j != i and all(a <= b for a, b in zip(vecs[j], vecs[i]))
                        and (vecs[j] != vecs[i] or j < i) for j in range(len(costs)))
        if not dominated or c.action == LOCAL:
            kept.append(c)
    return kept


def scale_edge(table: CostTable, factor: float) -> CostTable:
    """The same table with every edge-side time multiplied by ``factor`` (a slower device)."""
    if not factor > 0:
        raise ConfigError(f"edge scale factor must be > 0, got {factor}")
    splits = tuple(replace(s, head_seconds=s.head_seconds * factor) for s in table.splits)
    codecs = tuple(replace(c, encode_seconds=c.encode_seconds * factor) for c in table.codecs)
    exits = tuple(replace(e, exit_seconds=e.exit_seconds * factor) for e in table.exits)
    meta = dict(table.meta, edge_scale=factor * float(table.meta.get("edge_scale", 1.0)))
    return replace(table, edge_full_seconds=table.edge_full_seconds * factor, splits=splits,
                   codecs=codecs, exits=exits, meta=meta)
