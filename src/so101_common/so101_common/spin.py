"""The one ``main()`` body our nodes share: init, build, spin, clean shutdown, configuration errors as exit 2.

rclpy is imported inside the function so that importing so101_common stays free of rclpy.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any


def spin_node(make_node: Callable[[], Any], name: str, args: Sequence[str] | None = None,
              cleanup: Callable[[Any], None] | None = None,
              config_errors: tuple[type[BaseException], ...] = (ValueError,)) -> int:
    """Run a node until Ctrl-C or an external shutdown; return the process exit code.

    A configuration error raised while building the node prints one line naming it and returns 2, so a
    launch file or a shell sees why the node did not start. ``cleanup`` runs before the node is destroyed,
    whatever ended the spin.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        rclpy.spin(node)
        return 0
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    except config_errors as exc:
        print(f"{name}: invalid configuration: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if node is not None:
            if cleanup is not None:
                cleanup(node)
            node.destroy_node()
        rclpy.try_shutdown()
