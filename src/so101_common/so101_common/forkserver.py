"""Node processes forked from a pre-warmed server, for the test suite.

A policy-node test spends most of its time starting Python: importing torch and transformers costs 3-5 s per
process on the 2-core CI machine, and the suite starts about a hundred node processes. A ``ForkServer`` imports
the heavy third-party modules once, in a clean single-threaded process, and forks a child per node: each child then
runs ``python -m <module> <args>`` exactly as a fresh interpreter would (``runpy``, its own session, its output to a
log file, its own environment and working directory, exit code or signal as Popen reports them, atexit handlers run).
Nothing of ours is preloaded, so every node still imports and runs our code afresh. rclpy is not preloaded either:
loading it loads LTTng-UST, whose two listener threads start with the library, and a child forked from a process
with threads inherits their locks but not the threads (LTTng asks forking programs to preload its fork wrapper).
Each child imports rclpy itself (about 20 ms) and is its own DDS participant; ``threads`` reports the server's
native threads so that a test keeps it free of any but OpenBLAS's pool (which parks itself at fork). What the
interpreter fixes at its start (sys.path from PYTHONPATH) is the server's: ``serves(env)`` says whether a child would
see the same, else the caller starts a fresh interpreter.

The server speaks JSON lines on its stdin/stdout: ``spawn`` (returns the pid), ``poll`` (waitpid without blocking)
and end of input (it kills the process groups it started that still run, then exits).
"""
from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, cast

# What every node of this workspace imports first and what costs the most to import; ours is never preloaded.
# None of these may start a thread when imported (see the module docstring).
DEFAULT_PRELOAD = ("numpy", "torch", "transformers", "transformers.models.smolvlm.modeling_smolvlm",
                   "safetensors.torch", "mujoco")


class ForkedProcess:
    """The part of ``subprocess.Popen``'s interface that NodeProcess and the tests use, for a forked child."""

    def __init__(self, server: ForkServer, pid: int, args: list[str], stdin: IO[bytes] | None) -> None:
        self._server = server
        self.pid = pid
        self.args = args
        self.stdin = stdin
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.poll(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]  # set by poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class ForkServer:
    """A server process with ``preload`` imported; ``spawn`` forks a node from it."""

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "so101_common.forkserver", *preload],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ.copy())
        self._pythonpath = os.environ.get("PYTHONPATH")
        self._to = cast(IO[bytes], self._proc.stdin)
        self._from = cast(IO[bytes], self._proc.stdout)
        self._lock = threading.Lock()
        ready = self._request(None)
        self.preloaded: list[str] = ready["preloaded"]
        self.threads: int = ready["threads"]  # native threads of the server once preloaded

    def _request(self, message: Mapping[str, Any] | None) -> dict[str, Any]:
        with self._lock:
            if message is not None:
                self._to.write((json.dumps(message) + "\n").encode())
                self._to.flush()
            line = self._from.readline()
        if not line:
            raise RuntimeError(f"the fork server (pid {self._proc.pid}) ended: exit code {self._proc.poll()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fork server: {reply['error']}")
        return reply

    def serves(self, env: Mapping[str, str]) -> bool:
        """Whether a child started with ``env`` imports from the same sys.path as a fresh interpreter would."""
        return env.get("PYTHONPATH") == self._pythonpath

    def spawn(self, target: list[str], args: list[str], log_path: Path, stdin_pipe: bool = False,
              env: Mapping[str, str] | None = None, cwd: Path | None = None) -> ForkedProcess:
        """Run ``python <target> <args>`` (target ``["-m", module]`` or ``[script.py]``) as a forked child."""
        log_path.write_bytes(b"")  # exists from the start, as with Popen (a test may read it before the child runs)
        fifo = None
        if stdin_pipe:
            fifo = log_path.with_suffix(".stdin")
            os.mkfifo(fifo)
        reply = self._request({"op": "spawn", "target": target, "args": args, "log": str(log_path),
                               "stdin": str(fifo) if fifo else None, "env": dict(env or os.environ),
                               "cwd": str(cwd or Path.cwd())})
        # The child opens the FIFO for reading; this open returns once it has.
        stdin = open(fifo, "wb") if fifo else None  # noqa: SIM115  # closed by NodeProcess.wait
        return ForkedProcess(self, reply["pid"], [*target, *args], stdin)

    def poll(self, pid: int) -> int | None:
        code = self._request({"op": "poll", "pid": pid})["returncode"]
        return None if code is None else int(code)

    def close(self) -> None:
        """End the server (it kills the children still running)."""
        if self._proc.poll() is None:
            self._to.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._from.close()


# ---- the server side ------------------------------------------------------------------------------------------
def _run_child(request: Mapping[str, Any]) -> None:
    """In the forked child: become ``python <target> <args>`` and never return."""
    code = 1
    try:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        stdin = os.open(request["stdin"] or os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        # as `python -u`: every write reaches the log at once
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        target, args = request["target"], request["args"]
        try:
            if target[0] == "-m":
                sys.argv = [target[1], *args]
                runpy.run_module(target[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [target[0], *args]
                sys.path[0] = str(Path(target[0]).resolve().parent)
                runpy.run_path(target[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            # as the interpreter does: the traceback, then death by SIGINT
            traceback.print_exc()
            _shutdown()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            traceback.print_exc()
            code = 1
        _shutdown()
    finally:
        os._exit(code)


def _shutdown() -> None:
    """What a normal interpreter exit does before the process ends: join threads, run atexit, flush."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own exit step
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def _serve(preload: Sequence[str]) -> None:
    reply = sys.stdout.buffer
    preloaded = []
    for name in preload:
        try:
            importlib.import_module(name)
            preloaded.append(name)
        except ImportError:
            pass

    def send(message: Mapping[str, Any]) -> None:
        reply.write((json.dumps(message) + "\n").encode())
        reply.flush()

    send({"preloaded": preloaded, "threads": len(os.listdir("/proc/self/task"))})
    children: set[int] = set()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            if request["op"] == "spawn":
                pid = os.fork()
                if pid == 0:
                    _run_child(request)
                children.add(pid)
                send({"pid": pid})
            elif request["op"] == "poll":
                pid = int(request["pid"])
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    send({"returncode": None})
                else:
                    children.discard(pid)
                    send({"returncode": os.waitstatus_to_exitcode(status)})
            else:
                send({"error": f"unknown op {request['op']!r}"})
        except OSError as exc:
            send({"error": f"{request.get('op')}: {exc}"})
    for pid in children:  # the test process is gone: leave no node behind
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


if __name__ == "__main__":
    _serve(sys.argv[1:])
