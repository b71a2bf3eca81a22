"""Real `tether cloud` / `tether edge` processes on 127.0.0.1 for the integration tests."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"tether (cloud|edge) ready on (\S+)(?: metrics (\S+))?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One `python -m tether ARGS` process; :meth:`start` returns once it printed its ready line."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.metrics_url = ""
        self.ready_line = ""

    def start(self, timeout: float = 90.0) -> "Daemon":
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "tether", *self.args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        line = self._wait_line(timeout)
        match = READY.search(line)
        self.endpoint, self.metrics_url = match.group(2), match.group(3) or ""
        self.ready_line = line
        return self

    def _wait_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline()
                if READY.search(line):
                    return line
                if not line and self.proc.poll() is not None:
                    break
        self.kill()
        raise RuntimeError(f"{self.args[0]} did not start; log:\n{self.log_path.read_text()[-3000:]}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "_log", None) is not None:
            self._log.close()


def cloud_args(bundle: Path, port: int, *extra: str) -> list[str]:
    return ["cloud", "--bundle", str(bundle), "--bind", f"tcp://127.0.0.1:{port}",
            "--metrics-port", "0", "--max-queue-delay-ms", "4", "--torch-threads", "1", *extra]


def histogram_mean(metrics_text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram across its label sets."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


class CloudHolder:
    """The session's `tether cloud` process on a fixed port: killed and restarted in place."""

    def __init__(self, bundle: Path, log_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.bundle = bundle
        self.extra = extra
        self.port = free_port()
        self.log_dir = log_dir
        self.starts = 0
        self.daemon = self.start()

    def start(self) -> Daemon:
        self.starts += 1
        self.daemon = Daemon(cloud_args(self.bundle, self.port, *self.extra),
                             self.log_dir / f"cloud-{self.starts}.log").start()
        return self.daemon

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def stop(self) -> int | None:
        self.daemon.signal(signal.SIGTERM)
        try:
            return self.daemon.wait(30)
        finally:
            self.daemon.kill()
