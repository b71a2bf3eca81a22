"""`tether edge` as a real process: EdgeClient, `tether infer`, records, metrics, SIGTERM drain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from PIL import Image

from tether.cli import main
from tether.core import protocol as P
from tether.core.errors import InputShapeError
from tether.edge.client import EdgeClient
from tether.edge.records import read_records

from support.bundles import SPLITS, reference_logits, sample_images

from support.procs import Daemon, free_port

pytestmark = pytest.mark.slow
IMAGES = sample_images(24)


@pytest.fixture(scope="module")
def edge_daemon(bundle, cloud, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge-daemon")
    records = tmp / "records.jsonl"
    daemon = Daemon(["edge", "--bundle", str(bundle), "--connect", cloud.endpoint,
                     "--listen", f"tcp://127.0.0.1:{free_port()}", "--metrics-port", "0",
                     "--records", str(records), "--edge-id", "cam-1",
                     "--action", f"split:{SPLITS[1]}:fp32", "--deadline", "5"],
                    tmp / "edge.log").start()
    yield daemon, records, tmp
    daemon.kill()


def test_client_gets_the_whole_models_answers_and_errors(bundle, edge_daemon):
    daemon, _, _ = edge_daemon
    expected = reference_logits(bundle, IMAGES)
    with EdgeClient(daemon.endpoint, timeout=30) as client:
        info = client.info()
        assert info.model_id == "cifar_resnet20" and info.input.shape == (1, 3, 32, 32)
        assert client.ping() < 1.0
        answers = [client.infer(img) for img in IMAGES[:12]]
        with pytest.raises(InputShapeError, match="HWC"):
            client.infer(np.zeros((30, 32, 3), np.uint8))
        answers.append(client.infer(IMAGES[12]))        # still serving after bad input
    for answer, ref in zip(answers, expected):
        np.testing.assert_allclose(answer.logits[0], ref, rtol=1e-4, atol=1e-4)
        assert answer.prediction == int(np.argmax(ref))
        assert answer.outcome == "cloud" and answer.action == f"split:{SPLITS[1]}:fp32"
        assert answer.label and answer.timings["total"] >= answer.timings["head"] > 0
    metrics = urllib_get(daemon.metrics_url)
    assert 'tether_edge_requests_total{action="split",outcome="cloud"}' in metrics
    assert "tether_edge_cloud_ready 1.0" in metrics


def test_infer_command_reads_image_files(bundle, edge_daemon, capsys):
    daemon, _, tmp = edge_daemon
    paths = []
    for i in range(3):
        paths.append(tmp / f"img{i}.png")
        Image.fromarray(IMAGES[i]).save(paths[-1])
    big = tmp / "big.jpg"                                   # resized to 32x32 by the client
    Image.fromarray(np.kron(IMAGES[0], np.ones((4, 4, 1), np.uint8))).save(big, quality=95)
    # the real command line, parsed and run in-process (a subprocess would only add the
    # interpreter start-up to the test time)
    assert main(["infer", "--edge", daemon.endpoint, "--json", *map(str, paths), str(big)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = reference_logits(bundle, IMAGES[:3])
    assert [r["class"] for r in rows[:3]] == list(np.argmax(expected, axis=1))
    assert all(r["outcome"] == "cloud" and r["timings"]["total"] > 0 for r in rows)
    assert len(rows) == 4 and rows[3]["label"]
    assert main(["infer", "--edge", daemon.endpoint, str(paths[0])]) == 0
    human = capsys.readouterr().out
    assert "class" in human and "ms" in human and "cloud via split" in human
    assert main(["infer", "--edge", daemon.endpoint, str(tmp / "missing.png")]) == 1
    assert "cannot read image" in capsys.readouterr().err


def test_sigterm_drains_every_request_and_exits_cleanly(edge_daemon):
    """40 requests pipelined, SIGTERM after the first answer: each gets an answer or BUSY."""
    daemon, records_path, _ = edge_daemon
    before = len(read_records(records_path))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        for rid in range(1, 41):
            desc, view = P.tensor_frame(IMAGES[rid % len(IMAGES)])
            sock.send_multipart(P.encode(P.ImageRequest(rid, (desc,), (view,))))
        replies = [P.decode(sock.recv_multipart())] if sock.poll(60_000) else []
        daemon.signal(15)
        while len(replies) < 40 and sock.poll(30_000):
            replies.append(P.decode(sock.recv_multipart()))
    finally:
        sock.close()
    assert daemon.wait(30) == 0
    assert sorted(r.request_id for r in replies) == list(range(1, 41))   # none lost
    kinds = [type(r).__name__ for r in replies]
    assert set(kinds) <= {"ImageReply", "Busy"} and "ImageReply" in kinds
    assert all(r.reason == "draining" for r in replies if isinstance(r, P.Busy))
    records = read_records(records_path)
    assert len(records) - before == kinds.count("ImageReply")
    assert {r.edge_id for r in records} == {"cam-1"}


def urllib_get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_client_of_a_sigkilled_edge_fails_fast(bundle, tmp_path):
    """Defect: a client talking to a SIGKILLed edge waited its whole timeout."""
    import signal
    import time

    from tether.core.errors import PeerUnavailableError

    daemon = Daemon(["edge", "--bundle", str(bundle), "--action", "local",
                     "--listen", f"tcp://127.0.0.1:{free_port()}"], tmp_path / "edge.log").start()
    try:
        with EdgeClient(daemon.endpoint, timeout=30) as client:
            assert client.infer(IMAGES[0]).outcome == "local"
            daemon.signal(signal.SIGSTOP)          # the request below stays pending...
            t0 = time.monotonic()
            import threading
            threading.Timer(0.5, daemon.signal, (signal.SIGKILL,)).start()   # ...then it dies
            with pytest.raises(PeerUnavailableError, match="closed the connection"):
                client.infer(IMAGES[1])
            pending = time.monotonic() - t0
            t0 = time.monotonic()
            with pytest.raises(PeerUnavailableError, match="refuses connections"):
                client.infer(IMAGES[2])                # sent after it died
            after = time.monotonic() - t0
    finally:
        daemon.kill()
    assert pending < 5.0 and after < 5.0, (pending, after)
