"""PNG plots of simulator results (matplotlib, headless).

Lifecycle: called after a run or a plan with results already computed; each
function writes one file and returns its path. Nothing here simulates.
- ``plot_latency_cdfs``: TTFT, TPOT and E2E CDFs of one run;
- ``plot_attainment_curves``: SLO attainment against request rate (one line
  per instance type probed by the planner, or per configuration);
- ``plot_cost_frontier``: cost per hour against goodput, Pareto front marked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_latency_cdfs(result, out_dir: Path) -> list[Path]:
    from sim.metrics import tpot_s
    out_dir.mkdir(parents=True, exist_ok=True)
    done = [t for t in result.trackers if t.finish_s is not None]
    series = {"TTFT (ms)": [(t.first_token_s - t.req.arrival_s) * 1e3 for t in done],
              "TPOT (ms)": [x * 1e3 for x in (tpot_s(t) for t in done) if x is not None],
              "E2E (ms)": [(t.finish_s - t.req.arrival_s) * 1e3 for t in done]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, values) in zip(axes, series.items(), strict=False):
        v = sorted(values)
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))])
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(" ".join(result.summary.extra["pools"]))
    fig.tight_layout()
    path = out_dir / "latency_cdfs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_attainment_curves(curves: dict[str, list[tuple[float, float]]], path: Path,
                           target: float) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in sorted(curves.items()):
        pts = sorted(pts)
        if pts:
            ax.plot([r for r, _ in pts], [a for _, a in pts], marker=".", label=name)
    ax.axhline(target, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("request rate per instance (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cost_frontier(cands, path: Path, target_rate: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [c.goodput_req_s for c in cands]
    ys = [c.cost_per_hour for c in cands]
    colors = ["tab:blue" if c.mode == "colocated" else "tab:orange" for c in cands]
    ax.scatter(xs, ys, c=colors, s=14)
    front = sorted((c for c in cands if c.pareto), key=lambda c: c.cost_per_hour)
    ax.plot([c.goodput_req_s for c in front], [c.cost_per_hour for c in front], "k-", lw=1,
            label="Pareto front")
    if target_rate:
        ax.axvline(target_rate, color="gray", ls=":", lw=1, label="target rate")
    ax.set_xlabel("goodput (req/s at the SLO)")
    ax.set_ylabel("cost ($/h)")
    ax.set_title("blue: colocated, orange: disaggregated")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
