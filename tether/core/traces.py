"""Bandwidth traces: bytes deliverable per 1 ms slot, looping.

A :class:`Trace` holds how many bytes the link can deliver in each millisecond
``[i, i+1)`` ms of one period; time wraps around at the end of the period (mahimahi
loops its traces the same way). Within a slot, delivery is fluid (linear), so a
mahimahi trace is exact at every millisecond boundary: ``bytes_between(0, t)`` counts
1500 bytes for every delivery opportunity with timestamp ``<= t`` ms.

Loaders: :func:`load_mahimahi` (one integer ms timestamp per 1500-byte delivery
opportunity), :func:`load_pensieve` (``time_s Mbit/s`` lines, Pensieve/Norway HSDPA
logs), :func:`load_trace` (either, by content). Synthetic generators:
:func:`constant`, :func:`steps`, :func:`on_off`, :func:`markov`, :func:`lte_like`
(the default trace of ``tether demo``). Every loader raises :class:`TraceError` with
the file and line on bad input.

All public times are seconds and rates are bit/s unless a name says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tether.core.errors import TraceError

MTU_BYTES = 1500
#: Longest trace period accepted (one day of 1 ms slots), to bound memory.
MAX_SLOTS = 86_400_000
_MBPS_TO_BYTES_PER_MS = 1e6 / 8 / 1000


@dataclass(frozen=True, eq=False)
class Trace:
    """A looping link-capacity trace: ``slots[i]`` bytes deliverable during ms ``i``."""

    slots: np.ndarray
    name: str = "trace"

    def __post_init__(self) -> None:
        slots = np.asarray(self.slots, dtype=np.float64)
        if slots.ndim != 1 or slots.size == 0:
            raise TraceError(f"trace {self.name!r}: needs a non-empty 1-D array of per-ms bytes")
        if slots.size > MAX_SLOTS:
            raise TraceError(f"trace {self.name!r}: {slots.size} ms is longer than one day; slice it")
        if not np.all(np.isfinite(slots)) or np.any(slots < 0):
            raise TraceError(f"trace {self.name!r}: per-ms bytes must be finite and >= 0")
        cum = np.concatenate(([0.0], np.cumsum(slots)))
        if cum[-1] <= 0:
            raise TraceError(f"trace {self.name!r} never delivers a byte; "
                             "an outage must be part of a trace that also has capacity")
        slots.setflags(write=False)
        cum.setflags(write=False)
        object.__setattr__(self, "slots", slots)
        object.__setattr__(self, "_cum", cum)

    # ---- basic properties -------------------------------------------------------------
    @property
    def period_ms(self) -> int:
        return int(self.slots.size)

    @property
    def duration_s(self) -> float:
        """Length of one period in seconds (the trace loops after it)."""
        return self.slots.size / 1000.0

    @property
    def period_bytes(self) -> float:
        return float(self._cum[-1])

    def mean_bps(self) -> float:
        """Mean capacity over one period, bit/s."""
        return self.period_bytes * 8.0 / self.duration_s

    # ---- queries ----------------------------------------------------------------------
    def cumulative_bytes(self, t_s: float) -> float:
        """Bytes deliverable in ``[0, t_s)`` (``t_s`` may exceed the period: loops)."""
        t_ms = float(t_s) * 1000.0
        if t_ms <= 0:
            return 0.0
        n = self.slots.size
        loops, rest = divmod(t_ms, n)
        i = min(int(rest), n - 1)
        frac = rest - i
        return loops * self.period_bytes + self._cum[i] + frac * self.slots[i]

    def bytes_between(self, t0: float, t1: float) -> float:
        """Bytes the link can deliver between ``t0`` and ``t1`` seconds."""
        if t1 < t0:
            raise TraceError(f"bytes_between: t1={t1} is before t0={t0}")
        return self.cumulative_bytes(t1) - self.cumulative_bytes(t0)

    def transfer_time(self, start_s: float, nbytes: float) -> float:
        """Seconds to push ``nbytes`` through an otherwise idle link starting at ``start_s``."""
        if nbytes < 0 or not math.isfinite(nbytes):
            raise TraceError(f"transfer_time: nbytes must be finite and >= 0, got {nbytes}")
        if nbytes == 0:
            return 0.0
        start_s = max(0.0, float(start_s))
        target = self.cumulative_bytes(start_s) + float(nbytes)
        return max(0.0, self._time_of_cumulative(target) - start_s)

    def _time_of_cumulative(self, target: float) -> float:
        """Earliest time (s) at which cumulative delivered bytes reach ``target`` > 0."""
        total = self.period_bytes
        loops = math.floor(target / total)
        rest = target - loops * total
        if rest <= 0 and loops > 0:
            loops, rest = loops - 1, total
        j = int(self._cum.searchsorted(rest, side="left"))
        j = min(max(j, 1), self.slots.size)
        slot = j - 1
        within = (rest - self._cum[slot]) / self.slots[slot] if self.slots[slot] > 0 else 1.0
        return (loops * self.slots.size + slot + min(max(within, 0.0), 1.0)) / 1000.0

    def rate_bps_at(self, t_s: float, window_s: float = 0.001) -> float:
        """Mean capacity (bit/s) over ``[t_s, t_s + window_s)``; the 1 ms slot by default."""
        if window_s <= 0:
            raise TraceError(f"rate_bps_at: window_s must be > 0, got {window_s}")
        return self.bytes_between(t_s, t_s + window_s) * 8.0 / window_s

    def rate_series(self, bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """``(bin start seconds, bit/s)`` over one period in bins of ``bin_s`` (for plots)."""
        bin_ms = max(1, int(round(bin_s * 1000)))
        n = self.slots.size
        edges = np.arange(0, n + bin_ms, bin_ms).clip(max=n)
        edges = np.unique(edges)
        sums = np.diff(self._cum[edges])
        widths = np.diff(edges) / 1000.0
        return edges[:-1] / 1000.0, sums * 8.0 / widths

    # ---- transformations --------------------------------------------------------------
    def slice(self, start_s: float, end_s: float) -> "Trace":
        """The part ``[start_s, end_s)`` as a new looping trace (wraps past the period)."""
        a, b = int(round(start_s * 1000)), int(round(end_s * 1000))
        if b <= a:
            raise TraceError(f"slice: end {end_s} s must be after start {start_s} s")
        idx = np.arange(a, b) % self.slots.size
        return Trace(self.slots[idx], f"{self.name}[{start_s:g}:{end_s:g}]")

    def scale(self, factor: float) -> "Trace":
        """Capacity multiplied by ``factor`` (> 0)."""
        if not factor > 0 or not math.isfinite(factor):
            raise TraceError(f"scale: factor must be a positive number, got {factor}")
        return Trace(self.slots * factor, f"{self.name}x{factor:g}")

    def scaled_to_mean(self, mean_bps: float) -> "Trace":
        """Same shape, rescaled so that :meth:`mean_bps` equals ``mean_bps``."""
        return self.scale(mean_bps / self.mean_bps())

    def concat(self, other: "Trace") -> "Trace":
        return Trace(np.concatenate((self.slots, other.slots)), f"{self.name}+{other.name}")

    def save_mahimahi(self, path: str | Path) -> None:
        """Write as a mahimahi trace (capacity rounded to whole 1500-byte opportunities)."""
        whole = np.floor(self._cum[1:] / MTU_BYTES + 1e-9).astype(np.int64)
        counts = np.diff(np.concatenate(([0], whole)))
        stamps = np.repeat(np.arange(1, self.slots.size + 1), counts)
        if stamps.size == 0:
            raise TraceError(f"trace {self.name!r} carries less than one 1500-byte packet")
        Path(path).write_text("\n".join(map(str, stamps.tolist())) + "\n")

    def __repr__(self) -> str:
        return (f"Trace({self.name!r}, {self.duration_s:g} s, "
                f"mean {self.mean_bps() / 1e6:.3f} Mbit/s)")


# ---- loaders ----------------------------------------------------------------------------
def _read_lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError as exc:
        raise TraceError(f"trace file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace file {path}: {exc}") from exc


def load_mahimahi(path: str | Path) -> Trace:
    """A mahimahi trace: one integer ms timestamp per 1500-byte delivery opportunity."""
    stamps = []
    for lineno, line in enumerate(_read_lines(path), 1):
        text = line.strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError as exc:
            raise TraceError(f"{path}:{lineno}: expected an integer ms timestamp, got {text!r}") from exc
        if value < 0 or (stamps and value < stamps[-1]):
            raise TraceError(f"{path}:{lineno}: timestamps must be >= 0 and non-decreasing")
        stamps.append(value)
    if not stamps or stamps[-1] <= 0:
        raise TraceError(f"{path}: empty mahimahi trace (needs a last timestamp > 0)")
    period = stamps[-1]
    if period > MAX_SLOTS:
        raise TraceError(f"{path}: period {period} ms is longer than one day")
    arr = np.asarray(stamps, dtype=np.int64)
    slots = np.bincount(np.clip(arr - 1, 0, period - 1), minlength=period) * float(MTU_BYTES)
    return Trace(slots, Path(path).name)


def load_pensieve(path: str | Path) -> Trace:
    """A Pensieve / Norway HSDPA log: ``time_s Mbit/s`` per line; each rate holds until the next."""
    times, rates = [], []
    for lineno, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            t, r = float(parts[0]), float(parts[1])
        except (ValueError, IndexError) as exc:
            raise TraceError(f"{path}:{lineno}: expected 'time_s Mbit/s', got {line.strip()!r}") from exc
        if not (math.isfinite(t) and math.isfinite(r)) or r < 0 or (times and t <= times[-1]):
            raise TraceError(f"{path}:{lineno}: times must increase and rates be finite and >= 0")
        times.append(t)
        rates.append(r)
    if len(times) < 2:
        raise TraceError(f"{path}: a Pensieve trace needs at least two samples")
    t = np.asarray(times) - times[0]
    last_gap = float(np.median(np.diff(t)))
    return _piecewise(np.append(t, t[-1] + last_gap), np.asarray(rates), Path(path).name)


def load_trace(path: str | Path) -> Trace:
    """Load either format: one column of integers is mahimahi, two columns is Pensieve."""
    for line in _read_lines(path):
        if line.strip():
            return load_pensieve(path) if len(line.split()) >= 2 else load_mahimahi(path)
    raise TraceError(f"{path}: empty trace file")


def _piecewise(edges_s: np.ndarray, rates_mbps: np.ndarray, name: str) -> Trace:
    """Rate ``rates_mbps[i]`` over ``[edges_s[i], edges_s[i+1])``, on 1 ms slots (fluid)."""
    edges_ms = np.asarray(edges_s, dtype=np.float64) * 1000.0
    n = int(math.ceil(edges_ms[-1] - 1e-9))
    if n <= 0 or n > MAX_SLOTS:
        raise TraceError(f"trace {name!r}: duration must be between 1 ms and one day")
    per_ms = np.asarray(rates_mbps, dtype=np.float64) * _MBPS_TO_BYTES_PER_MS
    cum_at_edges = np.concatenate(([0.0], np.cumsum(per_ms * np.diff(edges_ms))))
    grid = np.arange(n + 1, dtype=np.float64).clip(max=edges_ms[-1])
    cum = np.interp(grid, edges_ms, cum_at_edges)
    return Trace(np.diff(cum), name)


# ---- synthetic generators -----------------------------------------------------------------
def constant(mbps: float, duration_s: float = 10.0) -> Trace:
    """A constant-rate link."""
    return _piecewise(np.array([0.0, duration_s]), np.array([mbps]), f"constant-{mbps:g}Mbps")


def steps(segments: Sequence[tuple[float, float]], name: str = "steps") -> Trace:
    """Piecewise-constant: ``[(duration_s, mbps), ...]`` in order (0 Mbit/s is an outage)."""
    if not segments:
        raise TraceError("steps: needs at least one (duration_s, mbps) segment")
    durations = np.array([float(d) for d, _ in segments])
    rates = np.array([float(r) for _, r in segments])
    if np.any(durations <= 0) or np.any(rates < 0):
        raise TraceError("steps: durations must be > 0 and rates >= 0")
    return _piecewise(np.concatenate(([0.0], np.cumsum(durations))), rates, name)


def on_off(on_mbps: float, on_s: float, off_s: float, off_mbps: float = 0.0,
           cycles: int = 1) -> Trace:
    """Periodic outages: ``on_s`` seconds at ``on_mbps`` then ``off_s`` at ``off_mbps``."""
    segs = [(on_s, on_mbps), (off_s, off_mbps)] * max(1, int(cycles))
    return steps(segs, f"onoff-{on_mbps:g}Mbps-{on_s:g}s-{off_s:g}s")


def markov(states_mbps: Sequence[float], mean_dwell_s: float | Sequence[float],
           duration_s: float, seed: int = 0, jitter: float = 0.0,
           name: str = "markov") -> Trace:
    """A Markov-modulated link: dwell ~ Exp(mean), then jump to a uniformly chosen other state.

    ``jitter`` adds log-normal noise (sigma) to each dwell's rate.
    """
    states = np.asarray(states_mbps, dtype=np.float64)
    dwell = np.broadcast_to(np.asarray(mean_dwell_s, dtype=np.float64), states.shape)
    if states.size < 1 or np.any(states < 0) or np.any(dwell <= 0) or duration_s <= 0:
        raise TraceError("markov: needs states >= 0, mean dwell > 0 and duration > 0")
    rng = np.random.default_rng(seed)
    t, state, segs = 0.0, int(rng.integers(states.size)), []
    while t < duration_s:
        d = min(max(0.001, rng.exponential(dwell[state])), duration_s - t)
        rate = states[state] * (math.exp(rng.normal(0.0, jitter)) if jitter > 0 else 1.0)
        segs.append((d, rate))
        t += d
        if states.size > 1:
            state = int((state + rng.integers(1, states.size)) % states.size)
    return steps(segs, name)


def lte_like(duration_s: float = 120.0, seed: int = 7) -> Trace:
    """The default demo uplink: LTE-like (about 6 Mbit/s mean) with fades and short outages."""
    base = markov([12.0, 6.0, 2.0, 0.5], [4.0, 4.0, 2.5, 1.5], duration_s, seed=seed,
                  jitter=0.35, name="lte-like")
    rng = np.random.default_rng(seed + 1)
    slots = base.slots.copy()
    for start in rng.uniform(0, duration_s - 1.0, size=max(1, int(duration_s // 40))):
        a = int(start * 1000)
        slots[a:a + int(rng.uniform(300, 900))] = 0.0
    return Trace(slots, "lte-like")


def from_spec(spec: str) -> Trace:
    """A trace from a file path or a synthetic spec (what ``--trace`` accepts).

    Specs: ``lte-like``, ``constant:MBPS[:SECONDS]``, ``onoff:MBPS:ON_S:OFF_S[:CYCLES]``,
    ``steps:SECONDS@MBPS,SECONDS@MBPS,...``, ``markov:MBPS/MBPS/...:DWELL_S:SECONDS[:SEED]``;
    anything else is a path to a mahimahi or Pensieve file.
    """
    kind, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []
    try:
        if kind == "lte-like":
            return lte_like(*(float(a) for a in args[:1]))
        if kind == "constant":
            return constant(*(float(a) for a in args))
        if kind == "onoff":
            nums = [float(a) for a in args]
            return on_off(nums[0], nums[1], nums[2], cycles=int(nums[3]) if len(nums) > 3 else 1)
        if kind == "steps":
            segs = [tuple(float(x) for x in seg.split("@")) for seg in rest.split(",")]
            return steps([(d, r) for d, r in segs])
        if kind == "markov":
            states = [float(x) for x in args[0].split("/")]
            seed = int(args[3]) if len(args) > 3 else 0
            return markov(states, float(args[1]), float(args[2]), seed=seed)
    except (ValueError, IndexError, TypeError) as exc:
        raise TraceError(f"bad trace spec {spec!r}: {exc}; see tether.core.traces.from_spec "
                         "for the accepted forms") from exc
    return load_trace(spec)
