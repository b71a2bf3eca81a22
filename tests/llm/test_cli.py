"""`tether generate` and `tether llm-exit` from the command line (edge-only, no server); the LLM
settings of `tether cloud`; the merged `llm-edge` / `llm-serve` commands."""

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


def test_cloud_builds_its_llm_engine_from_the_llm_section(assets):
    from tether.cloud.config import CloudLLMConfig
    from tether.commands.cloud import build_llm_engine
    from tether.partitioner.llm import split_name
    llm = CloudLLMConfig(assets / "tinyllm" / "stories260K.bin", max_sessions=3, max_batch=2,
                         idle_timeout_s=9.0, splits=(2,), codecs=("fp16",))
    engine = build_llm_engine(llm)
    assert engine.config == llm.engine_config() and engine.model_id == "stories260K"
    assert engine.bundle.splits == (split_name(2),)
    assert build_llm_engine(CloudLLMConfig()) is None


def test_merged_daemon_commands_name_their_replacement(capsys):
    for old, new in (("llm-serve", "tether cloud"), ("llm-edge", "tether edge")):
        assert main([old, "--listen", "tcp://127.0.0.1:5570"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tether: error:") and new in err[0], err
