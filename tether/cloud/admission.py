"""How long work will take: the cloud's admission estimate (no sockets, no torch).

Each group ``(bundle, split, codec)`` learns from the batches it ran two cost models: seconds
per batch and seconds per payload byte. The cost of some queued requests is the smaller of the
two (a burst of 64-image requests makes batches slow, but a 1-image request after it is cheap
per byte; a tail with a fixed cost per call is cheap per batch). Both are **optimistic** on
purpose: a request wrongly admitted is dropped with a typed DEADLINE error before compute if it
expires in the queue, while a request wrongly refused is lost work the edge pays for.

Estimates cannot stick:

* a measurement **decays with time** (half-life :data:`HALFLIFE_S`): a model not refreshed by a
  batch drifts toward zero, so a request that was refused eventually gets in and is measured;
* the backlog is recomputed from what is queued and running *now*: the running batch counts
  only its remaining time, an idle cloud has no backlog at all, so a request whose own compute
  fits its deadline is never refused on an idle cloud.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Seconds after which an unrefreshed cost measurement counts half.
HALFLIFE_S = 10.0
_ALPHA = 0.2            # weight of a new measurement in the moving averages


@dataclass
class CostModel:
    """Decode + tail time of one group, learned from its batches."""

    batch_s: float = 0.0        # seconds per batch (decode + tail)
    byte_s: float = 0.0         # seconds per payload byte
    measured: float = 0.0       # clock of the last measurement

    def weight(self, now: float) -> float:
        """How much the current measurement still counts (1 when fresh, -> 0 when stale)."""
        return 0.5 ** (max(0.0, now - self.measured) / HALFLIFE_S)

    def learn(self, seconds: float, nbytes: int, now: float) -> None:
        """Fold in one batch that took ``seconds`` for ``nbytes`` payload bytes."""
        old = (1.0 - _ALPHA) * self.weight(now) if self.batch_s > 0 else 0.0
        per_byte = seconds / max(1, nbytes)
        self.batch_s = (old * self.batch_s + _ALPHA * seconds) / (old + _ALPHA)
        self.byte_s = (old * self.byte_s + _ALPHA * per_byte) / (old + _ALPHA)
        self.measured = now

    def cost(self, requests: int, nbytes: int, max_batch_size: int, now: float) -> float:
        """Seconds to compute ``requests`` requests carrying ``nbytes`` bytes (0: unknown)."""
        if requests <= 0 or self.batch_s <= 0:
            return 0.0
        batches = math.ceil(requests / max_batch_size)
        return min(batches * self.batch_s, max(1, nbytes) * self.byte_s) * self.weight(now)


def completion_estimate(running_until: list[float], queued_s: float, own_s: float,
                        workers: int, now: float) -> float:
    """Seconds until a request admitted now is answered.

    ``running_until``: when each running batch is expected to end (past ends count 0);
    ``queued_s``: compute time of everything queued; ``own_s``: the request's own compute.
    """
    running = sum(max(0.0, end - now) for end in running_until)
    return (running + queued_s) / max(1, workers) + own_s
