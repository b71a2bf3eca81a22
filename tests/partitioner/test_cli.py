"""`tether partition` / `tether profile`: tables, exit codes, nothing half-written."""

from __future__ import annotations

import pytest

from tether.cli import main
from tether.core.bundle import Manifest

FAST = ["--repeats", "1", "--warmup", "0", "--no-progress"]


def test_partition_prints_table_and_profile_rewrites(tmp_path, capsys, cifar_weights):
    out = tmp_path / "b"
    rc = main(["partition", "cifar_resnet20", "--weights", str(cifar_weights[20]),
               "--out", str(out),
               "--splits", "layer2.2,flatten", "--profile", "exported", *FAST])
    text = capsys.readouterr().out
    assert rc == 0
    header, *rows = text.splitlines()
    assert header.split()[:5] == ["split", "shape", "bytes", "head", "ms"]
    row = next(r for r in rows if r.startswith("layer2.2 "))
    assert row.split()[1:3] == ["32x16x16", "32768"] and row.rstrip().endswith("*")
    manifest = Manifest.load(out)
    assert [e.name for e in manifest.split_points if e.head] == ["layer2.2", "flatten"]
    assert manifest.source["weights"].endswith(cifar_weights[20].name)
    assert main(["profile", str(out), "--profile", "exported", *FAST]) == 0
    assert "layer2.2" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["resnet19"], "unknown model 'resnet19'"),
    (["cifar_resnet20", "--splits", "layer9"], "unknown split point 'layer9'.*layer2.1"),
    (["cifar_resnet20", "--input-shape", "1,1,32,32"], "1 channels"),
    (["cifar_resnet20", "--weights", "/nonexistent/w.th"], "does not exist"),
    (["vit_b_16", "--input-shape", "1,3,64,64"], "cannot run on an input of shape"),
])
def test_bad_input_fails_cleanly(tmp_path, capsys, args, message):
    import re

    out = tmp_path / "b"
    assert main(["partition", *args, "--out", str(out), *FAST]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_malformed_shape_and_missing_bundle(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["partition", "cifar_resnet20", "--input-shape", "1,3,a",
              "--out", str(tmp_path / "b")])
    assert exc.value.code == 2 and "N,C,H,W" in capsys.readouterr().err
    # any rank parses (token ids, user models), but an image model refuses a non-NCHW shape
    assert main(["partition", "cifar_resnet20", "--input-shape", "1,3,32",
                 "--out", str(tmp_path / "b")]) == 1
    assert "N,C,H,W" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["profile", str(tmp_path), *FAST]) == 1
    assert "not a complete bundle" in capsys.readouterr().err
