"""Where a measurement came from: the commit and the machine, written into every results JSON.

Results tables name both, so a number can always be traced back to the code and hardware that produced it.
"""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone


def git_commit(cwd: str | None = None) -> str:
    """The checked-out commit (``+dirty`` when tracked files differ), or ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The CPU this process runs on, in one line, e.g. ``AMD EPYC 7B13, 2 cores, x86_64``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, {platform.machine()}"


def code_commit() -> str:
    """The commit of the checkout this code runs from (its build or install space lies inside it), whatever the
    working directory: an evaluation run from a scratch folder still names its code; ``unknown`` for code that
    lives outside any checkout (a wheel installed elsewhere)."""
    return git_commit(os.path.dirname(os.path.abspath(__file__)))


def provenance() -> dict[str, str]:
    """Commit, machine and UTC time, for the JSON a benchmark or evaluation writes."""
    return {"commit": code_commit(), "machine": machine(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
