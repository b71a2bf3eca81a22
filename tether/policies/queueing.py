"""What a second of edge backlog costs the requests still to come: an average-cost MDP.

The edge CPU is one FIFO queue. Every action puts ``work[a]`` seconds on it (head/exit,
encode, the daemon's own per-request CPU) and its request waits for the backlog ``w`` in
front of it, so a request's latency is ``w + lat[a]``. An action that is fastest alone
(local on a weak edge) can still be the wrong one: its work delays every request that
arrives before the queue next empties. With Poisson arrivals at ``rate``, the relative
value ``U(x)`` of leaving ``x`` seconds of backlog after a decision solves (relative value
iteration on a grid of backlogs, arrivals integrated exactly per bin)::

    V(w) = w + min_a ( lat[a] + U(w + work[a]) ),    U(x) = E_tau V(max(x - tau, 0)),

with ``tau ~ Exp(rate)`` the next gap. The policy then picks ``argmin_a lat[a] + U(w +
work[a])``: the request's own latency plus what its work costs the future, in the same
unit. Solving warm-starts from the last ``U`` (a few iterations: repeated re-solves keep
converging), with the arrival matrices of recent (quantised) rates cached, so a re-solve
after the estimates moved costs four matrix-vector products on a 64-point grid over the few
actions that are not slower *and* heavier than another: about 0.3 ms of CPU (numpy's
per-call overhead on small arrays), which a 0.09-core edge pays 11 times over in wall time.
"""

from __future__ import annotations

import numpy as np

#: Grid points of the backlog (post-decision) axis.
GRID = 64
#: Stop iterating once the relative value moves by less than this (seconds) anywhere.
TOLERANCE = 2e-5
#: Arrival rates are quantised to 2**(1/RATE_STEPS) steps (~4 %: the policy re-solves only
#: for moves above 5 %), so the arrival matrices of the rates seen recently are reused ...
RATE_STEPS = 16
#: ... from a cache of this many (each 64 x 64 float64: 32 KB).
MATRIX_CACHE = 16


class BacklogValue:
    """Relative value ``U`` of the edge backlog, re-solved when the inputs move."""

    def __init__(self, points: int = GRID, cold_iterations: int = 300,
                 warm_iterations: int = 4) -> None:
        self.points = points
        self.cold_iterations = cold_iterations
        self.warm_iterations = warm_iterations
        self.step = 0.0
        self.values: np.ndarray | None = None   # U on the grid, U[0] = 0
        self._key: tuple[float, float] | None = None
        self._moves: np.ndarray | None = None
        self._matrices: dict[tuple[float, float], np.ndarray] = {}   # by (rate, step)
        self.solves = 0

    def solve(self, rate: float, lat: np.ndarray, work: np.ndarray) -> None:
        """(Re-)solve for arrivals at ``rate``/s; ``lat``/``work`` per allowed action (s)."""
        lat = np.asarray(lat, dtype=np.float64)
        work = np.maximum(np.asarray(work, dtype=np.float64), 0.0)
        finite = np.isfinite(lat)
        if not finite.any() or not rate > 0:
            self.values = None
            return
        lat, work = _frontier(lat[finite], work[finite])
        rate = _quantised(rate)
        # the grid spans many services of the heaviest action (and at least 1 s)
        # (quantised to 2**(1/4) steps, so small moves of the estimates keep the grid)
        span = max(30.0 * float(work.max()), 1.0) / (self.points - 1)
        step = float(2.0 ** (np.ceil(4.0 * np.log2(span)) / 4.0))
        key = (rate, step)
        if key != self._key:
            self._moves = self._matrices.get(key)
            if self._moves is None:
                if len(self._matrices) >= MATRIX_CACHE:
                    self._matrices.pop(next(iter(self._matrices)))
                self._moves = self._matrices[key] = _arrival_matrix(rate, step, self.points)
            grid = np.arange(self.points) * step
            if self.values is not None and step != self.step:   # carry U to the new grid
                self.values = self._interp(self.values, grid)
            self._key, self.step = key, step
        grid = np.arange(self.points) * step
        u = np.zeros(self.points) if self.values is None else self.values
        iterations = self.cold_iterations if self.values is None else self.warm_iterations
        after = grid[:, None] + work[None, :]
        for _ in range(iterations):
            v = grid + np.min(lat[None, :] + self._interp(u, after), axis=1)
            new = self._moves @ v
            new -= new[0]
            delta = float(np.max(np.abs(new - u)))
            u = new
            if delta < TOLERANCE:
                break
        self.values = u
        self.solves += 1
        # one far point continues the last slope, so np.interp (one C call) extrapolates
        far = grid[-1] + 1e3
        self._xs = np.append(grid, far)
        self._ys = np.append(u, u[-1] + (u[-1] - u[-2]) / step * 1e3)

    def cost(self, backlog: float, work: np.ndarray) -> np.ndarray:
        """``U(backlog + work)`` per action (zeros before the first solve)."""
        if self.values is None:
            return np.zeros(np.shape(work))
        return np.interp(backlog + work, self._xs, self._ys)

    def _interp(self, u: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Linear interpolation on the grid, extrapolated linearly past its end."""
        pos = np.maximum(x, 0.0) / self.step
        i = np.minimum(pos.astype(np.int64), self.points - 2)
        frac = pos - i
        return u[i] + frac * (u[i + 1] - u[i])


def _quantised(rate: float) -> float:
    return float(2.0 ** (np.round(RATE_STEPS * np.log2(rate)) / RATE_STEPS))


def _frontier(lat: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The actions no other one beats on both latency and edge work (the rest never win)."""
    order = np.lexsort((lat, work))
    lat, work = lat[order], work[order]
    keep = lat < np.minimum.accumulate(np.concatenate(([np.inf], lat[:-1])))
    return lat[keep], work[keep]


def _arrival_matrix(rate: float, step: float, points: int) -> np.ndarray:
    """``M[j, i]``: probability that backlog ``j*step`` has drained to bin ``i`` when the
    next request arrives (``tau ~ Exp(rate)``; bin ``i`` covers ``[(i-1/2), (i+1/2)) * step``,
    bin 0 everything below ``step / 2``, including an empty queue)."""
    survive = lambda t: np.exp(-rate * np.maximum(t, 0.0))  # noqa: E731 - P(tau > t)
    d = np.arange(points)[:, None] - np.arange(points)[None, :]      # j - i
    m = np.where(d >= 0, survive((d - 0.5) * step) - survive((d + 0.5) * step), 0.0)
    m[:, 0] = survive((np.arange(points) - 0.5) * step)
    return m
