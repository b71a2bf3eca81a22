"""Applications import the edge client without torch, transformers or ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_many_clients_in_a_row_leak_no_sockets():
    """Each client's connection monitor is stopped on close: thousands of clients made and
    closed on one context (the testbed pings every edge this way) never run out of files."""
    import zmq

    from tether.edge.client import EdgeClient
    ctx = zmq.Context()
    try:
        for _ in range(2000):
            client = EdgeClient("tcp://127.0.0.1:9", timeout=0.1, context=ctx)
            client.close()
    finally:
        ctx.term()
