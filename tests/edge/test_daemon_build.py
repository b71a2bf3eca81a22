"""Assembling the agent from an EdgeConfig: default action, named policies, CURVE key loading."""

from __future__ import annotations

import pytest
import zmq.auth

from tether.core.errors import ConfigError
from tether.core.types import LOCAL, Action
from tether.edge.config import EdgeConfig, EdgeLinkConfig
from tether.edge.daemon import build_agent
from tether.edge.zmq_link import CurveClientKeys, ZmqCloudLink


def test_auto_action_is_local_without_a_cloud_and_smallest_split_with_one(bundle):
    alone = build_agent(EdgeConfig(bundle=bundle))
    assert alone.link is None and alone.policy.decide(None) == LOCAL
    linked = build_agent(EdgeConfig(bundle=bundle, link=EdgeLinkConfig("tcp://127.0.0.1:9")))
    assert isinstance(linked.link, ZmqCloudLink)
    assert linked.policy.decide(None) == Action.parse("split:layer2.2:fp32")   # 32 KiB < 64 KiB
    assert linked.link.bundle.fingerprint == linked.compute.fingerprint


def test_policy_table_builds_a_named_policy_and_bad_ones_are_config_errors(bundle):
    agent = build_agent(EdgeConfig(bundle=bundle, policy={"name": "local"}))
    assert agent.policy.decide(None).kind.value == "local"
    with pytest.raises(ConfigError, match="unknown policy"):
        build_agent(EdgeConfig(bundle=bundle, policy={"name": "telepathy"}))
    with pytest.raises(ConfigError, match="objective"):
        build_agent(EdgeConfig(bundle=bundle, policy={"name": "adaptive", "objective": "speed"}))
    with pytest.raises(ConfigError, match="no bundle"):
        build_agent(EdgeConfig())


def test_curve_keys_load_from_files_or_z85_and_fail_clearly(tmp_path):
    server_pub, _ = zmq.auth.create_certificates(str(tmp_path), "server")
    _, client_sec = zmq.auth.create_certificates(str(tmp_path), "edge")
    from_file = CurveClientKeys.load(server_pub, client_sec)
    z85 = zmq.auth.load_certificate(server_pub)[0].decode()
    assert CurveClientKeys.load(z85, client_sec) == from_file
    assert len(from_file.secret) == 40
    with pytest.raises(ConfigError, match="tether keys generate"):
        CurveClientKeys.load(z85, tmp_path / "missing.key_secret")
    with pytest.raises(ConfigError, match="Z85"):
        CurveClientKeys.load("short", client_sec)


@pytest.mark.parametrize("action, says", [
    ("offload:jpeg999", "unknown codec"), ("split:nosuch:fp16", "nosuch"),
    ("split:layer2.2:nope", "nope"), ("exit:layer2.2:fp32", "no early exit"),
    ("split:layer1.0:fp16", "no exported ONNX head"),
    ("split:layer2.2:jpeg75", "input only")])
def test_an_action_the_bundle_cannot_run_is_refused_at_start(bundle, action, says):
    """Defect: these started, reported ready and answered 100 % by local fallback."""
    with pytest.raises(ConfigError, match=says):
        build_agent(EdgeConfig(bundle=bundle, link=EdgeLinkConfig("tcp://127.0.0.1:9"),
                                action=action))
    assert build_agent(EdgeConfig(bundle=bundle, action="offload:jpeg90")).policy.decide(None) \
        == Action.parse("offload:jpeg90")


def test_tether_edge_with_a_bad_action_exits_with_one_line(bundle):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "tether", "edge", "--bundle", str(bundle),
                           "--connect", "tcp://127.0.0.1:9", "--listen", "tcp://127.0.0.1:0",
                           "--action", "split:nosuch:fp16"], capture_output=True, text=True,
                          timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tether: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "nosuch" in errors[0] and "Traceback" not in proc.stderr
class _StubLink:
    """A cloud link that only counts handshakes (what the daemon's gauge loop reads)."""

    endpoint = "tcp://127.0.0.1:9"
    ready = True
    connects = 0

    def set_rtt_callback(self, callback):
        self.callback = callback


def test_reconnects_exclude_the_first_connect_and_policy_estimates_are_exported(bundle):
    import asyncio

    from tether.edge.daemon import EdgeDaemon

    daemon = EdgeDaemon(EdgeConfig(bundle=bundle, policy={"name": "adaptive"}))
    link = daemon.agent.link = _StubLink()
    get = daemon.registry.get_sample_value

    async def run_loop(connects):
        link.connects = connects
        task = asyncio.create_task(daemon._update_gauges())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run_loop(1))
    assert get("tether_edge_reconnects_total") == 0          # the first handshake
    asyncio.run(run_loop(3))      # a fresh loop counts from the first connect again
    assert get("tether_edge_reconnects_total") == 2
    name = daemon.agent.policy.name
    assert get("tether_edge_policy_bandwidth_bytes_per_second", {"policy": name}) > 0
    assert get("tether_edge_policy_rtt_seconds", {"policy": name}) > 0


def test_the_entry_point_freezes_the_start_up_heap():
    """A full collection over the frameworks' objects would stall a throttled edge for seconds:
    the entry point moves them out of the collector's reach (in a child: not this process)."""
    import subprocess
    import sys
    code = ("import gc, time\n"
            "from tether.edge.daemon import freeze_startup_heap\n"
            "n = freeze_startup_heap()\n"
            "t = time.process_time(); gc.collect(); cpu = time.process_time() - t\n"
            "print(n, gc.get_freeze_count(), cpu)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    frozen, still, cpu = int(out[0]), int(out[1]), float(out[2])
    assert frozen > 50_000 and still == frozen      # torch's objects among them
    assert cpu < 0.05                               # a full pass no longer walks them
