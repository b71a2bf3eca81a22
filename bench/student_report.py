"""Target checks of the student-codec ladder (issue 11), read from one `tether codec eval` run.

Used by bench/codecs_rate_accuracy.py --family student; also runnable on its own:
    .venv/bin/python bench/student_report.py BUNDLE
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("accuracy", "payload_bytes", "header_bytes", "encode_seconds",
                  "decode_seconds", "payload_p95"):
            r[k] = float(r.get(k) or 0.0)
    return rows


def _webp_rival(rows: list[dict], accuracy: float) -> dict | None:
    rivals = [r for r in rows if r["split"] == "input" and r["codec"].startswith("webp")
              and r["accuracy"] >= accuracy]
    return min(rivals, key=lambda r: r["payload_bytes"]) if rivals else None


def report_student(bundle: Path) -> None:
    rows = _rows(bundle / "eval" / "codecs.csv")
    manifest = json.loads((bundle / "manifest.json").read_text())
    costs = json.loads((bundle / "costs.json").read_text())
    entries = {(c["split"], c["codec"]): c for c in manifest.get("codecs", [])
               if c["kind"] == "student"}
    students = sorted((r for r in rows if (r["split"], r["codec"]) in entries),
                      key=lambda r: r["payload_bytes"])
    full = max(r["accuracy"] for r in rows if r["codec"] == "fp32")
    print(f"\nstudent ladder ({manifest['model_id']}, uncompressed {100 * full:.2f} %, "
          f"load avg {os.getloadavg()[0]:.2f}):")
    print(f"  {'codec':<22} {'B mean':>7} {'B p95':>6} {'top-1':>7} {'loss':>6} {'enc ms':>7} "
          f"{'dec ms':>7} {'MFLOPs':>7} {'train min':>9}  vs WebP")
    for r in students:
        e = entries[(r["split"], r["codec"])]["params"]
        rival = _webp_rival(rows, r["accuracy"])
        vs = (f"{rival['payload_bytes'] / r['payload_bytes']:.1f}x fewer than {rival['codec']}"
              if rival else "no WebP reaches it")
        print(f"  {r['codec']:<22} {r['payload_bytes']:7.1f} {r['payload_p95']:6.0f} "
              f"{100 * r['accuracy']:6.2f}% {100 * (full - r['accuracy']):5.2f} "
              f"{1e3 * r['encode_seconds']:7.2f} {1e3 * r['decode_seconds']:7.2f} "
              f"{e.get('encoder_flops', 0) / 1e6:7.1f} {e.get('train_seconds', 0) / 60:9.1f}  {vs}")
    _targets(rows, students, full)
    if students:
        split = students[0]["split"]
        sc = next((s for s in costs["splits"] if s["name"] == split), None)
        if sc:
            print(f"  original head to {split}: {sc['head_flops'] / 1e6:.1f} MFLOPs, ONNX "
                  f"{1e3 * sc['head_seconds']:.3f} ms (student encode ms above include rANS)")


def _targets(rows: list[dict], students: list[dict], full: float) -> None:
    def best(limit: float) -> dict | None:
        ok = [r for r in students if r["payload_bytes"] <= limit]
        return max(ok, key=lambda r: r["accuracy"]) if ok else None
    for limit, loss in ((200, 1.0), (400, 0.5)):
        b = best(limit)
        got = f"{100 * b['accuracy']:.2f} % at {b['payload_bytes']:.0f} B" if b else "none"
        met = b is not None and 100 * (full - b["accuracy"]) <= loss + 1e-9
        print(f"  target <= {loss} pt loss at <= {limit} B: {got} -> {'MET' if met else 'missed'}")
    worst = None
    for w in (r for r in rows if r["split"] == "input" and r["codec"].startswith("webp")):
        ok = [s for s in students if s["accuracy"] >= w["accuracy"]]
        if ok:
            ratio = w["payload_bytes"] / min(s["payload_bytes"] for s in ok)
            worst = ratio if worst is None else min(worst, ratio)
            print(f"  {w['codec']} {w['payload_bytes']:.0f} B {100 * w['accuracy']:.2f} %: "
                  f"student needs {ratio:.1f}x fewer bytes")
        else:
            print(f"  {w['codec']} {100 * w['accuracy']:.2f} %: no student reaches it")
    print(f"  target >= 3x fewer bytes than WebP at equal accuracy: worst {worst}")


if __name__ == "__main__":
    report_student(Path(sys.argv[1]))
