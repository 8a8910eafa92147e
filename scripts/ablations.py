#!/usr/bin/env python3
"""The paper's ablations (Tables I-IV) on pick-place in the sim, as one resumable command: ``make ablations``.

Every cell changes one setting of the shipped configuration (flow ratio 0.2, adaptive gamma 0.5, chunk 20, NFE 1)
and trains a fresh action expert for it on the frozen backbone of the shipped pick-place checkpoint
(``meanflow-train --backbone-from ... --freeze-backbone``: the expert learns from cached prefix features, no
backbone in the step), on the same scripted demos with the same seed and steps; ``so101-eval`` then scores it on
held-out seeds (1000 on). Table III trains the default configuration once and evaluates it at each NFE; the
default configuration's cells of the other tables are the same run, trained and evaluated once.

After each evaluated run its cells are appended to ``docs/results/ablations.json`` (written atomically) and the
tables ``docs/results/ablations.md`` are regenerated from it. A cell already in the JSON with the same settings
(steps, batch, demos, evaluation episodes and seed) is skipped, so a rerun continues the grid: on the same machine
an interrupted training resumes from its checkpoint; on a fresh machine (runs/ gone) the committed JSON is what
says which cells are done.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from so101_common.provenance import git_commit, machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "ablations"
SHIPPED = "shipped"
EVAL_SEED = 1000  # evaluation seeds: demos use 0-99, recovery rounds 3000 and up
IMAGE_SIZE = 64
TRAIN_SEED = 0
LR = 1e-3
EMA_DECAY = 0.999
MIN_START_S = 60.0  # with less time left than this, no new training starts
# The fields each JSON cell must hold (the schema); the driver adds provenance and details.
CELL_FIELDS = ("table", "value", "success_rate", "episodes")
# What makes two measurements of a cell comparable: a cell is finished only when measured with these settings.
SETTING_FIELDS = ("steps", "batch_size", "lr", "demo_episodes", "episodes", "eval_seed")


@dataclass(frozen=True)
class Table:
    """One of the paper's ablation tables: the setting it varies and the values it tries."""

    name: str
    parameter: str
    title: str
    values: tuple[float, ...]


TABLES = (
    Table("I", "flow_ratio", "flow ratio (share of each batch trained with r = t)", (0.0, 0.2, 0.5, 0.75, 1.0)),
    Table("II", "adaptive_gamma", "adaptive-loss gamma (1: plain squared error)", (0.3, 0.5, 1.0)),
    Table("III", "nfe", "network evaluations per chunk (NFE)", (1, 2, 3, 5, 10)),
    Table("IV", "chunk_size", "action chunk size (steps)", (1, 10, 20, 50)),
)
TABLE_BY_NAME = {t.name: t for t in TABLES}
# The shipped configuration: every cell changes exactly one of these.
DEFAULTS: dict[str, float] = {"flow_ratio": 0.2, "adaptive_gamma": 0.5, "nfe": 1, "chunk_size": 20}

# The paper's figures, kept in this one place. Source: the project's design notes (/work/shared/DESIGN.md), which
# give the paper's best values (flow ratio 0.2, gamma 0.5, chunk 20), NFE 1 -> 49 % and NFE 5 -> 84.5 %, and
# "chunk 1 -> near 0"; the paper's mean over its three real-robot tasks, not pick-place in this sim. Every other
# cell says "see paper" rather than a number we do not have.
PAPER: dict[tuple[str, float], str] = {
    ("I", 0.2): "best",
    ("II", 0.5): "best",
    ("III", 1): "49 %",
    ("III", 5): "84.5 %",
    ("IV", 1): "near 0",
    ("IV", 20): "best",
}


class AblationError(RuntimeError):
    """Bad input or a failed step: one line for the user, exit status 2."""


def log(message: str) -> None:
    print(f"[ablations] {message}", flush=True)


def fmt(value: float) -> str:
    """A grid value as the tables and run names write it (0.2, 1, 20)."""
    return f"{value:g}"


@dataclass(frozen=True)
class Cell:
    table: Table
    value: float

    @property
    def config(self) -> dict[str, float]:
        """The full setting of this cell: the defaults with the table's parameter changed."""
        return {**DEFAULTS, self.table.parameter: self.value}

    @property
    def run(self) -> str:
        """The trained run this cell evaluates (cells differing only in NFE share it)."""
        c = self.config
        return f"fr{fmt(c['flow_ratio'])}_g{fmt(c['adaptive_gamma'])}_c{fmt(c['chunk_size'])}"

    @property
    def nfe(self) -> int:
        return int(self.config["nfe"])

    @property
    def label(self) -> str:
        return f"{self.table.name}:{fmt(self.value)}"


def parse_tables(items: Sequence[str]) -> list[Cell]:
    """``I III:1,2`` -> the cells of table I and cells 1 and 2 of table III (each value must be in the grid)."""
    cells: list[Cell] = []
    for item in items:
        name, _, values = item.partition(":")
        table = TABLE_BY_NAME.get(name.strip().upper())
        if table is None:
            raise AblationError(f"--tables {item!r}: no table {name!r} (tables: {', '.join(TABLE_BY_NAME)})")
        chosen = table.values
        if values:
            try:
                wanted = [float(v) for v in values.split(",")]
            except ValueError:
                raise AblationError(f"--tables {item!r}: values must be numbers, e.g. {table.name}:"
                                    f"{','.join(fmt(v) for v in table.values[:2])}") from None
            unknown = [fmt(v) for v in wanted if v not in table.values]
            if unknown:
                raise AblationError(f"--tables {item!r}: {', '.join(unknown)} not in table {table.name}'s grid "
                                    f"({', '.join(fmt(v) for v in table.values)})")
            chosen = tuple(v for v in table.values if v in wanted)
        cells += [Cell(table, v) for v in chosen if Cell(table, v) not in cells]
    return cells


# ---- the results file ------------------------------------------------------------------------------------------
def load_results(path: Path) -> list[dict[str, Any]]:
    """The cells measured so far (none when the file does not exist); anything unreadable is one clear error,
    never silently replaced: the file is the only record of the finished cells on a fresh machine."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        cells = data["cells"]
        if not isinstance(cells, list):
            raise TypeError(f"'cells' is a {type(cells).__name__}, not a list")
        for i, cell in enumerate(cells):
            missing = [f for f in (*CELL_FIELDS, *SETTING_FIELDS, "run", "nfe") if f not in cell]
            if missing:
                raise KeyError(f"cell {i} lacks {missing}")
            if cell["table"] not in TABLE_BY_NAME:
                raise ValueError(f"cell {i} names table {cell['table']!r}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise AblationError(f"{path} is not an ablations results file ({type(exc).__name__}: {exc}); restore it "
                            f"(git checkout -- {path}) or move it away to start the grid again") from None
    return cells


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ordered(cells: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {(t.name, v): (i, j) for i, t in enumerate(TABLES) for j, v in enumerate(t.values)}
    return sorted(cells, key=lambda c: (order.get((c["table"], c["value"]), (len(TABLES), 0)), -c["steps"]))


def save_results(base: Path, cells: list[dict[str, Any]]) -> None:
    """ablations.json (every cell) and ablations.md (the tables), both regenerated from the cells."""
    cells = ordered(cells)
    data = {"description": "Paper Tables I-IV on pick-place in the sim (scripts/ablations.py, make ablations); "
                           "one entry per cell, each with its settings, commit and machine",
            "cells": cells}
    write_atomic(base.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    write_atomic(base.with_suffix(".md"), markdown(cells))


def _percent(rate: float) -> str:
    return f"{100 * rate:.0f} %"


def markdown(cells: list[dict[str, Any]]) -> str:
    """Tables I-IV, ours beside the paper's, then where every number came from."""
    lines = ["# Ablations: the paper's Tables I-IV, pick-place in simulation", "",
             "Generated by `make ablations` (`scripts/ablations.py`) from `ablations.json`; do not edit by hand. "
             "Each cell trains a fresh action expert with one setting changed from the shipped configuration (flow "
             "ratio 0.2, gamma 0.5, chunk 20, NFE 1) on the frozen backbone of the shipped pick-place checkpoint, "
             "on the scripted pick-place demos (seeds 0..), then evaluates it in closed loop on held-out seeds "
             "(1000..). Rows with the default setting are the same trained run. One block of rows per training "
             "setting measured, the longest training first. How to run and continue it: "
             "[docs/results.md](../results.md#ablations-the-papers-tables-i-iv).", "",
             "Paper column: the paper's mean over its three SO-101 tasks where the project's notes give a figure, "
             "\"best\" where they only name the value the paper found best, \"see paper\" otherwise.", ""]
    def setting(cell: dict[str, Any]) -> tuple:
        return tuple(cell[f] for f in SETTING_FIELDS)

    by_key: dict[tuple, dict[str, Any]] = {(c["table"], c["value"], setting(c)): c for c in cells}
    # Each training setting measured is its own block (a grid at 4,000 steps beside one at 12,000), longest first.
    settings: list[tuple | None] = [*sorted({setting(c) for c in cells}, key=lambda s: (-s[0], s))] or [None]
    for table in TABLES:
        lines += [f"## Table {table.name}: {table.title}", "",
                  f"| {table.parameter} | success | 95 % interval | mean score | chunk ms (median) | steps | paper |",
                  "|---|---|---|---|---|---|---|"]
        for value, which in ((v, s) for s in settings for v in table.values):
            name = fmt(value) + (" (default)" if value == DEFAULTS[table.parameter] else "")
            paper = PAPER.get((table.name, value), "see paper")
            cell = by_key.get((table.name, value, which))
            if cell is None:
                lines.append(f"| {name} | not run yet | | | | {'' if which is None else which[0]} | {paper} |")
                continue
            low, high = cell["ci95"]
            latency = "-" if cell["chunk_ms_median"] is None else f"{cell['chunk_ms_median']:.1f}"
            lines.append(f"| {name} | {cell['successes']}/{cell['episodes']} = {_percent(cell['success_rate'])} | "
                         f"{_percent(low)}-{_percent(high)} | {cell['score']:.2f} | {latency} | {cell['steps']} | "
                         f"{paper} |")
        lines.append("")
    sources: dict[tuple[str, str], list[str]] = {}
    for cell in ordered(cells):
        sources.setdefault((cell["commit"], cell["machine"]), []).append(f"{cell['table']}:{fmt(cell['value'])}")
    if sources:
        lines.append("Measured at (commit, machine: cells):")
        lines += [f"- {commit}, {where}: {', '.join(labels)}" for (commit, where), labels in sources.items()]
        lines.append("")
        lines.append("Settings (" + ", ".join(SETTING_FIELDS) + "): " +
                     "; ".join(", ".join(str(v) for v in s) for s in settings if s is not None) + ".")
    return "\n".join(lines) + "\n"


# ---- the work ----------------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """The options of one invocation, resolved."""

    demos: Path
    demo_episodes: int
    runs: Path
    cache: Path
    backbone: Path
    steps: int
    batch_size: int
    lr: float
    episodes: int
    jobs: int
    deadline: float | None

    @property
    def settings(self) -> dict[str, float]:
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "demo_episodes": self.demo_episodes, "episodes": self.episodes, "eval_seed": EVAL_SEED}

    def run_dir(self, run: str) -> Path:
        return self.runs / f"{run}_s{self.steps}_b{self.batch_size}_lr{self.lr:g}_d{self.demo_episodes}"

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def resolve_backbone(argument: str) -> Path:
    """``shipped``: the pick-place checkpoint meanflow_policy installs (package data); else a checkpoint dir."""
    if argument != SHIPPED:
        return Path(argument)
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        return Path(get_package_share_directory("meanflow_policy")) / "checkpoints" / "sim_pick_place"
    except PackageNotFoundError:
        raise AblationError("meanflow_policy is not installed in this environment: source build/env.sh "
                            "(after make setup)") from None


def ensure_demos(grid: Grid) -> None:
    """The scripted pick-place demos (seeds from 0, 64 px): generated when the folder is missing or empty."""
    if grid.demos.is_dir() and any(p.is_dir() for p in grid.demos.iterdir()):
        found = sum(1 for p in grid.demos.iterdir() if p.is_dir())
        if found != grid.demo_episodes:
            raise AblationError(f"--demos {grid.demos} holds {found} episodes, --demo-episodes says "
                                f"{grid.demo_episodes} (an interrupted generation? delete the folder to make them "
                                "again)")
        return
    log(f"generating {grid.demo_episodes} scripted pick-place demos into {grid.demos}")
    command([sys.executable, "-m", "so101_sim.demos", "--task", "pick_place", "--episodes", str(grid.demo_episodes),
             "--seed", "0", "--image-size", str(IMAGE_SIZE), "--out", str(grid.demos)], "demo generation")


class Interrupted(Exception):
    """A signal asked the grid to stop: running trainings were told to save their state; nothing new starts."""


class _Stop:
    """SIGINT / SIGTERM handling for the whole grid: the first signal is passed on once to every running step (a
    trainer then saves a checkpoint it resumes exactly from) and no further step starts; the driver exits once the
    running steps have ended. Installed explicitly, so a grid started in the background, where the shell ignores
    SIGINT, still stops on it."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[str]] = set()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            return  # a trainer aborts without saving on a second signal: pass on only the first
        self.requested.set()
        log(f"{signal.Signals(signum).name}: asking the running steps to save and stop; nothing new starts")
        with self._lock:
            for proc in self._running:
                proc.send_signal(signal.SIGINT)

    def run(self, argv: list[str], stderr: Any) -> subprocess.CompletedProcess[str]:
        """subprocess.run, registered so a signal reaches the step; Interrupted if a stop was asked before."""
        with self._lock:
            if self.requested.is_set():
                raise Interrupted()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
            self._running.add(proc)
        try:
            out, _ = proc.communicate()
        finally:
            with self._lock:
                self._running.discard(proc)
        if self.requested.is_set() and proc.returncode != 0:
            raise Interrupted()
        return subprocess.CompletedProcess(argv, proc.returncode, out)


STOP = _Stop()


def command(argv: list[str], what: str, log_file: Path | None = None) -> str:
    """Run a step to completion; its stdout is returned, its stderr goes to ``log_file`` (or ours). Raises
    Interrupted when a signal stopped it (or came before it started)."""
    started = time.monotonic()
    if log_file is None:
        proc = STOP.run(argv, None)
    else:
        with open(log_file, "a") as err:
            proc = STOP.run(argv, err)
    if proc.returncode != 0:
        where = f"; its log: {log_file}" if log_file else ""
        raise AblationError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}{where}")
    log(f"{what}: done in {time.monotonic() - started:.0f} s")
    return proc.stdout


def trained_steps(run_dir: Path) -> int:
    """Steps of the run's last complete checkpoint (0 when it has none)."""
    try:
        return int(json.loads((run_dir / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def train_command(grid: Grid, cell: Cell, run_dir: Path) -> list[str]:
    """meanflow-train for a run: a new run on the backbone, or --resume of one this machine started."""
    base = [sys.executable, "-m", "meanflow_policy.tools.train", "--bags", str(grid.demos), "--out", str(run_dir),
            "--steps", str(grid.steps), "--cpu-threads", "1", "--no-progress", "--cache-dir", str(grid.cache)]
    left = grid.time_left()
    if left is not None:
        base += ["--time-limit", f"{max(left, 1.0):.0f}"]
    if trained_steps(run_dir) > 0:
        return base + ["--resume"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a start that never reached its first checkpoint
    c = cell.config
    return base + ["--backbone-from", str(grid.backbone), "--freeze-backbone", "--flow-ratio", fmt(c["flow_ratio"]),
                   "--adaptive-gamma", fmt(c["adaptive_gamma"]), "--chunk-size", fmt(c["chunk_size"]),
                   "--batch-size", str(grid.batch_size), "--lr", f"{grid.lr:g}", "--ema-decay", str(EMA_DECAY),
                   "--seed", str(TRAIN_SEED), "--val-every", str(max(1, grid.steps // 4))]


def train(grid: Grid, run: str, cell: Cell) -> None:
    """Train the run to ``grid.steps`` (or until the time limit), one torch thread; a finished run is left alone."""
    run_dir = grid.run_dir(run)
    if trained_steps(run_dir) >= grid.steps:
        log(f"{run}: trained already ({run_dir})")
        return
    argv = train_command(grid, cell, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"{run}: training {grid.steps} steps{' (resumed)' if '--resume' in argv else ''} -> {run_dir} "
        f"(log {run_dir / 'train.log'})")
    summary = json.loads(command(argv, f"{run}: training", log_file=run_dir / "train.log") or "{}")
    log(f"{run}: step {summary.get('steps')} of {grid.steps} ({summary.get('steps_per_s')} steps/s)")


def measure(grid: Grid, run: str, cells: list[Cell], commit: str, where: str) -> dict[int, dict[str, Any]] | None:
    """Train one run and evaluate it at its cells' NFEs; None when the time limit left it unfinished."""
    left = grid.time_left()
    if STOP.requested.is_set() or (left is not None and left < MIN_START_S):
        return None
    try:
        train(grid, run, cells[0])
    except Interrupted:
        return None
    if STOP.requested.is_set() or trained_steps(grid.run_dir(run)) < grid.steps:
        return None
    try:
        return evaluate(grid, run, sorted({c.nfe for c in cells}), commit, where)
    except Interrupted:  # evaluated again in full by the next run of the grid
        return None


def evaluate(grid: Grid, run: str, nfes: list[int], commit: str, where: str) -> dict[int, dict[str, Any]]:
    """so101-eval of the run's final checkpoint at each NFE on the held-out seeds; per NFE the cell's fields."""
    run_dir = grid.run_dir(run)
    out = run_dir / "eval"
    started = time.monotonic()
    command([sys.executable, "-m", "so101_sim.evaluate", "--checkpoint", str(run_dir / "last"),
             "--sweep-nfe", ",".join(str(n) for n in nfes), "--episodes", str(grid.episodes), "--seed", str(EVAL_SEED),
             "--image-size", str(IMAGE_SIZE), "--workers", "1", "--video-episodes", "0",
             # the paper's sampler, one draw per chunk, as every recorded cell (not coherent sampling)
             "--candidates", "1", "--out", str(out)],
            f"{run}: evaluation at NFE {','.join(str(n) for n in nfes)}", log_file=run_dir / "eval.log")
    seconds = round(time.monotonic() - started, 1)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = {}
    for nfe in nfes:
        report = json.loads((out / f"eval_nfe{nfe}.json").read_text())
        results[nfe] = {"success_rate": report["success_rate"], "episodes": report["episodes"],
                        "successes": report["successes"], "ci95": report["ci95"], "score": report["score"],
                        "chunk_ms_median": report["chunk_latency"].get("median_ms"), "run": run, "nfe": nfe,
                        **grid.settings, "eval_seconds": seconds, "commit": commit, "machine": where,
                        "date_utc": when}
    return results


def is_finished(entry: dict[str, Any], settings: dict[str, float]) -> bool:
    return all(entry.get(k) == v for k, v in settings.items())


def run_grid(grid: Grid, cells: list[Cell], results_base: Path) -> dict[str, Any]:
    """Measure every cell not in the results yet; returns the final summary (also the last printed line)."""
    done = load_results(results_base.with_suffix(".json"))
    commit, where = git_commit(str(ROOT)), machine()
    settings = grid.settings

    def entry(cell: Cell) -> dict[str, Any] | None:
        return next((e for e in done if (e["table"], e["value"]) == (cell.table.name, cell.value)
                     and is_finished(e, settings)), None)

    def record(cell: Cell, fields: dict[str, Any]) -> None:
        # A cell replaces only its own measurement with these settings; those with other settings stay beside it.
        done[:] = [e for e in done if (e["table"], e["value"]) != (cell.table.name, cell.value)
                   or not is_finished(e, settings)]
        done.append({"table": cell.table.name, "value": cell.value, "parameter": cell.table.parameter, **fields})

    todo = [c for c in cells if entry(c) is None]
    log(f"{len(cells)} cell(s) asked for, {len(cells) - len(todo)} finished already (skipped), {len(todo)} to do; "
        f"settings {settings}")
    # A cell whose run and NFE another table measured with the same settings is that measurement.
    for cell in list(todo):
        twin = next((e for e in done if e["run"] == cell.run and e["nfe"] == cell.nfe
                     and is_finished(e, settings)), None)
        if twin is not None:
            record(cell, {k: v for k, v in twin.items() if k not in ("table", "value", "parameter")})
            todo.remove(cell)
            log(f"{cell.label}: the same run and NFE as {twin['table']}:{fmt(twin['value'])} (no training)")
    save_results(results_base, done)
    by_run: dict[str, list[Cell]] = {}
    for cell in todo:
        by_run.setdefault(cell.run, []).append(cell)
    runs = list(by_run.items())
    stopped = False
    if runs:
        ensure_demos(grid)
    # Each of ``jobs`` slots trains a run and then evaluates it (one core each), so neither core waits for the
    # other's slower run; cells are recorded here, in this thread, as runs finish.
    with ThreadPoolExecutor(max_workers=grid.jobs) as pool:
        futures = {pool.submit(measure, grid, run, run_cells, commit, where): run_cells for run, run_cells in runs}
        try:
            for future in as_completed(futures):
                measured = future.result()
                if measured is None:
                    stopped = True
                    continue
                for cell in futures[future]:
                    record(cell, measured[cell.nfe])
                    m = measured[cell.nfe]
                    log(f"{cell.label}: {m['successes']}/{m['episodes']} = {_percent(m['success_rate'])}")
                save_results(results_base, done)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    finished = sum(entry(c) is not None for c in cells)
    if stopped:
        why = "stopped by a signal" if STOP.requested.is_set() else "time limit reached"
        log(f"{why}: {len(cells) - finished} cell(s) left. Run again to continue (an unfinished "
            "training resumes from its checkpoint on this machine; on a fresh one its cells start again)")
    log(f"results: {results_base.with_suffix('.json')}, {results_base.with_suffix('.md')} (commit them: the JSON "
        "is what a rerun on a fresh machine skips by)")
    return {"cells": len(cells), "finished": finished, "left": len(cells) - finished,
            "json": str(results_base.with_suffix(".json"))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ablations", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tables", nargs="+", default=[t.name for t in TABLES], metavar="TABLE[:V,...]",
                   help="tables to run (I flow ratio, II gamma, III NFE, IV chunk size), optionally only some of "
                        "their values, e.g. I III:1,5")
    p.add_argument("--steps", type=int, default=12000,
                   help="training steps of each run (4,000 left every cell near 20 %% success)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate of every run")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per cell (seeds 1000..)")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="stop training when this much time has passed (0: none); finished runs are still "
                        "evaluated, and a rerun continues")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs measured at once, each trained and then evaluated on one core (one torch thread)")
    p.add_argument("--demos", type=Path, default=ROOT / "data" / "sim_pick_place",
                   help="scripted pick-place demos (generated here when missing)")
    p.add_argument("--demo-episodes", type=int, default=100, help="demos in --demos (seeds 0..)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablations", help="training runs and evaluations")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="meanflow-train's dataset and prefix-feature cache (None: RUNS/cache)")
    p.add_argument("--backbone-from", default=SHIPPED,
                   help="checkpoint whose frozen backbone every cell uses ('shipped': the installed pick-place one)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="results path without suffix: .json (the cells) and .md (the tables)")
    p.add_argument("--report-only", action="store_true",
                   help="only regenerate the .md (and a tidy .json) from the cells in the .json; no training")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("steps", "batch_size", "episodes", "jobs", "demo_episodes"):
            if getattr(args, name) < 1:
                raise AblationError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        cells = parse_tables(args.tables)
        done = load_results(args.results.with_suffix(".json"))  # a broken file stops us before any work
        if args.report_only:
            save_results(args.results, done)
            log(f"{len(done)} cell(s) -> {args.results.with_suffix('.md')}")
            return 0
        grid = Grid(demos=args.demos, demo_episodes=args.demo_episodes, runs=args.runs,
                    cache=args.cache_dir or args.runs / "cache", backbone=resolve_backbone(args.backbone_from),
                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, episodes=args.episodes,
                    jobs=args.jobs,
                    deadline=time.monotonic() + args.time_limit if args.time_limit > 0 else None)
        STOP.install()
        summary = run_grid(grid, cells, args.results)
    except AblationError as exc:
        print(f"ablations: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print("ablations: interrupted; finished cells are saved, run again to continue", file=sys.stderr)
        return 130
    if STOP.requested.is_set():
        print(json.dumps(summary), flush=True)
        return 130
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
