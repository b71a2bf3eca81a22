"""The chaos ledger in CI: real cloud, link and edges; kills, stops, cuts, bursts, fuzz."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tether.testbed.chaos import FAULTS, ChaosConfig, check, run_chaos

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: the shared bundle
from support.bundles import shared_bundle  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.mark.slow
def test_chaos_ledger_every_request_answered_once_with_the_whole_models_answer(bundle, tmp_path):
    cfg = ChaosConfig(bundle=bundle, out=tmp_path / "chaos", duration_s=50, edges=2, rate_hz=4,
                      seed=15, gap_s=(1.0, 2.0), burst=32, cloud_burst=(8, 64),
                      fuzz_frames=30)
    summary = run_chaos(cfg)
    broken = check(summary)
    assert not broken, (broken, summary)
    assert set(summary["faults"]) == set(FAULTS), summary["faults"]      # every kind happened
    rows = [json.loads(line) for line in (cfg.out / "ledger.jsonl").read_text().splitlines()]
    assert len(rows) == summary["requests"] > 200
    assert all(r["replies"] == 1 for r in rows)
    outcomes = {r["outcome"] for r in rows}
    assert "cloud" in outcomes and outcomes & {"fallback", "local"}, outcomes   # both paths
    assert all(r["matches"] for r in rows if r["outcome"] not in ("busy", "error"))
    assert (cfg.out / "faults.jsonl").read_text().count("\n") == sum(summary["faults"].values())


def test_fuzz_frames_are_seeded_and_mostly_malformed():
    import random

    import numpy as np

    from tether.core import protocol as P
    from tether.core.errors import ProtocolError
    from tether.testbed.chaos_load import fuzz_frames

    image = np.zeros((32, 32, 3), np.uint8)
    a = fuzz_frames(random.Random(3), 200, image)
    assert a == fuzz_frames(random.Random(3), 200, image)
    assert a != fuzz_frames(random.Random(4), 200, image)
    rejected = 0
    for msg in a:
        try:
            P.decode(msg)
        except ProtocolError:
            rejected += 1
    assert rejected >= 120, rejected


def test_check_names_every_broken_rule():
    from tether.testbed.chaos import Fault, in_fault

    def rss(warm, peak, first, last, seconds):
        return {"start": 1, "warm": warm << 10, "peak": peak << 10, "end": 1, "seconds": seconds,
                "first_half_peak": first << 10, "last_quarter_peak": last << 10}
    ok = {"lost": 0, "duplicates": 0, "mismatches": 0, "healthy_refusals": 0, "errors": 0,
          "rss_kb": {"cloud:1": rss(900, 1400, 1350, 1390, 1200),     # one burst's high-water
                     "cloud:2": rss(900, 1000, 900, 1000, 60)},      # too short to call a leak
          "alive": {"cloud": True}}
    assert check(ok) == []
    bad = ok | {"lost": 2, "duplicates": 1, "healthy_refusals": 3, "alive": {"edge0": False},
                "rss_kb": {"edge0:7": rss(100, 1000, 150, 160, 60),
                           "edge1:8": rss(100, 300, 150, 300, 1200)}}
    text = " | ".join(check(bad))
    for words in ("2 requests never answered", "1 answered twice", "3 refused", "edge0:7 grew",
                  "edge1:8 kept growing", "died"):
        assert words in text, text
    faults = [Fault("cloud_stop", 10.0, 12.0), Fault("fuzz", 20.0, 21.0)]
    assert in_fault({"sent": 9.0}, faults, 3.0, 2.0) == "cloud_stop"     # still waiting at 10
    assert in_fault({"sent": 14.5}, faults, 3.0, 2.0) == "cloud_stop"    # recovering
    assert in_fault({"sent": 15.5}, faults, 3.0, 2.0) == ""
    assert in_fault({"sent": 20.5}, faults, 3.0, 2.0) == ""              # fuzz is no excuse
