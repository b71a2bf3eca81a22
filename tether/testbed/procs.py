"""Child processes of an experiment: started with logs, waited for, always stopped.

:class:`ProcessGroup` starts ``python -m tether ...`` children with their output in
``logs/<name>.log``; on exit it sends SIGTERM to every child still running (then SIGKILL
after a grace period), so no experiment leaves processes behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tether.core.errors import PeerUnavailableError


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tether_command(*args: str) -> list[str]:
    """The command line of ``python -m tether ARGS`` with this interpreter."""
    return [sys.executable, "-m", "tether", *args]


class ProcessGroup:
    """Children of one run; a context manager that stops them all on exit."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ) | (env or {})
        self.children: dict[str, subprocess.Popen] = {}
        self._logs: list[Any] = []

    def start(self, name: str, cmd: list[str],
              env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        self._logs.append(log)
        log.write((" ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=self.env | (env or {}), start_new_session=True)
        self.children[name] = proc
        return proc

    def check_alive(self, name: str) -> None:
        """Raise with the tail of the child's log if it has exited."""
        proc = self.children[name]
        if proc.poll() is not None:
            raise PeerUnavailableError(f"{name} exited with code {proc.returncode}:\n"
                                       f"{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, name: str, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; raise if the child dies or ``timeout`` passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.check_alive(name)
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise PeerUnavailableError(f"{name} not {what} within {timeout:.0f} s; log tail:\n"
                                   f"{self.log_tail(name)}")

    def stop(self, name: str, grace: float = 5.0) -> int | None:
        proc = self.children.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self, grace: float = 5.0) -> None:
        for name in reversed(list(self.children)):
            self.stop(name, grace)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def read_json_file(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
