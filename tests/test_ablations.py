"""scripts/ablations.py (make ablations) end to end on a tiny grid: demos, training, evaluation, results files.

Three cells of two runs measured at once (flow ratio 0, and the default configuration at NFE 1 and 2: two
scripted demos, two training steps, one evaluation episode), then a rerun on a "fresh machine" (runs and demos
deleted) that must take the finished cells from the results JSON alone, and a broken results file that must stop
the driver before any work.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ablations.py"


def _ablations(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--demos", str(tmp / "demos"), "--demo-episodes", "2", "--runs",
         str(tmp / "runs"), "--results", str(tmp / "results" / "ablations"), "--steps", "2", "--batch-size", "4",
         "--episodes", "1", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # ~40 s of CPU: demos, two trainings and four evaluations in subprocesses
@pytest.mark.timeout(900)
def test_grid_writes_the_tables_and_a_rerun_skips_finished_cells(tmp_path: Path) -> None:
    first = _ablations(tmp_path, "--tables", "I:0,0.2", "III:2", "--jobs", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "fr0_g0.5_c20: training 2 steps" in first.stdout and "fr0.2_g0.5_c20: training 2 steps" in first.stdout
    assert "fr0.2_g0.5_c20: evaluation at NFE 1,2" in first.stdout
    assert json.loads(first.stdout.splitlines()[-1]) == {
        "cells": 3, "finished": 3, "left": 0, "json": str(tmp_path / "results" / "ablations.json")}
    results = tmp_path / "results" / "ablations.json"
    cells = json.loads(results.read_text())["cells"]
    assert [(c["table"], c["value"], c["nfe"], c["run"]) for c in cells] == [
        ("I", 0.0, 1, "fr0_g0.5_c20"), ("I", 0.2, 1, "fr0.2_g0.5_c20"), ("III", 2, 2, "fr0.2_g0.5_c20")]
    for cell in cells:
        assert 0.0 <= cell["success_rate"] <= 1.0 and cell["episodes"] == 1
        assert cell["steps"] == 2 and cell["eval_seed"] == 1000 and cell["lr"] == 1e-3
        assert cell["commit"] and "cores" in cell["machine"]
    table = (tmp_path / "results" / "ablations.md").read_text()
    for heading in ("## Table I:", "## Table II:", "## Table III:", "## Table IV:"):
        assert heading in table
    assert "| 0.2 (default) | " in table and "| 0.5 | not run yet | | | | 2 | see paper |" in table
    assert "| 1 (default) | not run yet | | | | 2 | 49 % |" in table  # III:1 was not asked for
    assert f"{cells[0]['commit']}, {cells[0]['machine']}: I:0, I:0.2, III:2" in table

    # A fresh machine: no runs, no demos; the finished cells come from the JSON, III:1 is I:0.2's measurement.
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(tmp_path / "demos")
    again = _ablations(tmp_path, "--tables", "I:0,0.2", "III:1,2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 cell(s) asked for, 3 finished already (skipped), 1 to do" in again.stdout
    assert "III:1: the same run and NFE as I:0.2 (no training)" in again.stdout
    assert "training" not in again.stdout.replace("(no training)", "")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "demos").exists()
    now = {(c["table"], c["value"]): c for c in json.loads(results.read_text())["cells"]}
    assert set(now) == {("I", 0.0), ("I", 0.2), ("III", 1), ("III", 2)}
    assert {k: v for k, v in now["III", 1].items() if k not in ("table", "value", "parameter")} == \
        {k: v for k, v in now["I", 0.2].items() if k not in ("table", "value", "parameter")}
    # Another training length measures its own cells beside these (longest first), never replacing them.
    longer = _ablations(tmp_path, "--tables", "I:0", "--steps", "3")
    assert longer.returncode == 0, longer.stdout + longer.stderr
    cells = json.loads(results.read_text())["cells"]
    assert [(c["table"], c["value"], c["steps"]) for c in cells if c["table"] == "I"] == [
        ("I", 0.0, 3), ("I", 0.0, 2), ("I", 0.2, 2)]
    assert "| 0.2 (default) | not run yet | | | | 3 | best |" in (tmp_path / "results" / "ablations.md").read_text()
    # The tables are a function of the JSON: regenerating them changes nothing.
    table = (tmp_path / "results" / "ablations.md").read_text()
    assert _ablations(tmp_path, "--report-only").returncode == 0
    assert (tmp_path / "results" / "ablations.md").read_text() == table


def test_a_broken_results_file_is_one_error_before_any_work(tmp_path: Path) -> None:
    results = tmp_path / "results" / "ablations.json"
    results.parent.mkdir()
    for broken in ("{not json", '{"cells": [{"table": "I", "value": 0.2}]}', "[]"):
        results.write_text(broken)
        proc = _ablations(tmp_path, "--tables", "I:0.2")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{results} is not an ablations results file" in lines[0], proc.stderr
        assert results.read_text() == broken  # never silently replaced
    assert not (tmp_path / "runs").exists() and not (tmp_path / "demos").exists()


@pytest.mark.parametrize("tables, message", [
    (["V"], "no table 'V'"),
    (["I:0.3"], "0.3 not in table I's grid (0, 0.2, 0.5, 0.75, 1)"),
    (["IV:many"], "values must be numbers"),
])
def test_bad_table_choices_are_named(tmp_path: Path, tables: list[str], message: str) -> None:
    proc = _ablations(tmp_path, "--tables", *tables)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow  # ~1 min: two trainings started, then stopped
@pytest.mark.timeout(600)
def test_a_signal_saves_the_running_trainings_and_starts_nothing_new(tmp_path: Path) -> None:
    """Started as a background job (SIGINT ignored, as a shell leaves it), the grid still stops on SIGINT: both
    running trainings save a state they resume from, the third run never starts, and a rerun resumes them."""
    argv = [sys.executable, str(SCRIPT), "--demos", str(tmp_path / "demos"), "--demo-episodes", "2", "--runs",
            str(tmp_path / "runs"), "--results", str(tmp_path / "results" / "ablations"), "--steps", "100000",
            "--batch-size", "4", "--episodes", "1", "--tables", "I:0,0.5,1", "--jobs", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    runs = [tmp_path / "runs" / f"{name}_s100000_b4_lr0.001_d2" for name in ("fr0_g0.5_c20", "fr0.5_g0.5_c20")]
    deadline = time.monotonic() + 400
    try:
        while not all((r / "train.log").exists() and "step 10/100000" in (r / "train.log").read_text()
                      for r in runs):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "SIGINT: asking the running steps to save and stop; nothing new starts" in out
    assert "stopped by a signal: 3 cell(s) left" in out
    for run in runs:
        assert "stopped at step" in (run / "train.log").read_text()
        assert 10 <= json.loads((run / "progress.json").read_text())["step"] < 100000
    assert not (tmp_path / "runs" / "fr1_g0.5_c20_s100000_b4_lr0.001_d2").exists()
    assert json.loads((tmp_path / "results" / "ablations.json").read_text())["cells"] == []
    # A rerun continues both from their saved state (and is stopped the same way).
    again = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in again.stdout], daemon=True).start()  # type: ignore[union-attr]
    started = []
    try:
        while len(started) < 2:
            line = lines.get(timeout=max(1.0, deadline + 200 - time.monotonic()))
            if ": training 100000 steps" in line:
                started.append(line)
        again.send_signal(signal.SIGINT)
        again.wait(timeout=120)
    finally:
        if again.poll() is None:
            again.kill()
    assert sorted(line.split(":")[0] for line in started) == ["[ablations] fr0.5_g0.5_c20", "[ablations] fr0_g0.5_c20"]
    assert all("(resumed)" in line for line in started), started
    assert again.returncode == 130
