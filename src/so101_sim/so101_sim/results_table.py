"""so101-results-table: the multi-task results table (markdown + JSON) from multi-task so101-eval runs.

Each ``--eval LABEL=DIR`` names a directory written by ``so101-eval --tasks ...`` (its summary.json); every NFE it
evaluated becomes a column ``LABEL NFE n``. ``LABEL=DIR1+DIR2+...`` pools runs of one checkpoint and sampling on
other seed blocks into one column: their episodes are put together per task and every figure is recomputed as one
evaluation of all of them gives it (one block of 50 episodes per task spreads by several points). Rows are the
tasks, the mean score over the paper's three tasks and the instruction-following rate. Cells show the mean score
and the full-success rate; the JSON keeps the Wilson intervals, episode counts and chunk latencies. Each
``--wording LABEL=DIR`` names a run of ``so101-eval --tasks ... --paraphrases N --unrelated``: a table per run of
success with the task's own sentence, each held-out paraphrase and an unrelated instruction, and one comparison
table of all of them. The commit and machine of every run are named under the tables, so the numbers in docs/
always come from files, never from hand editing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from so101_sim.evaluate import multitask_summary, summarize
from so101_sim.rollout import EpisodeResult
from so101_sim.tasks import LANGUAGE_DECIDED, PAPER_TASKS, TASKS


class ResultsError(ValueError):
    """An --eval directory that is not a multi-task so101-eval output."""


def load_run(label: str, directory: Path, wording: bool = False) -> dict:
    """The run's summary.json, with its per-NFE summaries under ``by_nfe`` whether it swept NFE or not."""
    path = directory / "summary.json"
    flag = "--wording" if wording else "--eval"
    try:
        data = json.loads(path.read_text())
        summary = data["summary"]
    except FileNotFoundError:
        raise ResultsError(f"{flag} {label}={directory}: no summary.json (run so101-eval --tasks ... --out "
                           f"{directory} first)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{flag} {label}={directory}: {path} is not a so101-eval summary ({exc})") from None
    if wording and "instructions" not in summary:
        raise ResultsError(f"{flag} {label}={directory}: {path} has no paraphrase results (run so101-eval "
                           "--tasks ... --paraphrases N --unrelated)")
    by_nfe = summary["by_nfe"] if "by_nfe" in summary else {str(summary["nfe"]): summary}
    run = {"label": label, "dir": str(directory), "by_nfe": by_nfe, "instructions": summary.get("instructions"),
           "checkpoint": data.get("checkpoint"),
           "commit": data.get("commit", "unknown"), "machine": data.get("machine", "unknown"),
           "seed": data.get("seed"), "image_size": data.get("image_size"),
           # runs before coherent sampling drew one chunk per inference
           "candidates": data.get("candidates", 1), "average": data.get("average", 1)}
    if wording:
        # With the own sentences, at the run's first NFE: kept in the JSON so that --keep can rebuild the row.
        first = by_nfe[min(by_nfe, key=int)]["tasks"]
        run["following_own"] = _mean([first[t]["instruction_followed_rate"] for t in run["instructions"]
                                      if t in LANGUAGE_DECIDED])
    return run


# What runs must share to be pooled into one column.
_POOLED_ALIKE = ("checkpoint", "image_size", "candidates", "average")


def _task_report(label: str, path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsError(f"--eval {label}=...: {path} cannot be read ({exc})") from None


def pool_runs(label: str, directories: list[Path]) -> dict:
    """One run from several ``so101-eval --tasks`` runs of one checkpoint and sampling on other seeds: per task and
    NFE their episodes (DIR/<task>/eval_nfe<n>.json) pooled and summarised as so101-eval summarises one run."""
    parts = [load_run(label, directory) for directory in directories]
    first = parts[0]
    for part in parts[1:]:
        for key in _POOLED_ALIKE:
            if part[key] != first[key]:
                raise ResultsError(f"--eval {label}=...: {part['dir']} has {key} {part[key]!r}, {first['dir']} "
                                   f"{first[key]!r}; only runs of one checkpoint and sampling pool")
        if part["by_nfe"].keys() != first["by_nfe"].keys() or any(
                part["by_nfe"][n]["tasks"].keys() != first["by_nfe"][n]["tasks"].keys() for n in first["by_nfe"]):
            raise ResultsError(f"--eval {label}=...: {part['dir']} evaluated other tasks or NFEs than "
                               f"{first['dir']}")
    nfes = sorted(int(n) for n in first["by_nfe"])
    reports: dict[str, dict[int, dict]] = {}
    for task in first["by_nfe"][str(nfes[0])]["tasks"]:
        for nfe in nfes:
            episodes: list[EpisodeResult] = []
            limits: set[tuple[int, int]] = set()
            for directory in directories:
                path = directory / task / f"eval_nfe{nfe}.json"
                report = _task_report(label, path)
                try:
                    episodes += [EpisodeResult(**episode) for episode in report["results"]]
                    limits.add((report["max_steps"], report["action_steps"]))
                except (KeyError, TypeError) as exc:
                    raise ResultsError(f"--eval {label}=...: {path} is not a so101-eval task report ({exc!r})") \
                        from None
            seeds = [e.seed for e in episodes]
            if len(set(seeds)) < len(seeds):
                raise ResultsError(f"--eval {label}=...: {task} has episodes of the same seed in two runs; pool "
                                   "runs of other seeds")
            if len(limits) > 1:
                raise ResultsError(f"--eval {label}=...: {task} ran with other max/action steps in the runs "
                                   f"({sorted(limits)})")
            reports.setdefault(task, {})[nfe] = summarize(episodes, [], *limits.pop())
    summary = multitask_summary(reports, nfes)
    return {**first, "dir": " + ".join(str(d) for d in directories),
            "by_nfe": summary["by_nfe"] if "by_nfe" in summary else {str(summary["nfe"]): summary},
            "seed": [part["seed"] for part in parts],
            "commit": ", ".join(dict.fromkeys(part["commit"] for part in parts)),
            "machine": ", ".join(dict.fromkeys(part["machine"] for part in parts))}


def runs_from_table(data: dict, path: Path) -> list[dict]:
    """The runs behind an earlier OUT.json's columns (for --keep: their eval directories may be gone)."""
    try:
        sources = {src["label"]: src for src in data["sources"]}
        runs: dict[str, dict] = {}
        for column in data["columns"]:
            label = column["label"]
            run = runs.setdefault(label, {"label": label, "by_nfe": {}, "instructions": None,
                                          **{k: sources[label].get(k) for k in _SOURCE_KEYS}})
            run["by_nfe"][str(column["nfe"])] = {k: v for k, v in column.items() if k not in ("label", "nfe")}
    except (KeyError, TypeError) as exc:
        raise ResultsError(f"--keep: {path} is not a results table's JSON ({exc!r})") from None
    return list(runs.values())


def wording_runs_from_table(data: dict, path: Path) -> list[dict]:
    """The wording runs behind an earlier OUT.json (for --keep, as runs_from_table)."""
    try:
        return [{"label": run["label"], "instructions": run["instructions"], "following_own": run["following_own"],
                 **{k: run.get(k) for k in _SOURCE_KEYS}} for run in data["wording"]["runs"]]
    except (KeyError, TypeError) as exc:
        raise ResultsError(f"--keep: {path} is not a wording table's JSON ({exc!r})") from None


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f} %"


def _mean_label(columns: list[tuple[dict, str]]) -> str:
    """What the mean-score row averages: the paper's three tasks, or the ones the runs had (named)."""
    over = {tuple(run["by_nfe"][n].get("mean_score_over", PAPER_TASKS)) for run, n in columns}
    if over == {PAPER_TASKS}:
        return "paper tasks"
    return ", ".join(sorted(over)[0]) if len(over) == 1 else "the paper tasks each run had"


def _cell(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['score']:.2f} ({_percent(entry['success_rate'])} of {entry['episodes']})"


def _latency(summary: dict) -> str:
    return "-" if summary["chunk_ms_median"] is None else f"{summary['chunk_ms_median']:.1f}"


def _task_rows(columns: list[tuple[dict, str]], tasks: list[str]) -> list[str]:
    """Rows = tasks (+ mean, following, latency), a column per run and NFE: the paper's Table V layout."""
    lines = ["| task | " + " | ".join(f"{run['label']} NFE {n}" for run, n in columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| {task} | " + " | ".join(_cell(run["by_nfe"][n]["tasks"].get(task)) for run, n in columns) + " |"
              for task in tasks]
    if len(tasks) > 1:
        lines.append(f"| **mean score ({_mean_label(columns)})** | " + " | ".join(
            f"**{run['by_nfe'][n]['mean_score']:.2f}**" for run, n in columns) + " |")
    if any(run["by_nfe"][n]["instruction_following"] is not None for run, n in columns):
        lines.append("| instruction following | " + " | ".join(
            _percent(run["by_nfe"][n]["instruction_following"]) for run, n in columns) + " |")
    if any(run["by_nfe"][n].get("dwelt") is not None for run, n in columns):
        lines.append("| episodes that dwelt at a grasp | " + " | ".join(_dwelt(run["by_nfe"][n]) for run, n in columns)
                     + " |")
    lines.append("| chunk latency median (ms) | " + " | ".join(_latency(run["by_nfe"][n]) for run, n in columns)
                 + " |")
    return lines


def _dwelt(summary: dict) -> str:
    """'12 of 300': episodes, over every task, where so101-eval saw the policy dwell at a grasp ('-': not watched,
    evaluations made before 2026-12-03)."""
    if summary.get("dwelt") is None:
        return "-"
    return f"{summary['dwelt']} of {sum(t['episodes'] for t in summary['tasks'].values())}"


def _run_rows(columns: list[tuple[dict, str]], tasks: list[str]) -> list[str]:
    """Rows = runs and NFEs, columns = tasks: the layout that stays readable for many runs."""
    lines = [f"| run | NFE | {' | '.join(tasks)} | mean score ({_mean_label(columns)}) | instruction following | "
             "dwelt at a grasp | chunk ms |", "|---|---|" + "---|" * (len(tasks) + 4)]
    for run, n in columns:
        summary = run["by_nfe"][n]
        lines.append(f"| {run['label']} | {n} | " + " | ".join(_cell(summary["tasks"].get(t)) for t in tasks)
                     + f" | **{summary['mean_score']:.2f}** | {_percent(summary['instruction_following'])} | "
                     f"{_dwelt(summary)} | {_latency(summary)} |")
    return lines


def build(runs: list[dict], headline: list[str] | None = None) -> tuple[str, dict]:
    """Markdown and its JSON (columns in the order given, each run's NFEs ascending). Without ``headline`` one
    table, rows = tasks, with a column per run and NFE; with it, that table for the ``headline`` runs, then
    every run as a row (rows = runs and NFEs, columns = tasks)."""
    columns = [(run, nfe) for run in runs for nfe in sorted(run["by_nfe"], key=int)]
    tasks = [t for t in TASKS if any(t in run["by_nfe"][n]["tasks"] for run, n in columns)]
    shown = columns
    if headline:  # in the order the headline names them (the shipped inference first)
        shown = sorted((c for c in columns if c[0]["label"] in headline), key=lambda c: headline.index(c[0]["label"]))
    lines = _task_rows(shown, tasks)
    if headline and len(shown) < len(columns):
        lines += ["", "Every run:", ""] + _run_rows(columns, tasks)
    lines.append("")
    lines.append("Cells: mean partial-credit score (full-success rate of N episodes). Sources:")
    lines += [_source_line(run) for run in runs]
    table = "\n".join(lines) + "\n"
    data = {"columns": [{"label": run["label"], "nfe": int(n), **run["by_nfe"][n]} for run, n in columns],
            "sources": [{"label": run["label"], **{k: run[k] for k in _SOURCE_KEYS}} for run in runs]}
    if headline:
        data["headline"] = headline
    return table, data


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def wording_row(run: dict) -> dict:
    """One run's wording figures, averaged over its tasks: success with the own sentence, with the paraphrases
    (and relative to the own sentence), with the unrelated instruction; instruction following on the
    language-decided variants with the own sentences and with the held-out paraphrases."""
    tasks = run["instructions"]
    own = _mean([t["own"]["success_rate"] for t in tasks.values()])
    para = _mean([t.get("paraphrase_success_rate") for t in tasks.values()])
    unrelated = _mean([t["by_kind"]["unrelated"]["success_rate"] for t in tasks.values()
                       if "unrelated" in t["by_kind"]])
    decided = [t for t in tasks if t in LANGUAGE_DECIDED]
    following_para = _mean([r["instruction_followed_rate"] for t in decided
                            for kind, r in tasks[t]["by_kind"].items() if kind != "unrelated"])
    return {"label": run["label"], "own_success": own, "paraphrase_success": para,
            "paraphrase_relative": para / own if para is not None and own else None, "unrelated_success": unrelated,
            "following_own": run["following_own"], "following_paraphrases": following_para}


def build_wording(runs: list[dict]) -> tuple[str, dict]:
    """Markdown (a comparison table, then one table per run) and its JSON."""
    rows = [wording_row(run) for run in runs]
    lines = ["| run | own sentence | held-out paraphrases | paraphrases / own | unrelated instruction | "
             "following, own | following, paraphrases |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        relative = "-" if row["paraphrase_relative"] is None else f"{row['paraphrase_relative']:.2f}"
        lines.append(f"| {row['label']} | {_percent(row['own_success'])} | {_percent(row['paraphrase_success'])} | "
                     f"{relative} | {_percent(row['unrelated_success'])} | {_percent(row['following_own'])} | "
                     f"{_percent(row['following_paraphrases'])} |")
    lines += ["", "Success rates averaged over the tasks; following: episodes of the language-decided variants "
              f"({', '.join(LANGUAGE_DECIDED)}) in which the policy moved the object the instruction names."]
    for run in runs:
        tasks = run["instructions"]
        kinds = list(dict.fromkeys(k for t in tasks.values() for k in t["by_kind"]))
        lines += ["", f"### {run['label']}", "", "| task | own sentence | " + " | ".join(k.replace("_", " ")
                                                                                       for k in kinds) + " |",
                  "|---|---|" + "---|" * len(kinds)]
        for task, entry in tasks.items():
            cells = [f"{_percent(entry['own']['success_rate'])} ({entry['own']['score']:.2f})"]
            for kind in kinds:
                r = entry["by_kind"].get(kind)
                cells.append("-" if r is None else f"{_percent(r['success_rate'])} ({r['score']:.2f})")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        first, entry = next(iter(tasks.items()))
        said = "; ".join(f"{kind.replace('_', ' ')} \"{r['instruction']}\"" for kind, r in entry["by_kind"].items())
        lines += ["", f"Cells: full-success rate (mean score). {first}: own \"{entry['own']['instruction']}\"; "
                  f"{said} (every task's sentences are in the JSON)."]
    lines += ["", "Sources:"] + [_source_line(run) for run in runs]
    data = {"rows": rows, "runs": [{"label": run["label"], "instructions": run["instructions"],
                                    "following_own": run["following_own"], **{k: run[k] for k in _SOURCE_KEYS}}
                                   for run in runs]}
    return "\n".join(lines) + "\n", data


_SOURCE_KEYS = ("dir", "checkpoint", "commit", "machine", "seed", "image_size", "candidates", "average")


def _source_line(run: dict) -> str:
    candidates = run.get("candidates") or 1  # runs kept from before coherent sampling have none
    average = run.get("average") or 1
    drawn = ("one draw per chunk" if candidates == 1 else f"the closest of {candidates} draws per chunk" if average == 1
             else f"the mean of the {average} closest of {candidates} draws per chunk")
    seeds = run["seed"]
    start = ", ".join(map(str, seeds)) if isinstance(seeds, list) else seeds  # a pooled run: each block's first
    return (f"- {run['label']}: `{run['dir']}` (checkpoint `{run['checkpoint']}`, seeds from {start}, "
            f"{run['image_size']} px, {drawn}), commit {run['commit']}, {run['machine']}")


def _parse_eval(text: str) -> tuple[str, list[Path]]:
    label, sep, directories = text.partition("=")
    parts = [d.strip() for d in directories.split("+")]
    if not sep or not label.strip() or not all(parts):
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR or LABEL=DIR+DIR+..., got {text!r}")
    return label.strip(), [Path(d) for d in parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-results-table", description=__doc__.splitlines()[0])
    parser.add_argument("--eval", dest="runs", type=_parse_eval, action="append", default=[],
                        metavar="LABEL=DIR", help="a multi-task so101-eval output directory and its column label "
                        "(repeat; e.g. MeanFlow=runs/eval_meanflow); LABEL=DIR+DIR+... pools runs of one checkpoint "
                        "and sampling on other seeds into one column")
    parser.add_argument("--wording", type=_parse_eval, action="append", default=[], metavar="LABEL=DIR",
                        help="a so101-eval --tasks ... --paraphrases N --unrelated output directory: the wording "
                        "tables (repeat)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output path without suffix: writes OUT.md and OUT.json (e.g. docs/results/multitask)")
    parser.add_argument("--headline", action="append", default=[], metavar="LABEL",
                        help="a run (its --eval label) of the first table, rows = tasks, in the order given (repeat; "
                             "kept in OUT.json): "
                             "every run then also gets a row of its own in a second table (default: one table of "
                             "every run)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the columns and wording runs already in OUT.json (from runs whose directories may "
                             "be gone, e.g. on a fresh machine) and add the --eval / --wording runs after them; a "
                             "label that is already there is replaced")
    args = parser.parse_args(argv)
    if not args.runs and not args.wording and not args.keep:
        parser.error("give at least one --eval or --wording run, or --keep to rewrite OUT from its JSON")
    try:
        runs = [load_run(label, dirs[0]) if len(dirs) == 1 else pool_runs(label, dirs) for label, dirs in args.runs]
        if any(len(dirs) > 1 for _, dirs in args.wording):
            parser.error("--wording takes one directory per label (pooling is for --eval)")
        wording = [load_run(label, dirs[0], wording=True) for label, dirs in args.wording]
        if args.keep and args.out.with_suffix(".json").exists():
            path = args.out.with_suffix(".json")
            try:
                earlier = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ResultsError(f"--keep: {path} cannot be read ({exc})") from None
            given = {run["label"] for run in runs}
            args.headline = args.headline or earlier.get("headline", [])
            if "columns" in earlier:
                runs = [run for run in runs_from_table(earlier, path) if run["label"] not in given] + runs
            if "wording" in earlier:
                said = {run["label"] for run in wording}
                wording = [run for run in wording_runs_from_table(earlier, path) if run["label"] not in said] + wording
    except ResultsError as exc:
        print(f"so101-results-table: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.headline) - {run["label"] for run in runs})
    if unknown:
        print(f"so101-results-table: --headline {unknown[0]!r} is not the label of a run", file=sys.stderr)
        return 2
    table, data = build(runs, args.headline) if runs else ("", {})
    if wording:
        text, data["wording"] = build_wording(wording)
        table += ("\n" if table else "") + text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    print(table, end="")
    print(f"-> {args.out.with_suffix('.md')}, {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
