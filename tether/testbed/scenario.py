"""The scenario TOML schema: one frozen dataclass tree, validated when loaded.

Example (``scenarios/*.toml`` hold more)::

    name = "lte-resnet20"
    model = "cifar_resnet20"      # bundle built into OUT/bundle when `bundle` is not given
    duration_s = 30
    edges = 1
    arrival = "poisson"           # or "periodic"
    rate_hz = 4                   # requests per second per edge
    deadline_s = 0.5
    cpu_quota = 0.5               # cores per edge process; unset = unthrottled
    seed = 1
    images = "random"             # or "cifar10" (needs --assets)

    [link]
    up = "lte-like"               # trace spec or file (see tether.core.traces.from_spec)
    down = "constant:50"
    delay_ms = 20

    [[policies]]                  # one run per entry; keys go to the edge's [policy] table
    name = "adaptive"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.core.config import from_mapping, load_toml
from tether.core.errors import ConfigError

ARRIVALS = ("poisson", "periodic")
IMAGES = ("random", "cifar10")
BACKENDS = ("userspace", "kernel")


@dataclass(frozen=True)
class LinkSpec:
    """The emulated edge<->cloud link; traces are specs or paths (relative to the TOML)."""

    up: str = "lte-like"
    down: str = "constant:50"
    delay_ms: float = 20.0
    loss: float = 0.0
    rto_ms: float = 200.0
    queue_kb: int = 256
    start_offset_s: float = 0.0
    backend: str = "userspace"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"link.backend {self.backend!r}: use one of {BACKENDS}")
        if self.delay_ms < 0 or not 0 <= self.loss < 1 or self.queue_kb < 2:
            raise ConfigError("link: need delay_ms >= 0, loss in [0, 1), queue_kb >= 2")


@dataclass(frozen=True)
class Scenario:
    """One experiment: every policy runs on the same link, traces, arrivals and seed."""

    name: str = "scenario"
    model: str = "cifar_resnet20"
    weights: str | None = None           # weights file for `model`; none = random weights
    bundle: str | None = None            # existing bundle directory (skips building one)
    duration_s: float = 20.0
    warmup_s: float = 2.0                # connect time before the first request
    edges: int = 1
    arrival: str = "poisson"
    rate_hz: float = 4.0
    deadline_s: float = 0.5
    cpu_quota: float | None = None
    cpu_pin: tuple[int, ...] = ()
    seed: int = 0
    images: str = "random"
    cloud_threads: int = 1
    link: LinkSpec = field(default_factory=LinkSpec)
    policies: tuple[dict[str, Any], ...] = ({"name": "local"}, {"name": "adaptive"})

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ConfigError("duration_s must be > 0 and warmup_s >= 0")
        if not 1 <= self.edges <= 64:
            raise ConfigError(f"edges must be in 1..64, got {self.edges}")
        if self.arrival not in ARRIVALS:
            raise ConfigError(f"arrival {self.arrival!r}: use one of {ARRIVALS}")
        if self.images not in IMAGES:
            raise ConfigError(f"images {self.images!r}: use one of {IMAGES}")
        if self.rate_hz <= 0 or self.deadline_s <= 0:
            raise ConfigError("rate_hz and deadline_s must be > 0")
        if self.cpu_quota is not None and self.cpu_quota <= 0:
            raise ConfigError("cpu_quota is in cores and must be > 0 (leave it out: unthrottled)")
        if not self.policies:
            raise ConfigError("a scenario needs at least one [[policies]] entry")
        names = [p.get("label", p.get("name")) for p in self.policies]
        if any(not isinstance(n, str) or not n for n in names):
            raise ConfigError("every [[policies]] entry needs a name (and optional label)")
        if any(p.get("name") == "oracle" for p in self.policies):
            raise ConfigError("the oracle cannot run live (it needs the future trace): every "
                              "run's summary already reports regret against it; remove it")
        if len(set(names)) != len(names):
            raise ConfigError(f"policy labels must be unique, got {names}: add label = '...'")

    @property
    def policy_labels(self) -> list[str]:
        return [p.get("label", p["name"]) for p in self.policies]


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario TOML; relative trace/bundle paths resolve next to it."""
    base = Path(path).resolve().parent
    scenario = from_mapping(Scenario, load_toml(path), where="")
    return resolve_paths(scenario, base)


def resolve_paths(scenario: Scenario, base: Path) -> Scenario:
    """Make relative file paths in ``scenario`` relative to ``base``."""
    from dataclasses import replace

    def fix(value: str | None) -> str | None:
        if value is None or ":" in value or value == "lte-like":
            return value
        candidate = base / value
        return str(candidate) if candidate.exists() else value

    link = replace(scenario.link, up=fix(scenario.link.up), down=fix(scenario.link.down))
    return replace(scenario, link=link, bundle=fix(scenario.bundle), weights=fix(scenario.weights))
