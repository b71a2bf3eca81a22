"""The chaos ledger in CI: real cloud, link and edges; kills, stops, cuts, bursts, fuzz."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tether.testbed.chaos import FAULTS, ChaosConfig, check, run_chaos

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: the shared bundle
from edge.bundles import shared_bundle  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


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
