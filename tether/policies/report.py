"""Tables and plots of simulation results (CSV; matplotlib with the Agg backend)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tether.core.traces import Trace
from tether.policies.evaluate import regret_curve
from tether.policies.simulator import SimResult

REQUEST_FIELDS = ("policy", "request_id", "arrival_s", "action", "outcome", "latency_s",
                  "accuracy", "uplink_mbps")


def write_requests_csv(results: dict[str, SimResult], path: str | Path) -> None:
    """Every simulated request of every policy, one row each."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(REQUEST_FIELDS)
        for name, res in results.items():
            for r in res.requests:
                w.writerow([name, r.request_id, f"{r.arrival:.6f}", r.action, r.outcome,
                            f"{r.latency:.6f}", f"{r.accuracy:.4f}", f"{r.up_bps / 1e6:.4f}"])


def write_summary_csv(rows: list[dict], path: str | Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the summary rows (milliseconds)."""
    head = f"{'policy':13s} {'mean ms':>8s} {'p50':>7s} {'p95':>7s} {'p99':>7s} {'acc':>6s} " \
           f"{'fallbk':>6s} {'miss':>5s} {'mean/or':>7s} {'p95/or':>6s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['policy']:13s} {r['mean_s'] * 1e3:8.1f} {r['p50_s'] * 1e3:7.1f} "
            f"{r['p95_s'] * 1e3:7.1f} {r['p99_s'] * 1e3:7.1f} {_acc(r['accuracy']):>6s} "
            f"{r['fallbacks']:6.0f} {r.get('deadline_misses', 0):5.0f} "
            f"{_ratio(r.get('mean_vs_oracle'), 7)} {_ratio(r.get('p95_vs_oracle'), 6)}")
    return "\n".join(lines)


def _ratio(value: float | None, width: int) -> str:
    """A ratio to the oracle; ``-`` when there is none (no oracle run, or a zero/NaN)."""
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return f"{'-':>{width}s}"
    return f"{value:{width}.3f}"


def _acc(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"     # NaN: the table has no accuracy


def plot_all(results: dict[str, SimResult], uplink: Trace, out_dir: str | Path,
             offset_s: float = 0.0) -> list[Path]:
    """latency_cdf.png, actions.png (chosen action vs bandwidth) and, with an oracle, regret.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = [out / "latency_cdf.png", out / "actions.png"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results.items():
        lat = np.sort(res.latencies) * 1e3
        ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=name)
    ax.set(xscale="log", xlabel="latency (ms)", ylabel="CDF", title="Per-request latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    _plot_actions(plt, results, uplink, paths[1], offset_s)
    if "oracle" in results:
        paths.append(out / "regret.png")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, res in results.items():
            if name != "oracle":
                ax.plot(regret_curve(res, results["oracle"]), label=name)
        ax.set(xlabel="request", ylabel="cumulative regret vs oracle (s)", title="Regret")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _plot_actions(plt, results: dict[str, SimResult], uplink: Trace, path: Path,
                  offset_s: float) -> None:
    shown = [n for n in results if len({r.action for r in results[n].requests}) > 1] or list(results)
    keys = sorted({r.action for n in shown for r in results[n].requests})
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.8 + 1.6 * len(shown)), sharex=True,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], shown):
        reqs = results[name].requests
        t = np.array([r.arrival for r in reqs])
        ax.scatter(t, [keys.index(r.action) for r in reqs], s=3, c="tab:blue")
        ax.set_yticks(range(len(keys)), keys, fontsize=6)
        ax.set_title(name, fontsize=9)
        bw = ax.twinx()
        end = float(t.max()) if t.size else uplink.duration_s
        grid = np.arange(0.0, end + 0.5, 0.5)
        bw.plot(grid, [uplink.rate_bps_at(offset_s + g, 0.5) / 1e6 for g in grid],
                c="tab:orange", lw=0.8)
        bw.set_ylabel("uplink Mbit/s", fontsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
