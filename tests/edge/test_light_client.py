"""Applications import the edge client without torch, transformers or ONNX Runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from support.bundles import REPO

HEAVY = ("torch", "transformers", "onnxruntime", "onnx", "compressai", "torchvision")
SCRIPT = """
import json, sys
from tether.edge import EdgeClient, EdgeAnswer, TokenStream
from tether.edge.client import EdgeClient as Direct
assert EdgeClient is Direct and callable(EdgeClient.generate) and EdgeAnswer and TokenStream
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps(heavy))
"""


def test_edge_clients_import_no_torch_or_transformers():
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(HEAVY)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_clients_in_a_row_leak_no_sockets():
    """Each client's connection monitor is stopped on close: a thousand clients made and
    closed on one context (the testbed pings every edge this way) leave no file open once
    libzmq's reaper has caught up, and the context terminates (a monitor address reused
    too early used to hang it)."""
    import threading

    import zmq

    from tether.edge.client import EdgeClient
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 8192)     # closing is asynchronous: room while the reaper lags
    files_before = _open_files()
    for _ in range(1000):
        client = EdgeClient("tcp://127.0.0.1:9", timeout=0.1, context=ctx)
        client.close()
    deadline = time.monotonic() + 20
    while _open_files() > files_before + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_files() <= files_before + 8, "closed clients keep sockets (and files) open"
    terminated = threading.Thread(target=ctx.term, daemon=True)
    terminated.start()
    terminated.join(30)
    assert not terminated.is_alive(), "the context did not terminate: a socket was left open"
