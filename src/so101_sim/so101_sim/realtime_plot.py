"""realtime.png of an so101-eval-realtime run: success and boundary acceleration against the injected latency, one
colour per hand-off, one line style per policy, so that what latency costs each sampler shows at a glance.
matplotlib's object API only (no pyplot): no GUI backend, no global figure state.

    python -m so101_sim.realtime_plot RUN_DIR     # redraw RUN_DIR/realtime.png from RUN_DIR/rows.json
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

PLOT_FILE = "realtime.png"
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def plot_realtime(rows: list[dict], path: Path, title: str = "") -> Figure:
    """Draw so101-eval-realtime ``rows`` (rows.json's list) into ``path`` and return the figure: two axes (success,
    boundary acceleration), each with one line per (policy, hand-off) over the injected latencies in rising order.
    Rows at the ``measured`` latency have no place on a latency axis and are left out (they are in the table)."""
    injected = [r for r in rows if isinstance(r["latency_ms"], (int, float))]
    if not injected:
        raise ValueError("no row with an injected latency to plot")
    policies = list(dict.fromkeys(r["policy"] for r in injected))
    handoffs = list(dict.fromkeys(r["handoff"] for r in injected))
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    success, accel = fig.subplots(1, 2)
    for i, policy in enumerate(policies):
        for j, handoff in enumerate(handoffs):
            cells = sorted((r for r in injected if r["policy"] == policy and r["handoff"] == handoff),
                           key=lambda r: r["latency_ms"])
            if not cells:
                continue
            x = [r["latency_ms"] for r in cells]
            style = dict(color=f"C{j}", linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)],
                         label=f"{policy}, {handoff}")
            success.plot(x, [100 * r["success_rate"] for r in cells], **style)
            accel.plot(x, [r["boundary_accel_max"] for r in cells], **style)
    episodes = sorted({r["episodes"] for r in injected})
    success.set_ylabel(f"success (%, {'/'.join(str(n) for n in episodes)} episodes per point)")
    success.set_ylim(-3, 103)
    success.set_title("success while the arm keeps moving during inference")
    accel.set_ylabel("boundary acceleration (rad/s^2)")
    accel.set_title("arm acceleration in the 3 steps after a hand-off")
    for ax in (success, accel):
        ax.set_xlabel("latency of a chunk (ms, injected)")
        ax.grid(alpha=0.3)
    success.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle("\n".join(textwrap.fill(line, 140) for line in title.splitlines()), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig


def title_of(run: dict) -> str:
    """The figure's title from rows.json: task, episodes, seeds and where the numbers came from."""
    return (f"{run.get('task', '?')}, {run.get('episodes', '?')} episodes per point from seed {run.get('seed', '?')}; "
            f"commit {run.get('commit', '?')}, {run.get('machine', '?')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m so101_sim.realtime_plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an so101-eval-realtime --out folder (holds rows.json)")
    parser.add_argument("--out", type=Path, default=None, help=f"PNG to write (default RUN/{PLOT_FILE})")
    args = parser.parse_args(argv)
    source = args.run / "rows.json"
    try:
        run = json.loads(source.read_text())
        if not isinstance(run, dict) or not isinstance(run.get("rows"), list):
            raise ValueError("not an so101-eval-realtime rows.json (no list of rows)")
        plot_realtime(run["rows"], args.out or args.run / PLOT_FILE, title_of(run))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"realtime_plot: {source}: {exc}", file=sys.stderr)
        return 2
    print(args.out or args.run / PLOT_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
