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
