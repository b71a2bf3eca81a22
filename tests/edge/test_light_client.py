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


def test_a_dropped_client_closes_in_order_and_the_context_still_serves():
    """A client dropped without close() (a raised error holding it in a traceback, a
    reference cycle) is closed monitor first by its finalizer: pyzmq's own __del__ could
    close the monitor's socket before the DEALER, and libzmq's I/O thread then blocked for
    good on the next event (CI: every later client of the suite found no connection)."""
    import gc
    import warnings

    import zmq

    from tether.core.sockets import open_socket
    from tether.edge.client import EdgeClient
    ctx = zmq.Context()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            client = EdgeClient("tcp://127.0.0.1:9", timeout=0.1, context=ctx)
            client.cycle = client
            del client
            gc.collect()
        unclosed = [w for w in caught if "Unclosed socket" in str(w.message)]
        assert not unclosed, "pyzmq closed the client's sockets in whatever order GC found them"
        time.sleep(0.3)                               # retries of port 9 would be monitor events
        server = open_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*")
        probe = open_socket(ctx, zmq.DEALER, connect=server.getsockopt_string(zmq.LAST_ENDPOINT))
        probe.send(b"still served")
        assert server.poll(5000), "the context's I/O thread is stuck"
        probe.close()
        server.close()
    finally:
        ctx.destroy(linger=0)
