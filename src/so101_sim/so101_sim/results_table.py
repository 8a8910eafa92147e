"""so101-results-table: the multi-task results table (markdown + JSON) from multi-task so101-eval runs.

Each ``--eval LABEL=DIR`` names a directory written by ``so101-eval --tasks ...`` (its summary.json); every NFE it
evaluated becomes a column ``LABEL NFE n``. Rows are the tasks, the mean score over the paper's three tasks and
the instruction-following rate. Cells show the mean score and the full-success rate; the JSON keeps the Wilson
intervals, episode counts and chunk latencies. The commit and machine of every run are named under the table,
so the numbers in docs/ always come from files, never from hand editing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from so101_sim.tasks import TASKS


class ResultsError(ValueError):
    """An --eval directory that is not a multi-task so101-eval output."""


def load_run(label: str, directory: Path) -> dict:
    """The run's summary.json, with its per-NFE summaries under ``by_nfe`` whether it swept NFE or not."""
    path = directory / "summary.json"
    try:
        data = json.loads(path.read_text())
        summary = data["summary"]
    except FileNotFoundError:
        raise ResultsError(f"--eval {label}={directory}: no summary.json (run so101-eval --tasks ... --out "
                           f"{directory} first)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"--eval {label}={directory}: {path} is not a so101-eval summary ({exc})") from None
    by_nfe = summary["by_nfe"] if "by_nfe" in summary else {str(summary["nfe"]): summary}
    return {"label": label, "dir": str(directory), "by_nfe": by_nfe, "checkpoint": data.get("checkpoint"),
            "commit": data.get("commit", "unknown"), "machine": data.get("machine", "unknown"),
            "seed": data.get("seed"), "image_size": data.get("image_size")}


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f} %"


def build(runs: list[dict]) -> tuple[str, dict]:
    """Markdown table and its JSON (columns in the order given, each run's NFEs ascending)."""
    columns = [(run, nfe) for run in runs for nfe in sorted(run["by_nfe"], key=int)]
    tasks = [t for t in TASKS if any(t in run["by_nfe"][n]["tasks"] for run, n in columns)]
    header = "| task | " + " | ".join(f"{run['label']} NFE {n}" for run, n in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for task in tasks:
        cells = []
        for run, n in columns:
            cell = run["by_nfe"][n]["tasks"].get(task)
            cells.append("-" if cell is None else
                         f"{cell['score']:.2f} ({_percent(cell['success_rate'])} of {cell['episodes']})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **mean score (paper tasks)** | " + " | ".join(
        f"**{run['by_nfe'][n]['mean_score']:.2f}**" for run, n in columns) + " |")
    lines.append("| instruction following | " + " | ".join(
        _percent(run["by_nfe"][n]["instruction_following"]) for run, n in columns) + " |")
    lines.append("| chunk latency median (ms) | " + " | ".join(
        "-" if run["by_nfe"][n]["chunk_ms_median"] is None else f"{run['by_nfe'][n]['chunk_ms_median']:.1f}"
        for run, n in columns) + " |")
    lines.append("")
    lines.append("Cells: mean partial-credit score (full-success rate of N episodes). Sources:")
    for run in runs:
        lines.append(f"- {run['label']}: `{run['dir']}` (checkpoint `{run['checkpoint']}`, seeds from {run['seed']}, "
                     f"{run['image_size']} px), commit {run['commit']}, {run['machine']}")
    table = "\n".join(lines) + "\n"
    data = {"columns": [{"label": run["label"], "nfe": int(n), **run["by_nfe"][n]} for run, n in columns],
            "sources": [{k: run[k] for k in ("label", "dir", "checkpoint", "commit", "machine", "seed",
                                             "image_size")} for run in runs]}
    return table, data


def _parse_eval(text: str) -> tuple[str, Path]:
    label, sep, directory = text.partition("=")
    if not sep or not label.strip() or not directory.strip():
        raise argparse.ArgumentTypeError(f"--eval expects LABEL=DIR, got {text!r}")
    return label.strip(), Path(directory.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-results-table", description=__doc__.splitlines()[0])
    parser.add_argument("--eval", dest="runs", type=_parse_eval, action="append", required=True,
                        metavar="LABEL=DIR", help="a multi-task so101-eval output directory and its column label "
                        "(repeat; e.g. MeanFlow=runs/eval_meanflow)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output path without suffix: writes OUT.md and OUT.json (e.g. docs/results/multitask)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(label, directory) for label, directory in args.runs]
    except ResultsError as exc:
        print(f"so101-results-table: {exc}", file=sys.stderr)
        return 2
    table, data = build(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    print(table, end="")
    print(f"-> {args.out.with_suffix('.md')}, {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
