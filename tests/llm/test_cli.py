"""`tether generate` and `tether llm-exit` from the command line (edge-only, no server)."""

from __future__ import annotations

import json

from tether.cli import main


def test_generate_edge_only_streams_the_reference_story(assets, monkeypatch, capsys):
    monkeypatch.setenv("TETHER_ASSETS", str(assets))
    assert main(["generate", "--split", "5", "--max-new-tokens", "12", "Once upon a time"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time, there was a little girl")
    assert "12 tokens" in out.err and "'local': 12" in out.err


def test_llm_exit_then_generate_with_it(assets, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TETHER_ASSETS", str(assets))
    out = tmp_path / "exit4.pt"
    assert main(["llm-exit", "--split", "4", "--paragraphs", "8", "--steps", "5",
                 "--target-agreement", "0.5", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["split"] == 4 and meta["agreement"] >= 0.5
    assert main(["generate", "--split", "4", "--exit-head", str(out), "--max-new-tokens", "4",
                 "Once"]) == 0
    assert main(["generate", "--split", "3", "--exit-head", str(out), "Once"]) == 1
    assert "trained for split 4" in capsys.readouterr().err
    assert main(["generate", "--codec", "int3", "Once"]) == 1


def test_generate_without_exit_head_and_no_cloud_fails_with_one_line(assets, monkeypatch, capsys):
    """No READY from the cloud and no trained exit head: exit 1 and say why, no guessed text."""
    monkeypatch.setenv("TETHER_ASSETS", str(assets))
    assert main(["generate", "--cloud", "tcp://127.0.0.1:9", "--split", "3", "--timeout", "0.2",
                 "--first-step-timeout", "0.5", "--max-new-tokens", "4", "Once"]) == 1
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("tether: error:")]
    assert len(errors) == 1 and "no trained exit head" in errors[0], out.err
    assert "Traceback" not in out.err and out.out.strip() == "Once"
