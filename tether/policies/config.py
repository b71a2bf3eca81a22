"""Policy configuration: one frozen dataclass, loaded from TOML (``[policy]`` table)."""

from __future__ import annotations

from dataclasses import dataclass

from tether.core.errors import ConfigError

OBJECTIVES = ("latency", "accuracy")
ESTIMATORS = ("robust", "harmonic", "ewma", "last", "windowed_max")


@dataclass(frozen=True)
class PolicyConfig:
    """How a policy chooses. Unused fields are ignored by policies that do not need them.

    Accuracy is top-1 in [0, 1]. ``max_accuracy_drop`` is relative to the cost table's
    full-model accuracy; ``accuracy_floor`` is absolute; the stricter one applies.
    """

    name: str = "adaptive"
    objective: str = "latency"              # "latency": min latency s.t. accuracy floor
    accuracy_floor: float | None = None     # "accuracy": max accuracy s.t. deadline met w.p. q
    max_accuracy_drop: float | None = 0.01
    deadline_seconds: float | None = None
    deadline_quantile: float = 0.9
    estimator: str = "harmonic"             # bandwidth estimator: robust|harmonic|ewma|last|windowed_max
    window: int = 5                         # samples in harmonic mean / error window
    ewma_alpha: float = 0.3
    window_seconds: float = 10.0            # windowed max (bandwidth) / min (RTT)
    prior_bandwidth_bps: float = 1e6        # cold start, and what stale estimates decay to
    prior_rtt_seconds: float = 0.05
    stale_after_seconds: float = 2.0
    stale_halflife_seconds: float = 2.0
    probe_interval_seconds: float = 10.0   # longest gap between probes of a link it stopped using (0: never)
    peak_memory_seconds: float = 60.0      # how long the best sample seen argues for a probe
    edge_load_weight: float = 1.0          # adaptive: weight of what its edge work costs later requests
    hysteresis: float = 0.05                # switch only for a predicted gain above this fraction
    patience_factor: float = 1.0            # adaptive: start the local answer (racing the reply) this x
                                            # the predicted send-to-reply time after the send (0: never)
    overhead_bytes: int = 256               # protocol header bytes per message
    result_bytes: int = 64                  # reply payload (logits) bytes
    static_action: str | None = None        # "static" policy: this action key, or best at prior
    actions: tuple[str, ...] = ()           # allowed action keys ("" = all in the cost table)
    calibrate: bool = True                  # correct profiled compute online from measurements
    calibration_alpha: float = 0.2          # as an EWMA's: a window of 2/alpha - 1 (9) samples
    calibration_halflife_seconds: float = 120.0  # an action's own factor decays to the shared one
    bandit_alpha: float = 0.1
    bandit_ridge: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"policy.objective {self.objective!r}: use one of {OBJECTIVES}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"policy.estimator {self.estimator!r}: use one of {ESTIMATORS}")
        if self.objective == "accuracy" and self.deadline_seconds is None:
            raise ConfigError("policy.objective = 'accuracy' needs policy.deadline_seconds")
        if not 0.0 < self.deadline_quantile < 1.0:
            raise ConfigError("policy.deadline_quantile must be in (0, 1), e.g. 0.9")
        if self.window < 1 or not 0.0 < self.ewma_alpha <= 1.0:
            raise ConfigError("policy.window must be >= 1 and policy.ewma_alpha in (0, 1]")
        for key in ("prior_bandwidth_bps", "prior_rtt_seconds", "window_seconds",
                    "stale_after_seconds", "stale_halflife_seconds"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"policy.{key} must be > 0")
        if not 0.0 < self.calibration_alpha <= 1.0 or not self.calibration_halflife_seconds > 0:
            raise ConfigError("policy.calibration_alpha must be in (0, 1] and "
                              "calibration_halflife_seconds > 0")
        if self.edge_load_weight < 0:
            raise ConfigError("policy.edge_load_weight must be >= 0 (0 disables it)")
        if self.probe_interval_seconds < 0 or self.peak_memory_seconds <= 0:
            raise ConfigError("policy.probe_interval_seconds must be >= 0, peak_memory_seconds > 0")
        if self.hysteresis < 0 or self.bandit_alpha < 0 or self.bandit_ridge <= 0:
            raise ConfigError("policy.hysteresis and bandit_alpha must be >= 0, bandit_ridge > 0")
        if not 0.0 <= self.patience_factor < float("inf"):
            raise ConfigError("policy.patience_factor must be >= 0 and finite (0 disables it)")

    def floor_for(self, full_accuracy: float | None) -> float | None:
        """The accuracy floor in force, or None when no accuracy is known or required."""
        floors = []
        if self.accuracy_floor is not None:
            floors.append(self.accuracy_floor)
        if self.max_accuracy_drop is not None and full_accuracy is not None:
            floors.append(full_accuracy - self.max_accuracy_drop)
        return max(floors) if floors else None
