"""The batch-executor seam (issue 12) without Ray: config, flags, and the core's contract.

A scripted executor stands in for a worker pool: the core must hand it only as many batches
as it has slots (back-pressure stays at admission: BUSY), answer ERROR "unavailable" and
report not-ready while no worker is live, and recover when one is. The Ray pool itself is
tested against a real cluster in tests/integration/test_ray.py.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

import pytest
import torch

from tether.cloud.config import CloudConfig, RayConfig, load_cloud_config
from tether.cloud.core import CloudCore
from tether.commands import cloud as cloud_command
from tether.commands.cloud import build_config
from tether.core import protocol as P
from tether.core.errors import ConfigError

from support.cloud import slow_bundle


def parse(argv):
    parser = argparse.ArgumentParser(prog="tether")
    cloud_command.add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_ray_section_in_toml_and_flags_override_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[cloud]\nworkers = 2\n[cloud.ray]\naddress = '10.0.0.1:6379'\n"
                    "tail_workers = 4\nworker_gpus = 0.5\ndevice = 'cuda'\n")
    config = load_cloud_config(path)
    assert config.ray == RayConfig(address="10.0.0.1:6379", tail_workers=4, worker_gpus=0.5,
                                   device="cuda")
    assert config.ray.enabled and not CloudConfig().ray.enabled
    args = parse(["cloud", "--config", str(path), "--ray", "auto", "--tail-workers", "3",
                  "--worker-cpus", "0.5"])
    merged = build_config(args)
    assert (merged.ray.address, merged.ray.tail_workers, merged.ray.worker_cpus,
            merged.ray.worker_gpus, merged.workers) == ("auto", 3, 0.5, 0.5, 2)


@pytest.mark.parametrize("toml, match", [
    ("[cloud.ray]\ntail_workers = 0\n", "tail_workers"),
    ("[cloud.ray]\ndevice = 'tpu'\n", "ray.device"),
    ("[cloud.ray]\nworkers = 2\n", "cloud.ray.workers"),
    ("[cloud.ray]\nworker_cpus = -1\n", "worker_cpus"),
])
def test_bad_ray_sections_name_the_key(tmp_path, toml, match):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_cloud_config(path)


def test_the_default_install_never_imports_ray():
    code = ("import sys, tether.cloud.server, tether.cloud.ray_pool, tether.cloud.ray_dispatch, "
            "tether.commands.cloud; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


class ScriptedPool:
    """A BatchExecutor twin: ``slots`` batches at most, held until released; ``live`` toggles."""

    def __init__(self, slots: int) -> None:
        self.slots = self.parallelism = slots
        self.live_flag = True
        self.running = 0
        self.most = 0
        self.release = asyncio.Event()

    @property
    def live(self) -> bool:
        return self.live_flag

    async def start(self, bundles, run_batch, preload=True):
        self._run_batch = run_batch

    async def run(self, group, jobs):
        self.running += 1
        self.most = max(self.most, self.running)
        await self.release.wait()
        self.running -= 1
        return self._run_batch(group, jobs)

    async def close(self, wait=True):
        self.release.set()


def _infer(rid: int, fingerprint: str) -> P.Infer:
    from tether.codecs import make_codec
    enc = make_codec("fp32").encode(torch.ones(1, 4))
    return P.Infer(rid, fingerprint, "input", "fp32", enc.header, None, tuple(enc.payload))


def test_core_hands_at_most_slots_batches_and_answers_busy_beyond_the_queue():
    bundle, _ = slow_bundle(0.0)

    async def main():
        pool = ScriptedPool(slots=2)
        core = CloudCore([bundle], CloudConfig(max_batch_size=1, max_queue=3), compute=pool)
        await core.start()
        futures = [core.submit(_infer(i, bundle.fingerprint), 0.0) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        futures += [core.submit(_infer(i, bundle.fingerprint), 0.0) for i in range(4, 8)]
        await asyncio.sleep(0.05)
        assert pool.running == 2 and core.queue_depth == 3     # 2 at the pool, 3 queued
        pool.release.set()
        replies = await asyncio.gather(*futures)
        await core.close()
        return pool, replies
    pool, replies = asyncio.run(main())
    assert pool.most == 2
    kinds = [type(r).__name__ for r in replies]
    assert kinds.count("Result") == 5 and kinds.count("Busy") == 2, kinds
    assert all(r.reason == "queue_full" for r in replies if isinstance(r, P.Busy))


def test_no_live_worker_means_error_unavailable_and_not_ready_then_recovery():
    bundle, _ = slow_bundle(0.0)

    async def main():
        pool = ScriptedPool(slots=1)
        pool.release.set()
        core = CloudCore([bundle], CloudConfig(), compute=pool)
        await core.start()
        pool.live_flag = False
        down = await core.submit(_infer(1, bundle.fingerprint), 0.0)
        ready_down = core.accepting
        pool.live_flag = True
        up = await core.submit(_infer(2, bundle.fingerprint), 0.0)
        ready_up = core.accepting
        await core.close()
        return down, ready_down, up, ready_up
    down, ready_down, up, ready_up = asyncio.run(main())
    assert isinstance(down, P.Error) and down.code == "unavailable" and not ready_down
    assert isinstance(up, P.Result) and ready_up


def test_ray_pool_refuses_in_memory_bundles_with_a_clear_error():
    from tether.cloud.ray_pool import RayPool
    bundle, _ = slow_bundle(0.0)
    pool = RayPool(CloudConfig(ray=RayConfig(address="auto")))
    with pytest.raises(ConfigError, match="bundle directories"):
        asyncio.run(pool.start([bundle]))
    with pytest.raises(ConfigError, match="ray.address"):
        RayPool(CloudConfig())




def test_ray_auto_never_trusts_a_stale_recorded_cluster(monkeypatch, tmp_path):
    pytest.importorskip("ray", reason="needs the ray extra")
    from ray._private import services, utils

    from tether.cloud.ray_dispatch import _resolve
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(utils, "read_ray_address", lambda temp_dir=None: "10.9.9.9:6379")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    assert _resolve("auto") == "local"                       # recorded but dead: start one
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: ["10.9.9.9:6379"])
    assert _resolve("auto") == "10.9.9.9:6379"               # recorded and running: join it
    monkeypatch.setenv("RAY_ADDRESS", "10.1.1.1:6379")
    assert _resolve("auto") == "10.1.1.1:6379"
    assert _resolve("10.2.2.2:6379") == "10.2.2.2:6379"
