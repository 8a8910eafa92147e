"""pytest plugin for node tests over real DDS (loaded with ``-p so101_common.testing``).

Nodes run as separate processes (``python -m <module> --ros-args ...``) exactly as users start them; the test
process talks to them through its own rclpy context. Every process inherits the loopback-only environment. They are
forked from one pre-warmed server per test process (so101_common.forkserver: torch, transformers, MuJoCo already
imported), which saves 3-5 s of imports per node; ``SO101_TEST_FORK_SERVER=0`` starts fresh interpreters instead.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from so101_common.dds import claim_private_domain, loopback_problems, remove_stale_shm
from so101_common.forkserver import ForkServer
from so101_common.process import NodeProcess

DOMAIN_KEY = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    problems = loopback_problems()
    if problems:
        raise pytest.UsageError("refusing to run: DDS is not loopback-only: " + "; ".join(problems)
                                + ". Run the tests through `make test` (it sources build/env.sh).")
    # Before any rclpy context exists: this run (and each xdist worker) gets a domain of its own.
    domain = claim_private_domain()
    config.stash[DOMAIN_KEY] = domain
    # A run started in the background by a non-interactive shell (`nohup make test &`, CI runners) inherits SIGINT
    # ignored, and so would every node it starts in a fresh interpreter: Ctrl-C tests would then see nodes ignore
    # SIGINT where a terminal's would stop. Start from the terminal's disposition.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Tests kill nodes on purpose (SIGKILL, crashes): free the Fast DDS segments they left in /dev/shm (RAM),
    ~0.8 GiB per full run otherwise, kept until reboot."""
    remove_stale_shm()


def pytest_report_header(config: pytest.Config) -> str:
    return f"ROS domain of this run: {config.stash.get(DOMAIN_KEY, '?')} (loopback only)"


def _param_args(params: dict[str, object] | None) -> list[str]:
    args: list[str] = []
    for key, value in (params or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = "[" + ",".join(repr(v) if isinstance(v, str) else str(v) for v in value) + "]"
        args += ["-p", f"{key}:={value}"]
    return args


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer | None]:
    """The pre-warmed server node processes are forked from (None when SO101_TEST_FORK_SERVER=0)."""
    if os.environ.get("SO101_TEST_FORK_SERVER", "1") == "0":
        yield None
        return
    server = ForkServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def node_process(tmp_path: Path, request: pytest.FixtureRequest,
                 fork_server: ForkServer | None) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: ``node_process("pkg.module" or "path/script.py", params={...}, extra_args=[...])`` -> NodeProcess.

    ``discovery=False`` runs the node with ROS_AUTOMATIC_DISCOVERY_RANGE=OFF, for a node expected to fail its
    configuration: it needs no peers, and a participant that discovers none stays out of Fast DDS 3.2's discovery
    races (docs/testing.md: a node starting while its peers exit can deadlock before its first line).

    Every process started is stopped (SIGINT, then SIGKILL) after the test; its log is printed if the test failed.
    """
    started: list[NodeProcess] = []

    def start(module: str, params: dict[str, object] | None = None, extra_args: list[str] | None = None,
              name: str | None = None, stdin_pipe: bool = False, discovery: bool = True) -> NodeProcess:
        args = [*(extra_args or []), "--ros-args", *_param_args(params)]
        if name:
            args += ["-r", f"__node:={name}"]
        stem = Path(module).stem if module.endswith(".py") else module.rsplit(".", 1)[-1]
        env = None if discovery else {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "OFF"}
        proc = NodeProcess(module, args, tmp_path / f"{stem}-{len(started)}.log", stdin_pipe, fork_server, env)
        started.append(proc)
        return proc

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for proc in started:
        proc.stop()
        if failed:
            sys.stderr.write(f"\n----- {proc.log_path.name} -----\n{proc.output()[-4000:]}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def ros_node(request: pytest.FixtureRequest):
    """An rclpy node in the test process, with its own context, spun by ``spin_until``."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(f"test_{abs(hash(request.node.nodeid)) % 10**8}", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    node.executor_for_test = executor  # type: ignore[attr-defined]  # spin_until finds the executor here
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def spin_until(node, predicate: Callable[[], bool], timeout: float, period: float = 0.02) -> bool:
    """Spin the node's test executor until ``predicate()`` is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        node.executor_for_test.spin_once(timeout_sec=period)
    return predicate()


def wait_until_answering(node, client, harmless_request, timeout: float, attempt_s: float = 1.0) -> bool:
    """Call ``client`` with a request that changes nothing until one answer comes back.

    A client's ``service_is_ready()`` only says that *its* side has matched the server. Fast DDS's server waits just
    100 ms for its reply writer to match the client's reply reader and otherwise drops the reply ("client will not
    receive response"), so on a loaded machine the first, fast answer of a just-started node can be lost. One answered
    round trip proves both directions are matched before a call that must not be repeated.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not spin_until(node, client.service_is_ready, deadline - time.monotonic()):
            return False
        future = client.call_async(harmless_request)
        if spin_until(node, future.done, min(attempt_s, max(deadline - time.monotonic(), 0.0))):
            return True
        client.remove_pending_request(future)
    return False
