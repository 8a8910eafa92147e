"""Nodes started as their own processes (what a launch file does in a distro), for tests, benchmarks and demos."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from so101_common.forkserver import ForkedProcess, ForkServer


class NodeProcess:
    """A node started as its own process (a fresh interpreter, or forked from ``launcher``, a pre-warmed fork
    server, as the test suite does, where it serves this environment); its output goes to a log file."""

    def __init__(self, module: str, args: list[str], log_path: Path, stdin_pipe: bool = False,
                 launcher: ForkServer | None = None, env: Mapping[str, str] | None = None) -> None:
        self.log_path = log_path
        target = [module] if module.endswith(".py") else ["-m", module]
        child_env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | ForkedProcess
        if launcher is not None and launcher.serves(child_env):
            self._log = None
            self.proc = launcher.spawn(target, args, log_path, stdin_pipe, env=child_env)
            return
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-u", *target, *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
                                     stdin=subprocess.PIPE if stdin_pipe else None)

    def type(self, text: str) -> None:
        """Write to the node's stdin (started with ``stdin_pipe=True``), as keys typed in its terminal."""
        if self.proc.stdin is None:
            raise RuntimeError("type() needs a node started with stdin_pipe=True")
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def output(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, *signals: int, gap_s: float = 0.0) -> None:
        """Send signals one after another, ``gap_s`` apart, as ``ros2 launch`` does on Ctrl-C (the terminal's
        SIGINT to the process group, then launch's own SIGINT, later SIGTERM)."""
        for k, sig in enumerate(signals):
            if k and gap_s:
                time.sleep(gap_s)
            if self.proc.poll() is None:
                self.proc.send_signal(sig)

    def send_until_exit(self, sig: int, period_s: float, limit: int = 500) -> int:
        """Keep signalling every ``period_s`` until the node exits (at most ``limit`` signals): some signals
        then surely land inside its cleanup. Returns how many were sent."""
        sent = 0
        while sent < limit and self.proc.poll() is None:
            self.proc.send_signal(sig)
            sent += 1
            time.sleep(period_s)
        return sent

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Signal the node and wait for it to exit; return its exit code."""
        self.send(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the node to exit (SIGKILL to its process group after ``timeout``); return its exit code."""
        code = self.proc.poll()
        if code is None:
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self._log is not None and not self._log.closed:
            self._log.close()
        return code
