"""`tether demo`'s pieces: its data and model, the userspace CPU quota, the bundle it trains,
its report, and a short live run of every policy (cloud + link + quota'd edge)."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tether.core.types import CostTable
from tether.testbed import cpuquota
from tether.testbed.demo import comparison_text, demo_uplink, short_action, timeline_text
from tether.testbed.demo_model import IMAGE_SIZE, calibrate_model, synthetic_images, to_float


def test_synthetic_images_are_seeded_labelled_and_balanced():
    x1, y1 = synthetic_images(200, seed=5)
    x2, y2 = synthetic_images(200, seed=5)
    x3, _ = synthetic_images(200, seed=6)
    assert x1.dtype == torch.uint8 and x1.shape == (200, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert len(torch.unique(y1)) == 10 and int(torch.bincount(y1).min()) >= 8


@pytest.mark.slow
def test_calibrated_seeded_model_learns_the_task_and_generalises():
    from tether.partitioner.models import build_model
    torch.set_num_threads(2)
    net = build_model("cifar_resnet20")
    x, y = synthetic_images(256, seed=1)
    calibrate_model(net, x, y, bn_images=128)
    xe, ye = synthetic_images(128, seed=2)
    with torch.no_grad():
        pred = net(to_float(xe)).argmax(1)
    acc = float((pred == ye).double().mean())
    assert acc > 0.5, f"held-out accuracy {acc:.2f} (chance 0.10)"
    assert len(torch.unique(pred)) >= 8      # not the one-class answer of a random network


@pytest.mark.skipif(not cpuquota.supported(), reason="needs a per-process CPU clock (Linux)")
def test_userspace_quota_holds_a_busy_process_to_its_share():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", busy])
    quota = cpuquota.UserspaceQuota(0.2)
    quota.add(proc.pid)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=60)
    finally:
        quota.close()
    wall = time.monotonic() - t0
    # 0.3 s of CPU at 0.2 core takes >= ~1.5 s (start-up CPU only adds to it)
    assert wall >= 1.0, f"0.3 s of CPU under a 0.2-core quota finished in {wall:.2f} s"
    assert quota.stats()["nr_throttled"] > 0


def test_demo_edge_is_one_core():
    """The quota'd edge is pinned to one core (a weak device), so its event loop and its
    compute share one core by priority instead of spending the quota twice as fast."""
    import argparse
    import os
    from tether.commands.demo import demo_scenario
    scenario = demo_scenario(argparse.Namespace(duration=180.0, rate=2.0, cpu_quota=None,
                                                delay_ms=15.0))
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}
    assert scenario.cpu_pin == (max(allowed),)
    assert scenario.duration_s == 30.0


def test_demo_uplink_crosses_the_break_even_range():
    trace = demo_uplink(30.0)            # the default demo's 30 s per policy
    rates = [trace.bytes_between(k, k + 1) * 8 for k in range(30)]
    assert max(rates) > 1e6 and min(rates) < 1e5   # from Mbit/s to an outage or near it
    assert sum(r >= 3e5 for r in rates) >= 15 and sum(r < 1e5 for r in rates) >= 6
    assert demo_uplink(30.0).slots.tolist() == trace.slots.tolist()


def _rows() -> list[dict]:
    acts = ["local", "offload:jpeg90", "split:layer1.0:bottleneck-l2s4",
            "exit:layer1.0:bottleneck-l2s4"]
    return [{"policy": "adaptive", "trace_time": 0.4 * i, "action": acts[i % 4],
             "outcome": "exit" if i % 4 == 3 else "cloud"} for i in range(10)]


def test_timeline_names_every_action_per_second():
    from tether.core.traces import constant
    text = timeline_text(_rows(), constant(1.0, 10.0), "adaptive")
    lines = text.splitlines()
    assert len([ln for ln in lines if ln.strip()[:1].isdigit()]) == 4   # seconds 0..3
    for name in ("local", "offload jpeg90", "split layer1.0 bottleneck-l2s4"):
        assert name in text
    assert short_action("exit:layer1.0:int8") == "exit+split layer1.0 int8"
    assert "lower case" in lines[0] and any(ch.islower() for ch in lines[3].split()[-1])


def _summary(adaptive_mean: float) -> list[dict]:
    def row(name, mean):
        return {"policy": name, "mean_s": mean, "p95_s": 2 * mean, "accuracy": 0.9,
                "deadline_misses": 0, "oracle_mean_s": 0.05, "predicted_mean_s": 0.07}
    return [row("local", 0.12), row("cloud", 0.2), row("static x", 0.1),
            row("neurosurgeon", 0.09), row("adaptive", adaptive_mean)]


def test_comparison_says_whether_adaptive_won_from_the_numbers():
    won = comparison_text(_summary(0.08))
    assert "lowest measured mean latency of all 5 policies: yes" in won
    assert "best fixed choice in hindsight: static x (100.0 ms)" in won
    assert "-20 % mean latency" in won
    # the oracle is the simulator's: shown beside the simulator's replay of adaptive's actions
    assert "hindsight oracle on adaptive's arrivals 50.0 ms; adaptive's own actions replayed " \
           "70.0 ms (measured 80.0 ms)" in won
    assert "beats every fixed choice (3) in measured mean latency: yes" in won
    lost = comparison_text(_summary(0.095))   # below every fixed choice, above Neurosurgeon
    assert "beats every fixed choice (3) in measured mean latency: yes" in lost
    assert "lowest measured mean latency of all 5 policies: NO" in lost
    assert "beats every fixed choice (3) in measured mean latency: NO" in \
        comparison_text(_summary(0.11))


@pytest.fixture(scope="module")
def tiny_demo_bundle(tmp_path_factory):
    """The demo bundle with a tiny training recipe (the real one is the same code)."""
    from tether.testbed.demo_bundle import Recipe, ensure_demo_bundle
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("demo")
    recipe = Recipe(train_images=96, eval_images=48, epochs=1, exit_epochs=1)
    return out, ensure_demo_bundle(out, recipe=recipe), recipe


@pytest.mark.slow
def test_demo_bundle_holds_a_measured_ladder_and_exit(tiny_demo_bundle):
    from tether.core.bundle import Manifest
    from tether.policies import PolicyConfig, build_cost_model
    from tether.policies.costmodel import CostModel
    from tether.testbed.demo import LOCAL_TARGET_S, QUOTA_MIN, weak_edge_quota
    from tether.testbed.demo_bundle import LADDER, ensure_demo_bundle
    out, bundle, recipe = tiny_demo_bundle
    manifest = Manifest.load(bundle)
    assert {(c.split, c.codec) for c in manifest.codecs} == {(r.split, r.codec_id) for r in LADDER}
    assert [e.split for e in manifest.exits] in ([], ["layer1.0"])   # tiny recipe: maybe none
    table = CostTable.load(bundle / manifest.cost_table)
    assert all(e.accuracy is not None and 0 <= e.exit_rate <= 1 for e in table.exits)
    build_cost_model(PolicyConfig(max_accuracy_drop=0.02), table, manifest)  # every accuracy known
    # what the edge can run (before pruning: the tiny recipe's codec may be dominated)
    space = CostModel(table, manifest=manifest, prune=False).costs
    assert {c.action.kind.value for c in space} >= {"local", "offload", "split"}
    assert {f"split:{r.split}:{r.codec_id}" for r in LADDER} <= {c.action.key for c in space}
    learned = [c for c in table.codecs if c.codec.startswith("bottleneck")]
    assert len(learned) == len(LADDER)
    assert all(c.accuracy is not None and 0 < c.bytes < 2000 for c in learned)
    assert table.full_accuracy is not None
    quota = weak_edge_quota(bundle, manifest)           # the whole model at ~150 ms on the edge
    full = CostTable.load(bundle / manifest.cost_table).edge_full_seconds
    assert QUOTA_MIN <= quota <= 1.0
    assert quota == 1.0 or 0.2 < full / quota / LOCAL_TARGET_S < 5   # profiled vs measured now
    mtime = (bundle / "demo.json").stat().st_mtime
    assert ensure_demo_bundle(out, recipe=recipe) == bundle           # cached
    assert (bundle / "demo.json").stat().st_mtime == mtime


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_demo_runs_every_policy_live(tiny_demo_bundle, capsys):
    from tether.commands.demo import demo_scenario
    from tether.testbed.demo import run_demo
    out, _, recipe = tiny_demo_bundle
    args = argparse.Namespace(duration=12.0, rate=3.0, cpu_quota=0.25, delay_ms=10.0)
    summary = run_demo(demo_scenario(args), out, recipe=recipe)
    labels = [s["policy"] for s in summary]
    assert labels[:2] == ["local", "cloud"] and labels[-2:] == ["neurosurgeon", "adaptive"]
    assert any(label.startswith("static split:layer1.0:bottleneck") for label in labels)
    assert all(s["answered"] > 0 for s in summary), summary
    assert all(not math.isnan(s["accuracy"]) for s in summary)    # labelled images
    text = (out / "demo.txt").read_text()
    assert "What adaptive chose" in text and "lowest measured mean latency" in text
    assert (out / "timeline.png").is_file() and (out / "requests.csv").is_file()
    assert np.isfinite([s["mean_s"] for s in summary]).all()
    assert "lowest measured mean latency" in capsys.readouterr().out


@pytest.mark.skipif(not cpuquota.supported(), reason="needs a per-process CPU clock (Linux)")
def test_throttle_without_a_writable_cgroup_uses_the_userspace_quota():
    import dataclasses

    from tether.testbed.platform import CpuThrottle, probe
    info = dataclasses.replace(probe(network=False), root=False, cgroup="none",
                               cgroup_cpu_path="")
    throttle = CpuThrottle("nonroot", 0.2, info=info)
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\n"
    try:
        assert throttle.mode == "userspace" and throttle.applied_cores == 0.2
        proc = subprocess.Popen([sys.executable, "-c", busy])
        throttle.add(proc.pid)
        t0 = time.monotonic()
        proc.wait(timeout=60)
        assert time.monotonic() - t0 >= 0.6       # 0.2 s of CPU at 0.2 core: >= ~1 s
        assert throttle.stats()["nr_throttled"] > 0
        assert throttle.describe()["throttle"] == "userspace"
    finally:
        throttle.close()
