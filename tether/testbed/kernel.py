"""Kernel link backend (root): a network namespace for the cloud, a veth pair, tbf rates.

The cloud runs inside namespace ``tether-<id>`` behind veth ``tb<id>c`` (address
10.77.<n>.2); the host side ``tb<id>e`` (10.77.<n>.1) is the edge's side. A ``tbf`` qdisc on
each side's egress shapes one direction: the host veth carries the uplink, the namespace
veth the downlink. A stepper thread changes each tbf rate every ``step_s`` to the trace's
mean rate over the next step (through one long-lived ``tc -batch -`` per side) and samples
the qdisc byte counters every second. ``netem`` adds delay and loss where the kernel has it;
where it does not (this project's machines) a link that asks for delay or loss is refused
with a :class:`PlatformError` naming the userspace backend. All edges share this one link.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tether.core.errors import PlatformError
from tether.testbed.link import RateTrace
from tether.testbed.platform import PlatformInfo, probe

log = logging.getLogger(__name__)

MIN_RATE_BPS = 8_000          # tbf needs a positive rate: outages become 8 kbit/s
#: tbf on a veth counts Ethernet frames (1514 bytes for a 1448-byte TCP payload); the trace
#: is payload capacity, as in the userspace link, so tbf rates are scaled up by this.
WIRE_OVERHEAD = 1514 / 1448


@dataclass(frozen=True)
class KernelLinkConfig:
    step_s: float = 0.1
    queue_bytes: int = 256 * 1024
    delay_ms: float = 0.0
    loss: float = 0.0
    subnet: int = 77          # 10.<subnet>.<n>.0/30


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PlatformError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}; the kernel "
                            "backend needs root, iproute2 and veth support")


class KernelLink:
    """Namespace + veth + stepped tbf. Use as a context manager; always cleans up."""

    def __init__(self, up: RateTrace, down: RateTrace, cfg: KernelLinkConfig = KernelLinkConfig(),
                 info: PlatformInfo | None = None) -> None:
        self.info = info or probe()
        if not (self.info.root and self.info.netns and self.info.tc_tbf):
            raise PlatformError("kernel backend needs root, network namespaces and tc tbf "
                                f"(probe: {self.info.to_dict()}); use backend = 'userspace'")
        if (cfg.delay_ms > 0 or cfg.loss > 0) and not self.info.netem:
            raise PlatformError("this kernel has no tc netem, so the kernel backend cannot add "
                                "delay or loss: use backend = 'userspace' (it emulates both) "
                                "or set delay_ms = 0 and loss = 0")
        self.up, self.down, self.cfg = up, down, cfg
        tag = uuid.uuid4().hex[:6]
        self.ns, self.edge_dev, self.cloud_dev = f"tether-{tag}", f"tb{tag}e", f"tb{tag}c"
        n = int(tag, 16) % 250 + 1
        self.edge_addr, self.cloud_addr = f"10.{cfg.subnet}.{n}.1", f"10.{cfg.subnet}.{n}.2"
        self.delivered: dict[str, dict[int, int]] = {"up": {}, "down": {}}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch: dict[str, subprocess.Popen] = {}
        self._t0 = 0.0
        self._rebase = True
        self._set: dict[str, tuple[float, bool]] = {}
        self.start_wall = 0.0

    # -- set-up / tear-down -------------------------------------------------------------
    def __enter__(self) -> "KernelLink":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        _ip("ip", "netns", "add", self.ns)
        _ip("ip", "link", "add", self.edge_dev, "type", "veth", "peer", "name", self.cloud_dev)
        _ip("ip", "link", "set", self.cloud_dev, "netns", self.ns)
        _ip("ip", "addr", "add", f"{self.edge_addr}/30", "dev", self.edge_dev)
        _ip("ip", "link", "set", self.edge_dev, "up")
        _ip("ip", "addr", "add", f"{self.cloud_addr}/30", "dev", self.cloud_dev, ns=self.ns)
        _ip("ip", "link", "set", self.cloud_dev, "up", ns=self.ns)
        _ip("ip", "link", "set", "lo", "up", ns=self.ns)
        for side in ("up", "down"):
            self._batch[side] = self._tc_batch(side)
            self._tc(side, "add", self._rate(side, 0.0))
        if self.cfg.delay_ms > 0 or self.cfg.loss > 0:   # only where netem exists (checked)
            for side in ("up", "down"):
                self._batch_cmd(side, f"qdisc add dev {self._dev(side)} parent 1:1 handle 10: "
                                      f"netem delay {self.cfg.delay_ms}ms "
                                      f"loss {self.cfg.loss * 100}%")
        self.reset_clock()
        self._thread = threading.Thread(target=self._step_loop, name="tether-tbf", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for proc in self._batch.values():
            if proc.stdin:
                proc.stdin.close()
            proc.wait(5)
        self._batch.clear()
        subprocess.run(["ip", "link", "del", self.edge_dev], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    # -- tc -----------------------------------------------------------------------------
    def _dev(self, side: str) -> str:
        return self.edge_dev if side == "up" else self.cloud_dev

    def _tc_batch(self, side: str) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", self.ns] if side == "down" else []
        return subprocess.Popen(prefix + ["tc", "-force", "-batch", "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)

    def _batch_cmd(self, side: str, line: str) -> None:
        proc = self._batch[side]
        if proc.stdin is None or proc.poll() is not None:
            raise PlatformError(f"tc batch for the {side}link exited ({proc.returncode})")
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    def _rate(self, side: str, t: float) -> float:
        trace = self.up if side == "up" else self.down
        step = self.cfg.step_s
        return max(MIN_RATE_BPS, trace.bytes_between(t, t + step) * 8.0 / step * WIRE_OVERHEAD)

    def _tc(self, side: str, verb: str, rate_bps: float) -> None:
        """Set the side's tbf rate. A change refills the token bucket (``burst`` bytes): a
        step whose rate changed is lowered by ``burst`` per step to compensate; a rate held
        for a second step is set again without it (one refill, then exact)."""
        target, compensated = self._set.get(side, (-1.0, False))
        same = abs(rate_bps - target) <= 0.01 * max(rate_bps, 1.0)
        if verb == "change" and same and not compensated:
            return
        burst = max(3028, int(rate_bps / 8 * 0.004))        # ~4 ms of data, >= 2 MTUs
        compensate = verb == "change" and not same
        rate = rate_bps - burst * 8 / self.cfg.step_s if compensate else rate_bps
        self._set[side] = (rate_bps, compensate)
        self._batch_cmd(side, f"qdisc {verb} dev {self._dev(side)} root handle 1: tbf "
                              f"rate {int(max(MIN_RATE_BPS, rate))}bit burst {burst} "
                              f"limit {self.cfg.queue_bytes}")

    # -- clock and stepping -------------------------------------------------------------
    def reset_clock(self) -> None:
        """Trace time restarts now (byte counters are re-based by the stepper)."""
        self._t0 = time.monotonic()
        self.start_wall = time.time()
        self._rebase = True

    def _step_loop(self) -> None:
        step, last, second = self.cfg.step_s, {"up": 0, "down": 0}, 0
        while not self._stop.is_set():
            t = time.monotonic() - self._t0
            for side in ("up", "down"):
                self._tc(side, "change", self._rate(side, t))
            if self._rebase:
                self._rebase, second = False, 0
                self.delivered = {"up": {}, "down": {}}
                last = {side: self.qdisc_bytes(side) for side in ("up", "down")}
            elif int(t) != second:
                for side in ("up", "down"):
                    now_bytes = self.qdisc_bytes(side)
                    self.delivered[side][second] = now_bytes - last[side]
                    last[side] = now_bytes
                second = int(t)
            self._stop.wait(max(0.0, step - ((time.monotonic() - self._t0) - t)))

    def qdisc_bytes(self, side: str) -> int:
        """Bytes the side's root qdisc has sent so far."""
        prefix = ["ip", "netns", "exec", self.ns] if side == "down" else []
        done = subprocess.run(prefix + ["tc", "-s", "-j", "qdisc", "show", "dev", self._dev(side)],
                              capture_output=True, text=True, check=False)
        try:
            qdiscs = json.loads(done.stdout or "[]")
        except json.JSONDecodeError:
            return 0
        return int(next((q.get("bytes", 0) for q in qdiscs if q.get("kind") == "tbf"), 0))

    def stats(self) -> dict[str, Any]:
        return {"start_wall": self.start_wall, "backend": "kernel", "namespace": self.ns,
                "up": {"delivered": {str(k): v for k, v in self.delivered["up"].items()}},
                "down": {"delivered": {str(k): v for k, v in self.delivered["down"].items()}}}

    def netns_command(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the cloud's namespace."""
        return ["ip", "netns", "exec", self.ns] + cmd
