"""The chaos ledger: real daemons, a seeded request stream, seeded faults, one row per request.

:func:`run_chaos` starts ``tether cloud``, one ``tether testbed link`` process (a link per
edge) and ``tether edge`` daemons as real processes (edge -> link -> cloud), sends a seeded
Poisson stream of images to every edge and meanwhile injects, at seeded random times:

* ``cloud_kill``  SIGKILL the cloud, restart it on the same port (window ends when it answers);
* ``cloud_stop``  SIGSTOP the cloud for 2 s (a hung server), then SIGCONT;
* ``link_cut``    SIGSTOP the link process for 3 s: nothing crosses the network, TCP holds;
* ``burst``       a burst of requests at once to one edge (overload; ledgered like the rest),
                  then heavy batches straight to the cloud without deadline (its admission
                  must not keep refusing once they are done);
* ``fuzz``        seeded malformed frames to the cloud and to an edge's endpoint.

Every request's outcome goes to ``ledger.jsonl`` (edge, id, send time, outcome, fallback
reason, replies received, prediction, whether the logits equal the whole model's), every
fault to ``faults.jsonl``, the RSS of every daemon each second to ``rss.csv``, and the
totals to ``summary.json``. :func:`check` lists what broke the rules: a request not
answered exactly once, an answer that is not the whole model's (cloud, split or local), a
refusal (BUSY, or a fallback for "busy") while the cloud was idle and healthy, memory above
a high-water bound or still growing late in a long-lived process (a leak).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from tether.core import protocol as P
from tether.core.sockets import open_socket
from tether.core.bundle import Manifest
from tether.core.errors import PeerUnavailableError
from tether.testbed.chaos_load import ChaosClient, cloud_burst, fuzz_frames, send_fuzz
from tether.testbed.procs import ProcessGroup, free_port, port_open, read_json_file, tether_command

FAULTS = ("cloud_kill", "cloud_stop", "link_cut", "burst", "fuzz")
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ChaosConfig:
    bundle: Path
    out: Path
    duration_s: float = 40.0         # of the request stream
    edges: int = 2
    rate_hz: float = 6.0             # requests per second per edge (Poisson)
    deadline_s: float = 2.0          # per request, as the application sends it
    seed: int = 0
    faults: tuple[str, ...] = FAULTS  # kinds drawn from (each once first, then at random)
    first_fault_s: float = 4.0
    gap_s: tuple[float, float] = (2.0, 5.0)   # seeded pause after a fault's recovery
    recovery_s: float = 3.0          # after a fault ends, the edges may still be reconnecting
    burst: int = 48
    cloud_burst: tuple[int, int] = (16, 64)   # then this many batches of N images straight
    #                                           to the cloud, no deadline (a heavy legal load)
    fuzz_frames: int = 40
    action: str = ""                 # edge action; "" = the smallest exported split, fp32
    images: int = 32


@dataclass
class Fault:
    kind: str
    start: float                     # monotonic
    end: float = 0.0
    detail: str = ""


@dataclass
class Ledger:
    """Requests by (edge, id); faults; RSS samples."""

    rows: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    rss: list[tuple[float, str, int, int]] = field(default_factory=list)   # t, name, pid, kB


class _Daemons:
    """The cloud, the link and the edges of one chaos run (a ProcessGroup)."""

    def __init__(self, cfg: ChaosConfig, group: ProcessGroup) -> None:
        self.cfg, self.group = cfg, group
        self.cloud_port = free_port()
        self.cloud_name = "cloud"
        self.restarts = 0
        self.endpoints: list[str] = []

    @property
    def cloud_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.cloud_port}"

    def start(self, action: str) -> None:
        self.start_cloud()
        ports_file = self.cfg.out / "link-ports.json"
        ports_file.unlink(missing_ok=True)
        self.group.start("link", tether_command(
            "testbed", "link", "--target", f"127.0.0.1:{self.cloud_port}", "--count",
            str(self.cfg.edges), "--ports-file", str(ports_file), "--up", "constant:100",
            "--down", "constant:100", "--queue-kb", "2048"))
        self.group.wait_until("link", ports_file.exists, START_TIMEOUT_S, "listening")
        links = (read_json_file(ports_file) or {})["ports"]
        for i, port in enumerate(links):
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            self.group.start(f"edge{i}", tether_command(
                "edge", "--bundle", str(self.cfg.bundle), "--connect", f"tcp://127.0.0.1:{port}",
                "--listen", endpoint, "--action", action, "--edge-id", f"edge{i}",
                "--deadline", str(self.cfg.deadline_s)))
            self.endpoints.append(endpoint)
        for i, endpoint in enumerate(self.endpoints):
            self.group.wait_until(f"edge{i}", lambda e=endpoint: _answers_ping(e),
                                  START_TIMEOUT_S, "answering pings")
        self.wait_cloud()

    def start_cloud(self) -> None:
        self.cloud_name = "cloud" if not self.restarts else f"cloud{self.restarts}"
        self.group.start(self.cloud_name, tether_command(
            "cloud", "--bundle", str(self.cfg.bundle), "--bind", self.cloud_endpoint,
            "--torch-threads", "1", "--max-queue-delay-ms", "4"))

    def wait_cloud(self) -> None:
        self.group.wait_until(self.cloud_name, lambda: port_open("127.0.0.1", self.cloud_port)
                              and _answers_ping(self.cloud_endpoint), START_TIMEOUT_S,
                              "answering pings")

    def signal(self, name: str, sig: int) -> None:
        proc = self.group.children[name]
        if proc.poll() is None:
            proc.send_signal(sig)

    def kill_and_restart_cloud(self) -> None:
        proc = self.group.children[self.cloud_name]
        proc.kill()
        proc.wait(10)
        self.restarts += 1
        self.start_cloud()
        self.wait_cloud()

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.group.children.items() if p.poll() is None}


def _answers_ping(endpoint: str, timeout: float = 0.5) -> bool:
    ctx = zmq.Context.instance()
    sock = open_socket(ctx, zmq.DEALER)
    try:
        sock.connect(endpoint)
        sock.send_multipart(P.encode(P.Ping(1, time.monotonic())))
        if not sock.poll(int(timeout * 1000)):
            return False
        return isinstance(P.decode(sock.recv_multipart()), P.Pong)
    except Exception:  # noqa: BLE001 - anything else: not answering yet
        return False
    finally:
        sock.close(linger=0)


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Chaos:
    """One run: the stream, the faults and the RSS sampler on one event loop."""

    def __init__(self, cfg: ChaosConfig, daemons: _Daemons, images: np.ndarray,
                 reference: np.ndarray) -> None:
        self.cfg, self.daemons = cfg, daemons
        self.images, self.reference = images, reference
        self.ledger = Ledger()
        self.rng = random.Random(cfg.seed)

    async def run(self) -> Ledger:
        ctx = zmq.asyncio.Context()
        clients = [ChaosClient(i, ep, ctx, self.ledger, self.images, self.reference,
                           self.cfg.deadline_s) for i, ep in enumerate(self.daemons.endpoints)]
        readers = [asyncio.ensure_future(c.receive()) for c in clients]
        sampler = asyncio.ensure_future(self._sample_rss())
        t0 = time.monotonic()
        try:
            await asyncio.gather(*(self._stream(c, t0) for c in clients),
                                 self._faults(clients, ctx, t0))
            await self._drain(grace=4 * self.cfg.deadline_s + 5.0)
        finally:
            for task in (*readers, sampler):
                task.cancel()
            await asyncio.gather(*readers, sampler, return_exceptions=True)
            for c in clients:
                c.sock.close(linger=0)
            ctx.term()
        return self.ledger

    async def _stream(self, client: ChaosClient, t0: float) -> None:
        rng = np.random.default_rng([self.cfg.seed, client.edge])
        t = float(rng.exponential(1 / self.cfg.rate_hz))
        while t < self.cfg.duration_s:
            await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
            client.send(int(rng.integers(len(self.images))), "stream")
            t += float(rng.exponential(1 / self.cfg.rate_hz))

    async def _faults(self, clients: list[ChaosClient], ctx: zmq.asyncio.Context, t0: float) -> None:
        kinds = list(self.cfg.faults)
        self.rng.shuffle(kinds)                 # each kind once, then seeded draws
        await asyncio.sleep(self.cfg.first_fault_s)
        while time.monotonic() - t0 < self.cfg.duration_s - 6.0:
            kind = kinds.pop(0) if kinds else self.rng.choice(self.cfg.faults)
            fault = Fault(kind, time.monotonic())
            self.ledger.faults.append(fault)
            fault.detail = await self._inject(kind, clients, ctx)
            fault.end = time.monotonic()
            await asyncio.sleep(self.cfg.recovery_s + self.rng.uniform(*self.cfg.gap_s))

    async def _inject(self, kind: str, clients: list[ChaosClient], ctx: zmq.asyncio.Context) -> str:
        d = self.daemons
        if kind == "cloud_kill":
            await asyncio.to_thread(d.kill_and_restart_cloud)
            return f"restarted as {d.cloud_name}"
        if kind in ("cloud_stop", "link_cut"):
            name, pause = (d.cloud_name, 2.0) if kind == "cloud_stop" else ("link", 3.0)
            d.signal(name, signal.SIGSTOP)
            try:
                await asyncio.sleep(pause)
            finally:
                d.signal(name, signal.SIGCONT)
            return f"{name} stopped {pause:g} s"
        if kind == "burst":
            client = self.rng.choice(clients)
            for _ in range(self.cfg.burst):
                client.send(self.rng.randrange(len(self.images)), "burst")
            await self._drain(grace=30.0, kind="burst")
            n, batch = self.cfg.cloud_burst
            got = await cloud_burst(d.cloud_endpoint, ctx, self.images, n, batch,
                                     Manifest.load(self.cfg.bundle).fingerprint)
            return (f"{self.cfg.burst} requests to edge{client.edge}; {n}x{batch} images to "
                    f"the cloud: {got}")
        frames = fuzz_frames(self.rng, self.cfg.fuzz_frames, self.images[0])
        edge = self.rng.randrange(len(clients))
        got = (await send_fuzz(d.cloud_endpoint, frames, ctx),
               await send_fuzz(d.endpoints[edge], frames, ctx))
        return f"{len(frames)} frames each to the cloud and edge{edge}: {got[0]}+{got[1]} replies"

    async def _drain(self, grace: float, kind: str | None = None) -> None:
        end = time.monotonic() + grace
        while time.monotonic() < end and any(
                r["replies"] == 0 for r in self.ledger.rows.values()
                if kind is None or r["kind"] == kind):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)        # a duplicate reply would arrive about now

    async def _sample_rss(self) -> None:
        while True:
            now = time.monotonic()
            for name, pid in self.daemons.pids().items():
                self.ledger.rss.append((now, name, pid, _rss_kb(pid)))
            await asyncio.sleep(1.0)


def reference_logits(bundle: Path, images: np.ndarray) -> np.ndarray:
    """The whole model's logits (the bundle's full ONNX model) for uint8 HWC ``images``."""
    from tether.partitioner import BundleModel, OnnxModule
    full = OnnxModule(str(BundleModel.load(bundle).full_onnx_path()), threads=1)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    return np.concatenate([np.asarray(full(x[i:i + 1]), dtype=np.float32) for i in range(len(x))])


def default_action(bundle: Path) -> str:
    """The exported split with the fewest crossing bytes, fp32 (lossless: exact answers)."""
    manifest = Manifest.load(bundle)
    heads = [e for e in manifest.split_points if e.head]
    if not heads:
        raise PeerUnavailableError(f"bundle {bundle} exports no ONNX heads")
    return f"split:{min(heads, key=lambda e: (e.bytes, e.index)).name}:fp32"


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Start everything, run the stream and the faults, write the ledger; the summary."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(cfg.bundle)
    c, h, w = manifest.input.shape[1:]
    images = np.random.default_rng(cfg.seed).integers(0, 256, (cfg.images, h, w, c), np.uint8)
    reference = reference_logits(cfg.bundle, images)
    load0 = _loadavg()
    with ProcessGroup(cfg.out / "logs", env={"OMP_NUM_THREADS": "1"}) as group:
        daemons = _Daemons(cfg, group)
        daemons.start(cfg.action or default_action(cfg.bundle))
        started = time.monotonic()
        ledger = asyncio.run(_Chaos(cfg, daemons, images, reference).run())
        current = (daemons.cloud_name, "link", *(f"edge{i}" for i in range(cfg.edges)))
        alive = {name: group.children[name].poll() is None for name in current}
    summary = summarize(cfg, ledger, time.monotonic() - started, alive, (load0, _loadavg()))
    write_ledger(cfg.out, ledger, summary)
    return summary


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def in_fault(row: dict[str, Any], faults: list[Fault], recovery_s: float,
             deadline_s: float) -> str:
    """The fault kind whose window (+ recovery) overlaps the request's life, or ""."""
    for f in faults:
        if f.kind == "fuzz":
            continue           # malformed frames are no excuse for refusing good requests
        end = (f.end or f.start) + recovery_s
        if row["sent"] <= end and row["sent"] + deadline_s >= f.start - 0.2:
            return f.kind
    return ""


def summarize(cfg: ChaosConfig, ledger: Ledger, seconds: float, alive: dict[str, bool],
              load: tuple[list[float], list[float]]) -> dict[str, Any]:
    rows = list(ledger.rows.values())
    for row in rows:
        row["fault"] = "burst" if row["kind"] == "burst" else in_fault(
            row, ledger.faults, cfg.recovery_s, cfg.deadline_s)
    outcomes: dict[str, int] = {}
    for row in rows:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
    kinds: dict[str, int] = {}
    for f in ledger.faults:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return {
        "requests": len(rows), "seconds": round(seconds, 1), "seed": cfg.seed,
        "edges": cfg.edges, "outcomes": outcomes, "faults": kinds,
        "lost": sum(r["replies"] == 0 for r in rows),
        "duplicates": sum(r["replies"] > 1 for r in rows),
        "mismatches": sum(r.get("matches") is False for r in rows),
        "healthy_refusals": sum(_refused(r) and not r["fault"] for r in rows),
        "refusals": sum(_refused(r) for r in rows),
        "errors": sum(r["outcome"] == "error" for r in rows),
        "rss_kb": rss_summary(ledger.rss), "alive": alive,
        "loadavg_start": load[0], "loadavg_end": load[1]}


def _refused(row: dict[str, Any]) -> bool:
    return row["outcome"] == "busy" or row.get("reason") == "busy"


def rss_summary(samples: list[tuple[float, str, int, int]],
                warm_s: float = 10.0) -> dict[str, dict[str, int]]:
    """Per process (name:pid), RSS kB: at the first sample; once warm (the most in its first
    ``warm_s`` seconds: a restarted cloud is still loading at its first sample); the peak;
    the last; the peaks of the first half and of the last quarter of its life (a leak
    shows as the second above the first), and its life in seconds."""
    series: dict[str, list[tuple[float, int]]] = {}
    for t, name, pid, kb in samples:
        if kb > 0:
            series.setdefault(f"{name}:{pid}", []).append((t, kb))
    out = {}
    for proc, points in series.items():
        t0, t1 = points[0][0], points[-1][0]
        half, quarter = t0 + (t1 - t0) / 2, t1 - (t1 - t0) / 4
        out[proc] = {"start": points[0][1], "peak": max(kb for _, kb in points),
                     "warm": max(kb for t, kb in points if t - t0 <= warm_s),
                     "end": points[-1][1],
                     "first_half_peak": max(kb for t, kb in points if t <= half),
                     "last_quarter_peak": max(kb for t, kb in points if t >= quarter),
                     "seconds": int(t1 - t0)}
    return out


def write_ledger(out: Path, ledger: Ledger, summary: dict[str, Any]) -> None:
    with open(out / "ledger.jsonl", "w") as f:
        for row in sorted(ledger.rows.values(), key=lambda r: r["sent"]):
            f.write(json.dumps(row) + "\n")
    with open(out / "faults.jsonl", "w") as f:
        for fault in ledger.faults:
            f.write(json.dumps(asdict(fault)) + "\n")
    with open(out / "rss.csv", "w") as f:
        f.write("t,process,pid,rss_kb\n")
        for t, name, pid, kb in ledger.rss:
            f.write(f"{t:.3f},{name},{pid},{kb}\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def check(summary: dict[str, Any], max_growth_mb: float = 800.0, max_leak_mb: float = 50.0,
          leak_min_s: int = 300) -> list[str]:
    """The rules a chaos run must keep; each broken one as a sentence (empty: all kept)."""
    broken = []
    for key, what in (("lost", "requests never answered"), ("duplicates", "answered twice"),
                      ("mismatches", "answers differ from the whole model's"),
                      ("healthy_refusals", "refused while the cloud was idle and healthy"),
                      ("errors", "answered with an ERROR")):
        if summary[key]:
            broken.append(f"{summary[key]} {what}")
    for proc, rss in summary["rss_kb"].items():
        if (rss["peak"] - rss["warm"]) / 1024 > max_growth_mb:      # high-water bound
            broken.append(f"{proc} grew from {rss['warm'] // 1024} to {rss['peak'] // 1024} MB")
        growth = (rss["last_quarter_peak"] - rss["first_half_peak"]) / 1024
        if rss["seconds"] >= leak_min_s and growth > max_leak_mb:   # still growing: a leak
            broken.append(f"{proc} kept growing: {growth:.0f} MB more in its last quarter "
                          f"than in its first half")
    dead = [name for name, ok in summary["alive"].items() if not ok]
    if dead:
        broken.append(f"processes died: {dead}")
    return broken
