"""`tether testbed run`: the cloud, the links and the edges as real processes, per policy.

For every policy of a scenario: start ``tether cloud``, one ``tether testbed link`` process
serving one link per edge (edge -> link -> cloud), and ``tether edge`` daemons (under the
CPU throttle) whose ``[policy]`` table is the scenario's entry. When every edge answers a
ping and the warm-up has passed, the link's trace clock is restarted (SIGUSR1) and the
seeded open-loop load starts, so every policy sees the same trace at the same request
times. Afterwards every process is stopped and the rows go to :mod:`tether.testbed.analysis`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq.asyncio

from tether.core.bundle import Manifest
from tether.core.errors import ConfigError, PeerUnavailableError
from tether.core.traces import Trace, from_spec
from tether.testbed.analysis import deadline_miss
from tether.testbed.load import EdgeLoad, ImageSet, arrival_times, load_images
from tether.testbed.platform import CpuThrottle, PlatformInfo, probe
from tether.testbed.procs import (
    ProcessGroup, free_port, port_open, read_json_file, tether_command,
)
from tether.testbed.scenario import Scenario, load_scenario

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0


@dataclass
class Experiment:
    """Everything fixed before the first policy runs."""

    scenario: Scenario
    out: Path
    bundle: Path
    manifest: Manifest
    up: Trace
    down: Trace
    images: ImageSet
    times: list[Any]             # per edge: arrival times (s)
    picks: list[Any]             # per edge: image indices
    info: PlatformInfo
    assets: Path | None = None
    progress: Callable[[str], None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def run_scenario_file(path: str | Path, out: str | Path, duration: float | None = None,
                      assets: str | Path | None = None, progress: bool | None = True,
                      bundle: str | Path | None = None) -> Path:
    """Load a scenario TOML and run it (optionally shorter, or with another bundle)."""
    scenario = load_scenario(path)
    if duration is not None:
        scenario = replace(scenario, duration_s=float(duration))
    if bundle is not None:
        scenario = replace(scenario, bundle=str(bundle))
    return run_scenario(scenario, Path(out), Path(assets) if assets else None, progress)


def run_scenario(scenario: Scenario, out: Path, assets: Path | None = None,
                 progress: bool | None = True) -> Path:
    """Run every policy of ``scenario``; write CSV, summary, plots and meta.json to ``out``."""
    from tether.testbed.analysis import write_results
    exp = prepare(scenario, out, assets, _printer if progress is not False else None)
    rows: list[dict[str, Any]] = []
    kernel = _kernel_link(exp) if scenario.link.backend == "kernel" else contextlib.nullcontext()
    with kernel as klink, ProcessGroup(out / "logs") as group:
        _say(exp, f"starting the cloud and the {scenario.link.backend} link")
        infra = start_infrastructure(exp, group, klink)
        for label, entry in zip(scenario.policy_labels, scenario.policies):
            _say(exp, f"[{label}] starting {scenario.edges} edge(s)")
            rows += run_policy(exp, infra, label, entry)
    write_results(exp, rows)
    return out


def reanalyze(out: str | Path) -> Path:
    """Rewrite CSV, summary and plots of a finished run from its raw_rows.json and meta.json."""
    import json

    from tether.core.config import from_mapping
    from tether.testbed.analysis import write_results
    out = Path(out)
    try:
        meta = json.loads((out / "meta.json").read_text())
        raw = json.loads((out / "raw_rows.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{out} holds no finished testbed run ({exc}); run "
                          "`tether testbed run` first") from exc
    scenario = from_mapping(Scenario, meta["scenario"])
    assets = Path(meta["assets"]) if meta.get("assets") else None
    bundle = Path(meta["bundle"])
    platform_info = PlatformInfo(**{**meta["platform"], "notes": tuple(meta["platform"]["notes"])})
    images = ImageSet(np.zeros((1, 1, 1, 1), np.uint8), np.zeros(1, np.int64), meta["images"])
    exp = Experiment(scenario, out, bundle, Manifest.load(bundle),
                     resolve_trace(scenario.link.up, assets),
                     resolve_trace(scenario.link.down, assets),
                     images, [], [], platform_info, assets, None, {"runs": meta.get("runs", {})})
    write_results(exp, raw)
    return out


def _printer(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _say(exp: Experiment, text: str) -> None:
    if exp.progress is not None:
        exp.progress(text)


def resolve_trace(spec: str, assets: Path | None) -> Trace:
    """A trace spec, file path, or ``assets:RELATIVE/PATH`` inside the shared assets."""
    if spec.startswith("assets:"):
        if assets is None:
            raise ConfigError(f"trace {spec!r} needs the shared assets: pass --assets DIR")
        return from_spec(str(Path(assets) / spec.removeprefix("assets:")))
    return from_spec(spec)


def prepare(scenario: Scenario, out: Path, assets: Path | None,
            progress: Callable[[str], None] | None) -> Experiment:
    """Probe the machine, build or open the bundle, fix traces, arrivals and images."""
    out.mkdir(parents=True, exist_ok=True)
    info = probe()
    up = resolve_trace(scenario.link.up, assets)
    down = resolve_trace(scenario.link.down, assets)
    bundle = ensure_bundle(scenario, out, assets, progress)
    manifest = Manifest.load(bundle)
    images = load_images(scenario.images, manifest.input.shape, scenario.seed, assets)
    times, picks = [], []
    for edge in range(scenario.edges):
        t = arrival_times(scenario.arrival, scenario.rate_hz, scenario.duration_s,
                          scenario.seed * 1000 + edge)
        times.append(t)
        picks.append(images.pick(len(t), scenario.seed * 1000 + edge))
    return Experiment(scenario, out, bundle, manifest, up, down, images, times, picks, info,
                      assets, progress)


def ensure_bundle(scenario: Scenario, out: Path, assets: Path | None,
                  progress: Callable[[str], None] | None) -> Path:
    """The scenario's bundle, or ``OUT/bundle`` built with ``tether partition``."""
    if scenario.bundle:
        Manifest.load(scenario.bundle)
        return Path(scenario.bundle)
    bundle = out / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    weights = scenario.weights
    if weights and weights.startswith("assets:"):
        if assets is None:
            raise ConfigError(f"weights {weights!r} need --assets DIR")
        weights = str(Path(assets) / weights.removeprefix("assets:"))
    cmd = tether_command("partition", scenario.model, "--out", str(bundle), "--force",
                         "--repeats", "3", "--warmup", "1", "--no-progress")
    if weights:
        cmd += ["--weights", weights]
    if progress:
        progress(f"building bundle {bundle} ({scenario.model}, "
                 f"{'weights ' + weights if weights else 'random weights'})")
    with ProcessGroup(out / "logs") as group:
        proc = group.start("partition", cmd)
        if proc.wait() != 0:
            raise PeerUnavailableError(f"`tether partition` failed:\n{group.log_tail('partition')}")
    return bundle


def _write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    """A tiny TOML writer for the flat config tables the runner generates."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


@dataclass
class Infrastructure:
    """The cloud and the link(s) shared by every policy of an experiment.

    ``connect[i]`` is the endpoint edge ``i`` connects to: its own userspace link's port,
    or the cloud's address inside the kernel backend's namespace (one shared link).
    """

    group: ProcessGroup
    connect: list[str]
    stats_path: Path | None = None
    kernel: Any = None           # tether.testbed.kernel.KernelLink

    def reset_clock(self) -> None:
        if self.kernel is not None:
            self.kernel.reset_clock()
        else:
            self.group.children["link"].send_signal(signal.SIGUSR1)

    def link_stats(self) -> list[dict[str, Any]]:
        if self.kernel is not None:
            return [self.kernel.stats()]
        time.sleep(1.2)                      # the link process writes its stats every second
        return read_json_file(self.stats_path) or [] if self.stats_path else []


def start_infrastructure(exp: Experiment, group: ProcessGroup,
                         kernel: Any = None) -> Infrastructure:
    """Start ``tether cloud`` and the link: a ``tether testbed link`` process (one link per
    edge) or, with ``kernel`` (a started KernelLink), the cloud inside its namespace."""
    sc = exp.scenario
    cloud_port = free_port()
    host = kernel.cloud_addr if kernel is not None else "127.0.0.1"
    _write_toml(exp.out / "cloud.toml", {"cloud": {
        "bundles": [str(exp.bundle.resolve())], "bind": f"tcp://{host}:{cloud_port}",
        "torch_threads": sc.cloud_threads}})
    cloud = tether_command("cloud", "--config", str(exp.out / "cloud.toml"))
    group.start("cloud", kernel.netns_command(cloud) if kernel is not None else cloud)
    if kernel is not None:
        group.wait_until("cloud", lambda: port_open(host, cloud_port), START_TIMEOUT_S,
                         "listening")
        return Infrastructure(group, [f"tcp://{host}:{cloud_port}"] * sc.edges, kernel=kernel)
    ports_file, stats = exp.out / "link-ports.json", exp.out / "link-stats.json"
    ports_file.unlink(missing_ok=True)
    group.start("link", _link_command(exp, cloud_port, ports_file, stats))
    group.wait_until("link", ports_file.exists, START_TIMEOUT_S, "listening")
    group.wait_until("cloud", lambda: port_open(host, cloud_port), START_TIMEOUT_S, "listening")
    ports = (read_json_file(ports_file) or {})["ports"]
    return Infrastructure(group, [f"tcp://127.0.0.1:{p}" for p in ports], stats_path=stats)


def _kernel_link(exp: Experiment) -> Any:
    from tether.testbed.kernel import KernelLink, KernelLinkConfig
    link = exp.scenario.link
    cfg = KernelLinkConfig(queue_bytes=link.queue_kb * 1024, delay_ms=link.delay_ms,
                           loss=link.loss)
    return KernelLink(exp.up, exp.down, cfg, exp.info)


def run_policy(exp: Experiment, infra: Infrastructure, label: str,
               entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One policy: start its edges, run the load, stop them; returns result rows."""
    sc = exp.scenario
    run_dir = exp.out / "runs" / label
    run_dir.mkdir(parents=True, exist_ok=True)
    throttle = CpuThrottle(label, sc.cpu_quota, sc.cpu_pin, exp.info)
    try:
        with ProcessGroup(run_dir / "logs") as group:
            endpoints = _start_edges(exp, group, run_dir, infra.connect, entry, throttle)
            for edge in range(sc.edges):
                throttle.add(group.children[f"edge{edge}"].pid)
            time.sleep(sc.warmup_s)
            infra.group.check_alive("cloud")
            infra.reset_clock()                  # trace time 0 is now
            t_start = time.monotonic() + 0.05
            rows = asyncio.run(_drive(exp, label, endpoints, t_start))
            cpu = throttle.stats()
            stats = infra.link_stats()
    finally:
        throttle.close()
    epoch = stats[0]["start_wall"] if stats else None
    for row in rows:
        row["policy"] = label
        row["trace_time"] = (row["sent_wall"] - epoch + sc.link.start_offset_s
                             if epoch else row["sent"] - t_start)
    exp.meta.setdefault("runs", {})[label] = {
        "policy": entry, "link_stats": stats, "throttle": throttle.describe(), "cpu_stat": cpu}
    return rows


def _start_edges(exp: Experiment, group: ProcessGroup, run_dir: Path, connect: list[str],
                 entry: dict[str, Any], throttle: CpuThrottle) -> list[str]:
    """Start the edges; returns each edge's local endpoint once all answer pings."""
    endpoints = []
    for edge in range(exp.scenario.edges):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        config = run_dir / f"edge{edge}.toml"
        _write_edge_config(config, exp, edge, connect[edge], endpoint, entry)
        group.start(f"edge{edge}", tether_command("edge", "--config", str(config)),
                    env=throttle.env())
        endpoints.append(endpoint)
    for edge, endpoint in enumerate(endpoints):
        group.wait_until(f"edge{edge}", lambda e=endpoint: _edge_answers(e), START_TIMEOUT_S,
                         "answering pings")
    return endpoints


def _link_command(exp: Experiment, cloud_port: int, ports_file: Path, stats: Path) -> list[str]:
    sc, link = exp.scenario, exp.scenario.link
    up = _trace_arg(link.up, exp.assets)
    down = _trace_arg(link.down, exp.assets)
    return tether_command(
        "testbed", "link", "--target", f"127.0.0.1:{cloud_port}", "--count", str(sc.edges),
        "--ports-file", str(ports_file), "--stats", str(stats), "--up", up, "--down", down,
        "--delay-ms", str(link.delay_ms), "--loss", str(link.loss), "--rto-ms", str(link.rto_ms),
        "--queue-kb", str(link.queue_kb), "--start-offset", str(link.start_offset_s),
        "--seed", str(sc.seed))


def _trace_arg(spec: str, assets: Path | None) -> str:
    if spec.startswith("assets:") and assets is not None:
        return str(Path(assets) / spec.removeprefix("assets:"))
    return spec


def _write_edge_config(path: Path, exp: Experiment, edge: int, connect: str, endpoint: str,
                       entry: dict[str, Any]) -> None:
    policy = {k: v for k, v in entry.items() if k != "label"}
    _write_toml(path, {
        "edge": {"bundle": str(exp.bundle.resolve()), "listen": endpoint,
                 "edge_id": f"edge{edge}", "deadline_seconds": exp.scenario.deadline_s,
                 "records": str(path.with_suffix(".records.csv"))},
        "link": {"connect": connect},
        "policy": policy})


def _edge_answers(endpoint: str) -> bool:
    from tether.edge.client import EdgeClient
    with EdgeClient(endpoint, timeout=0.5) as client:
        try:
            client.ping()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False


async def _drive(exp: Experiment, label: str, endpoints: list[str],
                 t_start: float) -> list[dict[str, Any]]:
    sc = exp.scenario
    ctx = zmq.asyncio.Context()
    loads = [EdgeLoad(ep, i, sc.deadline_s, ctx) for i, ep in enumerate(endpoints)]
    total = sum(len(t) for t in exp.times)
    done = {"n": 0, "late": 0}
    ticker = asyncio.ensure_future(_progress(exp, label, done, total, t_start))

    def count(row: dict[str, Any]) -> None:
        done["n"] += 1
        done["late"] += deadline_miss(bool(row.get("answered")), row.get("client_seconds"),
                                      sc.deadline_s)

    grace = max(2.0, 4 * sc.deadline_s)
    try:
        await asyncio.gather(*(load.run(exp.times[i], exp.picks[i], exp.images, t_start, grace,
                                        count) for i, load in enumerate(loads)))
    finally:
        ticker.cancel()
        ctx.term()
    _say(exp, f"[{label}] {done['n']}/{total} answered, {done['late']} over the deadline")
    return [row for load in loads for row in load.rows]


async def _progress(exp: Experiment, label: str, done: dict[str, int], total: int,
                    t_start: float) -> None:
    while True:
        await asyncio.sleep(2.0)
        elapsed = time.monotonic() - t_start
        _say(exp, f"[{label}] t={elapsed:5.1f}/{exp.scenario.duration_s:g} s  "
                  f"answered {done['n']}/{total}  late {done['late']}")
