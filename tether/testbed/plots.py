"""Plots of a testbed run (matplotlib, Agg): latency CDF, timeline, accuracy vs latency."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tether.testbed.runner import Experiment


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(exp: "Experiment", rows: list[dict[str, Any]]) -> list[str]:
    """Write the three plots into ``exp.out``; returns their file names."""
    labels = exp.scenario.policy_labels
    names = [latency_cdf(exp.out / "latency_cdf.png", rows, labels, exp.scenario.deadline_s),
             timeline(exp.out / "timeline.png", rows, labels, exp),
             accuracy_latency(exp.out / "accuracy_latency.png", rows, labels)]
    return [n for n in names if n]


def latency_cdf(path: Path, rows: list[dict[str, Any]], labels: list[str],
                deadline_s: float) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label in labels:
        lat = np.sort([float(r["latency_s"]) * 1000 for r in rows
                       if r["policy"] == label and r["answered"] is True])
        if lat.size:
            ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post", label=label)
    ax.axvline(deadline_s * 1000, color="grey", linestyle="--", linewidth=1, label="deadline")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF per policy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def timeline(path: Path, rows: list[dict[str, Any]], labels: list[str],
             exp: "Experiment") -> str:
    """Top: uplink capacity (trace) and bytes delivered; below: action per request and policy."""
    plt = _pyplot()
    duration = exp.scenario.duration_s
    fig, axes = plt.subplots(len(labels) + 1, 1, figsize=(9.5, 2.0 + 1.6 * len(labels)),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    edges = np.arange(0.0, math.ceil(duration) + 1.0)
    offset = exp.scenario.link.start_offset_s
    cap = [exp.up.bytes_between(offset + a, offset + a + 1) * 8e-6 for a in edges[:-1]]
    ax.step(edges[:-1], cap, where="post", color="black", label="uplink trace")
    if cap:
        ax.hlines(cap[-1], edges[-2], edges[-1], color="black")
    for label in labels:
        delivered = _delivered(exp, label)
        if delivered:
            xs = sorted(delivered)
            ax.plot([x - offset + 0.5 for x in xs], [delivered[x] * 8e-6 for x in xs],
                    marker=".", linewidth=0.8, label=f"sent ({label})")
    ax.set_ylabel("Mbit/s")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Uplink capacity, bytes the link delivered, and each policy's actions")
    for i, label in enumerate(labels, start=1):
        _actions(axes[i][0], [r for r in rows if r["policy"] == label], label)
    axes[-1][0].set_xlabel("time in trace (s)")
    axes[-1][0].set_xlim(0, duration)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _delivered(exp: "Experiment", label: str) -> dict[int, int]:
    stats = exp.meta.get("runs", {}).get(label, {}).get("link_stats") or []
    total: dict[int, int] = {}
    for link in stats:
        for second, nbytes in (link.get("up", {}).get("delivered") or {}).items():
            total[int(second)] = total.get(int(second), 0) + int(nbytes)
    return total


def _actions(ax: Any, rows: list[dict[str, Any]], label: str) -> None:
    keys = sorted({r["action"] or "(none)" for r in rows})
    index = {k: i for i, k in enumerate(keys)}
    colors = {"cloud": "tab:blue", "local": "tab:green", "exit": "tab:olive",
              "fallback": "tab:red"}
    for outcome in sorted({r["outcome"] for r in rows}):
        sel = [r for r in rows if r["outcome"] == outcome]
        ax.scatter([float(r["trace_time"]) for r in sel],
                   [index[r["action"] or "(none)"] for r in sel], s=8,
                   color=colors.get(outcome, "tab:gray"), label=outcome)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([k if len(k) < 28 else k[:25] + "..." for k in keys], fontsize=7)
    ax.set_ylim(-0.6, len(keys) - 0.4)
    ax.set_ylabel(label, fontsize=8)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def accuracy_latency(path: Path, rows: list[dict[str, Any]], labels: list[str]) -> str:
    """Mean (marker) and p95 (bar end) latency against accuracy (or agreement) per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    plotted = False
    for label in labels:
        rs = [r for r in rows if r["policy"] == label and r["answered"] is True]
        scored = [r for r in rs if r["correct"] != ""]
        if not scored:
            continue
        lat = np.array([float(r["latency_s"]) * 1000 for r in rs])
        acc = 100.0 * sum(r["correct"] is True for r in scored) / len(scored)
        ax.errorbar([lat.mean()], [acc], xerr=[[0], [np.percentile(lat, 95) - lat.mean()]],
                    fmt="o", capsize=3, label=label)
        plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no labelled images in this run\n(use images = 'cifar10' with --assets)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency (ms): mean, bar to p95")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs latency")
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
