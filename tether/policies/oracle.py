"""Hindsight references that see the whole request sequence: a planner and a lower bound.

:func:`plan_sequence` plans the action of every request at once, knowing the trace, every
arrival and whether each early exit will be confident, with the edge CPU and the uplink
and downlink as FIFO queues (what one request does delays the next ones): a dynamic
program over the queue states, keeping every state not dominated by another (earlier free
times and lower latency so far). The set of kept states is capped at ``beam``; a plan
found without ever hitting the cap is exact (``info["exact"]``), i.e. no policy over this
action space can have a lower mean latency on this sequence (PINGs aside, 64 B each).

:func:`lower_bound` is a proven lower bound whatever the cap: each request alone, on an
idle edge and idle links, with its best action. The gap between the two is queueing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tether.core.traces import Trace
from tether.core.types import LOCAL
from tether.policies.actions import ActionCost
from tether.policies.costmodel import CostModel


@dataclass(frozen=True)
class _State:
    cpu: float
    up: float
    down: float
    total: float
    choice: int
    parent: "_State | None"


class _Physics:
    """The simulator's per-request timing, as a pure function of the queue state."""

    def __init__(self, model: CostModel, uplink: Trace, downlink: Trace, rtt: float,
                 queue: float, deadline: float, reserve: float | None, offset: float,
                 overhead: float = 0.0) -> None:
        self.model, self.upl, self.downl = model, uplink, downlink
        self.overhead = overhead
        self.rtt, self.queue, self.deadline, self.offset = rtt, queue, deadline, offset
        self.local = model.cost(LOCAL).pre_seconds
        self.reserve = self.local if reserve is None else reserve

    def step(self, t: float, exited: bool, c: ActionCost, cpu: float, up: float,
             down: float) -> tuple[float, float, float, float]:
        """(latency, cpu free, uplink free, downlink free) of one request."""
        start = max(t, cpu) + self.overhead
        if exited:
            return start + c.pre_seconds - t, start + c.pre_seconds, up, down
        send = start + c.pre_seconds + c.encode_seconds
        give_up = t + self.deadline - self.reserve
        if give_up <= send:
            return send + self.local - t, send + self.local, up, down
        up_start = max(send, up)
        up_done = up_start + self.upl.transfer_time(self.offset + up_start, c.up_bytes)
        at_cloud = up_done + self.rtt / 2 + self.queue + c.cloud_seconds
        down_start = max(at_cloud, down)
        down_done = down_start + self.downl.transfer_time(self.offset + down_start, c.down_bytes)
        reply = down_done + self.rtt / 2
        if reply > give_up:
            done = max(give_up, send) + self.local
            return done - t, done, up_done, down_done
        return reply - t, send, up_done, down_done


def plan_sequence(model: CostModel, uplink: Trace, arrivals: np.ndarray, exit_draws: np.ndarray,
                  allowed: np.ndarray, *, rtt: float, deadline: float, downlink: Trace | None = None,
                  queue: float = 0.0, reserve: float | None = None, offset: float = 0.0,
                  beam: int = 24, know_exits: bool = True,
                  overhead: float = 0.0) -> tuple[list[int], dict]:
    """Action indices (into ``model.actions``) minimising total latency over the sequence.

    ``know_exits=False``: the planner does not know which exits will be confident; an exit
    is priced at its exit rate (expected latency, the state of its remote branch), as a
    policy must. That plan is a reference, no longer a bound.
    """
    phys = _Physics(model, uplink, downlink or uplink, rtt, queue, deadline, reserve, offset,
                    overhead)
    choices = np.flatnonzero(allowed)
    states = [_State(-math.inf, -math.inf, -math.inf, 0.0, -1, None)]
    truncated = 0
    for i, t in enumerate(arrivals):
        nxt = float(arrivals[i + 1]) if i + 1 < len(arrivals) else math.inf
        children = []
        for s in states:
            for a in choices:
                c = model.costs[a]
                lat, cpu, up, down = _transition(phys, float(t), float(exit_draws[i]), c, s,
                                                 know_exits)
                # free times before the next arrival are all the same to the future
                children.append(_State(max(cpu, nxt), max(up, nxt), max(down, nxt),
                                       s.total + lat, int(a), s))
        states = _pareto(children)
        if len(states) > beam:
            truncated += 1
            states = sorted(states, key=lambda s: s.total + (s.cpu - nxt if math.isfinite(nxt) else 0)
                            )[:beam]
    best = min(states, key=lambda s: s.total)
    plan: list[int] = []
    node: _State | None = best
    while node is not None and node.choice >= 0:
        plan.append(node.choice)
        node = node.parent
    plan.reverse()
    info = {"exact": truncated == 0, "truncated_steps": truncated,
            "planned_mean_s": best.total / max(len(arrivals), 1)}
    return plan, info


def _transition(phys: _Physics, t: float, draw: float, c: ActionCost, s: _State,
                know: bool) -> tuple[float, float, float, float]:
    if know or c.exit_rate in (0.0, 1.0):
        return phys.step(t, draw < c.exit_rate, c, s.cpu, s.up, s.down)
    local = phys.step(t, True, c, s.cpu, s.up, s.down)[0]
    lat, cpu, up, down = phys.step(t, False, c, s.cpu, s.up, s.down)
    return c.exit_rate * local + (1.0 - c.exit_rate) * lat, cpu, up, down


def _pareto(states: list[_State]) -> list[_State]:
    """States no other state beats on every free time and on latency so far."""
    states.sort(key=lambda s: (s.total, s.cpu, s.up, s.down))
    kept: list[_State] = []
    for s in states:
        if not any(k.cpu <= s.cpu and k.up <= s.up and k.down <= s.down for k in kept):
            kept.append(s)
    return kept


def lower_bound(model: CostModel, uplink: Trace, arrivals: np.ndarray, exit_draws: np.ndarray,
                allowed: np.ndarray, *, rtt: float, deadline: float, downlink: Trace | None = None,
                queue: float = 0.0, reserve: float | None = None, offset: float = 0.0,
                overhead: float = 0.0) -> np.ndarray:
    """Per request, the latency of its best action on an idle edge and idle links."""
    phys = _Physics(model, uplink, downlink or uplink, rtt, queue, deadline, reserve, offset,
                    overhead)
    out = np.empty(len(arrivals))
    floor = -math.inf
    for i, t in enumerate(arrivals):
        out[i] = min(phys.step(float(t), bool(exit_draws[i] < model.costs[a].exit_rate),
                               model.costs[a], floor, floor, floor)[0]
                     for a in np.flatnonzero(allowed))
    return out
