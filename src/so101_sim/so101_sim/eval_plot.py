"""summary.png of a multi-task so101-eval run: the success rate per task with its 95 % Wilson interval (the bars
and whiskers of summary.json) and, per task, a histogram of the chunk latency of every chunk of every episode;
one colour per NFE. matplotlib's object API only (no pyplot): no GUI backend, no global figure state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

HIST_COLUMNS = 3


def plot_summary(reports: dict[str, dict[int, dict]], path: Path, title: str = "") -> Figure:
    """Draw ``reports`` (task -> NFE -> the report so101-eval writes as <task>/eval_nfe<N>.json) into ``path``;
    returns the figure: its first axes holds one bar container per NFE, then one histogram axes per task."""
    tasks = list(reports)
    nfes = sorted({n for by_nfe in reports.values() for n in by_nfe})
    columns = min(HIST_COLUMNS, len(tasks))
    rows = -(-len(tasks) // columns)
    fig = Figure(figsize=(min(16.0, max(8.0, 1.4 * len(tasks) * len(nfes) + 2.0)), 3.6 + 2.8 * rows),
                 layout="constrained")
    grid = fig.add_gridspec(1 + rows, columns, height_ratios=[1.3] + [1.0] * rows)
    colors = [f"C{i}" for i in range(len(nfes))]

    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / len(nfes)
    x = np.arange(len(tasks))
    for i, nfe in enumerate(nfes):
        cells = [reports[t].get(nfe) for t in tasks]
        rate = np.array([np.nan if c is None else c["success_rate"] for c in cells])
        low = np.array([np.nan if c is None else c["ci95"][0] for c in cells])
        high = np.array([np.nan if c is None else c["ci95"][1] for c in cells])
        pos = x - 0.4 + width * (i + 0.5)
        bars.bar(pos, rate, width, color=colors[i], label=f"NFE {nfe}")
        bars.errorbar(pos, rate, yerr=[rate - low, high - rate], fmt="none", ecolor="black", capsize=3, lw=1)
        for p, c in zip(pos, cells):
            if c is not None:
                bars.text(p, c["ci95"][1] + 0.02, f"{c['successes']}/{c['episodes']}", ha="center", va="bottom",
                          fontsize=8)
    bars.set_xticks(x, tasks)
    bars.set_ylim(0.0, 1.15)
    bars.set_ylabel("success rate")
    bars.set_title("success per task (whiskers: 95 % Wilson interval)")
    bars.legend(loc="upper right", fontsize=8)
    bars.grid(axis="y", alpha=0.3)

    for k, task in enumerate(tasks):
        ax = fig.add_subplot(grid[1 + k // columns, k % columns])
        samples = {n: [ms for r in reports[task][n]["results"] for ms in r["chunk_latency_ms"]]
                   for n in nfes if n in reports[task]}
        pooled = [ms for values in samples.values() for ms in values]
        if not pooled:
            ax.text(0.5, 0.5, "no chunk latency recorded", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            edges = np.histogram_bin_edges(pooled, bins=min(30, max(5, len(pooled) // 4))).tolist()
            for i, nfe in enumerate(nfes):
                if samples.get(nfe):
                    median = float(np.median(samples[nfe]))
                    ax.hist(samples[nfe], bins=edges, color=colors[i], alpha=0.6,
                            label=f"NFE {nfe}: median {median:.1f} ms")
            ax.set_xlabel("chunk latency (ms)")
            ax.set_ylabel("chunks")
            ax.legend(fontsize=7)
        ax.set_title(task, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig
