"""The one ``main()`` body our nodes share: init, build, spin, an uninterruptible shutdown, config errors as exit 2.

Why the signal handling is ours and not rclpy's: under ``ros2 launch`` a Ctrl-C reaches every node twice (the
terminal's SIGINT to the process group, then launch's own SIGINT; SIGTERM after a timeout). rclpy's handlers shut
the context down asynchronously and the default Python handler raises KeyboardInterrupt wherever the main thread
is, so the second signal used to land inside the cleanup (torque left on, bags without metadata, publishers used
after their context was gone). Here SIGINT and SIGTERM only *record* the request; the spin loop notices it, and
the cleanup then runs to its end with the context still valid, whatever further signals arrive.

rclpy is imported inside the functions so that importing so101_common stays free of rclpy.
"""
from __future__ import annotations

import faulthandler
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# How often the spin loop looks at the recorded signals: rcl's wait does not return on a signal by itself.
POLL_PERIOD_S = 0.1
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A drain ends once no message has been waiting for this long.
DRAIN_QUIET_S = 0.2
# Destroying the node and its DDS participant takes milliseconds; Fast DDS 3.2 can deadlock there (docs/testing.md),
# in C++ with the GIL held, so only faulthandler's own watchdog thread can act: by then the node's cleanup (torque
# off, bags closed) has run, so after this long it prints where the process hangs and ends it (exit code 1).
TEARDOWN_LIMIT_S = 5.0


class ShutdownRequest:
    """SIGINT/SIGTERM handlers that only record the signal: nothing is ever raised into the running code."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def install(self) -> "ShutdownRequest":
        for signum in SHUTDOWN_SIGNALS:
            signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def ignore_from_now_on(self) -> None:
        """For the last steps before exit: Python's finalisation puts a handler of ours back to the default
        (a late signal would then kill the process: exit -2), but it leaves an ignored signal ignored.

        A signal that another thread's C handler caught just before the switch reaches the main thread after it,
        and CPython then prints it as an unraisable ``OSError: Signal N ignored due to race condition`` with a
        traceback (bpo-43406). Ignoring that signal is exactly what was asked for: it is recorded, not printed."""
        previous = sys.unraisablehook

        def drop_ignored_signals(unraisable: Any) -> None:
            signum = _signal_lost_to_race(unraisable.exc_value)
            if signum is None:
                previous(unraisable)
            else:
                self.signals.append(signum)

        sys.unraisablehook = drop_ignored_signals
        for signum in SHUTDOWN_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def describe(self) -> str:
        """'SIGINT', 'SIGINT x2, SIGTERM', ... or 'external shutdown' when no signal came."""
        if not self.signals:
            return "external shutdown"
        counts: dict[str, int] = {}
        for signum in self.signals:
            name = signal.Signals(signum).name
            counts[name] = counts.get(name, 0) + 1
        return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())


def _signal_lost_to_race(exc: BaseException | None) -> int | None:
    """The shutdown signal that CPython reports as 'Signal N ignored due to race condition', else None."""
    if not isinstance(exc, OSError):
        return None
    for signum in SHUTDOWN_SIGNALS:
        if str(exc) == f"Signal {int(signum)} ignored due to race condition":
            return int(signum)
    return None


def init_ros(args: Sequence[str] | None) -> ShutdownRequest:
    """Install the recording handlers, then ``rclpy.init`` without rclpy's own signal handlers."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    request = ShutdownRequest().install()
    rclpy.init(args=None if args is None else list(args), signal_handler_options=SignalHandlerOptions.NO)
    return request


def spin_until_shutdown(executor: Any, request: ShutdownRequest) -> None:
    """Spin until a signal was recorded or the context was shut down from elsewhere."""
    from rclpy.executors import ExternalShutdownException

    context = executor.context
    try:
        while not request.requested and context.ok():
            executor.spin_once(timeout_sec=POLL_PERIOD_S)
    except ExternalShutdownException:
        pass


def drain(executor: Any, quiet_s: float, limit_s: float) -> None:
    """Run the callbacks of messages that arrived before the shutdown request, until none came for ``quiet_s``
    (a spin_once that waited its whole timeout found nothing to do) or ``limit_s`` has passed."""
    deadline = time.monotonic() + limit_s
    while executor.context.ok() and time.monotonic() < deadline:
        started = time.monotonic()
        executor.spin_once(timeout_sec=quiet_s)
        if time.monotonic() - started >= quiet_s:
            return


def spin_node(make_node: Callable[[], Any], name: str, args: Sequence[str] | None = None,
              cleanup: Callable[[Any], str | None] | None = None,
              config_errors: tuple[type[BaseException], ...] = (ValueError,),
              start: Callable[[Any], bool] | None = None,
              fatal_errors: tuple[type[BaseException], ...] = (),
              drain_s: float = 0.0) -> int:
    """Run a node until SIGINT/SIGTERM or an external shutdown; return the process exit code.

    A configuration error raised while building the node prints one line naming it and returns 2, so a launch
    file or a shell sees why the node did not start; one of ``fatal_errors`` (a node's own configuration error
    class) is logged FATAL through the node's logger and also returns 2. ``start`` (optional) runs once before
    spinning; False means the node cannot run (exit 1, after the cleanup). ``cleanup`` runs before the node is
    destroyed, with the context still valid, whatever ended the spin (a callback's exception too); what it
    returns is appended to the node's single shutdown log line. ``drain_s`` > 0 (a recorder): after a shutdown
    request, messages already received are still handled, for at most that long, before the cleanup.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    request = init_ros(args)
    node = None
    code = 0
    try:
        try:
            node = make_node()
        except fatal_errors as exc:
            rclpy.logging.get_logger(name).fatal(str(exc))
            return 2
        except config_errors as exc:
            print(f"{name}: invalid configuration: {exc}", file=sys.stderr, flush=True)
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        if start is not None and not request.requested and not start(node):
            code = 1
        else:
            spin_until_shutdown(executor, request)
            if drain_s > 0.0:
                drain(executor, DRAIN_QUIET_S, drain_s)
        executor.remove_node(node)
        return code
    except BaseException:
        code = 1  # its traceback follows the cleanup below
        raise
    finally:
        if node is not None:
            summary = cleanup(node) if cleanup is not None else None
            reason = request.describe() if code == 0 else "after an error"
            node.get_logger().info(f"shutting down ({reason})" + (f": {summary}" if summary else ""))
        faulthandler.dump_traceback_later(TEARDOWN_LIMIT_S, exit=True)
        if node is not None:
            node.destroy_node()
        # Shutting rclpy down would put the C-level default handlers back (a signal then kills the process: -2),
        # and a mask only holds for this thread, not for the middleware's: the recording handlers are kept through
        # the shutdown (uninstall_handlers=False), and signals stay blocked here until they are ignored.
        signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            rclpy.try_shutdown(uninstall_handlers=False)
        finally:
            faulthandler.cancel_dump_traceback_later()
            request.ignore_from_now_on()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)
