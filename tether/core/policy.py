"""The policy interface the edge agent talks to (implementations live in ``tether.policies``).

A policy is pure: no IO, no clocks of its own. The edge calls :meth:`Policy.decide`
before each request with what it knows now, and :meth:`Policy.observe` with what it
measured afterwards (and with each PING/PONG RTT sample).

Optional: a policy that predicts its actions' latency may also define
``patience(self, action: Action) -> float | None``: for ``action`` (the one its last
:meth:`Policy.decide` returned), the seconds after its request is sent to the cloud after
which the edge starts its local answer and races the reply with it: the first answers (a
local one with fallback reason ``"overdue"``; a reply that wins stops the local run). 0
races from the send (a hedged request: the local answer's latency, the link measured for
free); None waits until the deadline. Counted from the send, not the decision:
a request delayed by the edge's own queue is not the cloud's fault, and giving it up
would only add local work to that queue. The edge still awaits the reply until the
deadline for the policy: its :class:`Observation` comes with the reply (or the failure),
as if the edge had waited: giving up changes how long the user waits, not what the
policy learns. It is not part of the protocol (fixed policies have none); the edge and
the simulator read it through :func:`patience_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tether.core.types import Action


@dataclass(frozen=True)
class DecisionContext:
    """What the edge knows when a request arrives."""

    now: float                          # monotonic seconds
    deadline_seconds: float | None = None
    cloud_available: bool = True        # connected and handshake done
    cloud_queue_seconds: float = 0.0    # last queue delay the cloud reported


@dataclass(frozen=True)
class Observation:
    """One measurement from the edge: a finished request, or an RTT sample (PING/PONG).

    For a finished offloaded request, ``network_seconds`` is send-to-reply time minus the
    cloud's reported queue/decode/compute time, and ``bytes_sent``/``bytes_received`` are the
    bytes that went on the socket, so ``bytes_sent / network_seconds`` (minus RTT) is a
    throughput sample.
    """

    now: float
    rtt_seconds: float | None = None
    action: Action | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    network_seconds: float = 0.0
    cloud_queue_seconds: float = 0.0
    total_seconds: float = 0.0
    ok: bool = True                     # False: timeout, busy, error, disconnected
    exited: bool = False                # answered by an early exit
    edge_seconds: float | None = None   # measured edge compute (head/exit + encode, or local)
    edge_wait_seconds: float | None = None  # measured wait for the edge's compute (its queue)
    cloud_seconds: float | None = None  # cloud-reported decode + tail (compute, not queue)


@runtime_checkable
class Policy(Protocol):
    """Chooses an action per request. Implementations must be fast (well under 1 ms)."""

    name: str

    def decide(self, ctx: DecisionContext) -> Action: ...

    def observe(self, obs: Observation) -> None: ...


class FixedPolicy:
    """Always the same action (the edge's default: a fixed split from config)."""

    def __init__(self, action: Action, name: str = "fixed") -> None:
        self.action = action
        self.name = name

    def decide(self, ctx: DecisionContext) -> Action:
        return self.action

    def observe(self, obs: Observation) -> None:
        return None


def patience_of(policy: Any, action: Action) -> float | None:
    """The policy's patience for ``action`` (see the module docstring), or None when it has
    none: no ``patience`` method, or a value that is None, negative or not finite.
    A policy's exception propagates (the caller decides how to survive it)."""
    fn = getattr(policy, "patience", None)
    if fn is None:
        return None
    value = fn(action)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None
