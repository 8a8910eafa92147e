"""A node forked from the test fork server behaves as `python -u <script>` would: output, exit code, signals,
environment, stdin, atexit, its own session."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from so101_common.forkserver import ForkServer
from so101_common.process import NodeProcess


@pytest.fixture(scope="module")
def server():
    server = ForkServer(preload=("json", "no_such_module_anywhere"))
    yield server
    server.close()


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "node.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def run_both(tmp_path: Path, server: ForkServer, body: str, args: list[str] | None = None,
             stop: int | None = None) -> tuple[tuple[int, str], tuple[int, str]]:
    """(exit code, output) of the script in a fresh interpreter and forked from the server."""
    results = []
    for k, launcher in enumerate((None, server)):
        proc = NodeProcess(script(tmp_path, body), args or [], tmp_path / f"run{k}.log", launcher=launcher)
        if stop is not None:
            assert _wait_for(lambda p=proc: "ready" in p.output()), proc.output()
            proc.send(stop)
        results.append((proc.wait(20), proc.output()))
    return results[0], results[1]


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_preload_skips_what_is_not_installed(server):
    assert server.preloaded == ["json"]


def test_output_exit_code_argv_and_atexit_match_a_fresh_interpreter(tmp_path, server):
    body = """
        import atexit, sys
        atexit.register(lambda: print("atexit ran"))
        print("args", sys.argv[1:], __name__)
        print("to stderr", file=sys.stderr)
        sys.exit(3)
    """
    fresh, forked = run_both(tmp_path, server, body, ["-p", "x:=1"])
    assert fresh == forked
    assert forked[0] == 3
    assert "args ['-p', 'x:=1'] __main__" in forked[1] and "to stderr" in forked[1] and "atexit ran" in forked[1]


def test_an_exception_exits_1_with_its_traceback(tmp_path, server):
    fresh, forked = run_both(tmp_path, server, "raise ValueError('bad parameter')\n")
    assert fresh[0] == forked[0] == 1
    assert "ValueError: bad parameter" in forked[1]


def test_an_unhandled_sigint_kills_it_as_sigint_and_a_handled_one_exits_cleanly(tmp_path, server):
    unhandled = "import time\nprint('ready', flush=True)\ntime.sleep(30)\n"
    fresh, forked = run_both(tmp_path, server, unhandled, stop=signal.SIGINT)
    assert fresh[0] == forked[0] == -signal.SIGINT
    assert "KeyboardInterrupt" in forked[1]
    handled = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print('ready', flush=True)
        time.sleep(30)
    """
    fresh, forked = run_both(tmp_path, server, handled, stop=signal.SIGTERM)
    assert fresh[0] == forked[0] == 0


def test_environment_working_directory_session_and_stdin_are_the_callers(tmp_path, server, monkeypatch):
    monkeypatch.setenv("SO101_FORK_TEST", "from the test")
    monkeypatch.chdir(tmp_path)
    body = """
        import os, sys
        print("env", os.environ.get("SO101_FORK_TEST"), "cwd", os.getcwd())
        print("own session", os.getsid(0) == os.getpid())
        print("read", sys.stdin.readline().strip(), flush=True)
    """
    proc = NodeProcess(script(tmp_path, body), [], tmp_path / "io.log", stdin_pipe=True, launcher=server)
    proc.type("typed line\n")
    assert proc.wait(20) == 0, proc.output()
    out = proc.output()
    assert f"env from the test cwd {tmp_path}" in out
    assert "own session True" in out and "read typed line" in out


def test_a_module_runs_as_python_m_and_a_killed_child_reports_the_signal(tmp_path, server):
    proc = NodeProcess("json.tool", ["--help"], tmp_path / "module.log", launcher=server)
    assert proc.wait(20) == 0 and "usage" in proc.output()
    sleeper = NodeProcess(script(tmp_path, "import time\ntime.sleep(30)\n"), [], tmp_path / "kill.log",
                          launcher=server)
    sleeper.proc.send_signal(signal.SIGKILL)
    assert sleeper.wait(20) == -signal.SIGKILL
    slow = NodeProcess(script(tmp_path, "import time\ntime.sleep(30)\n"), [], tmp_path / "slow.log",
                       launcher=server)
    with pytest.raises(subprocess.TimeoutExpired):
        slow.proc.wait(0.2)
    assert slow.stop(signal.SIGTERM) == -signal.SIGTERM


def test_children_still_running_are_killed_when_the_server_ends(tmp_path):
    server = ForkServer(preload=())
    proc = NodeProcess(script(tmp_path, "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"), [],
                       tmp_path / "orphan.log", launcher=server)
    assert _wait_for(lambda: "ready" in proc.output())
    pid = proc.proc.pid
    server.close()
    assert _wait_for(lambda: not _alive(pid), 10.0), "the server left a node running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_changed_pythonpath_starts_a_fresh_interpreter(tmp_path, server, monkeypatch):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "only_here.py").write_text("WHERE = 'extra'\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(extra), os.environ.get("PYTHONPATH")])))
    assert not server.serves(os.environ)
    proc = NodeProcess(script(tmp_path, "import only_here\nprint(only_here.WHERE)\n"), [], tmp_path / "pp.log",
                       launcher=server)
    assert proc.wait(20) == 0 and "extra" in proc.output()
    assert isinstance(proc.proc, subprocess.Popen)


def test_the_test_suites_server_runs_no_thread_but_openblas_pool(fork_server):
    """A child inherits the locks of the server's threads but not the threads: a preloaded module that starts one
    (rclpy's LTTng-UST listeners did) makes rare children crash or hang. OpenBLAS's pool, which numpy starts and
    which parks itself at fork, is the only one allowed."""
    if fork_server is None:
        pytest.skip("SO101_TEST_FORK_SERVER=0: no fork server in this run")
    fresh = subprocess.run([sys.executable, "-c", "import os, numpy; print(len(os.listdir('/proc/self/task')))"],
                           capture_output=True, text=True, check=True)
    assert "numpy" in fork_server.preloaded and fork_server.threads == int(fresh.stdout), fork_server.preloaded
