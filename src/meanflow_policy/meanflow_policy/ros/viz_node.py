"""ROS 2 node ``so101_viz``: the live stack in Rerun: both cameras, joint states, every commanded chunk drawn at
the future times its points are due, and the policy's chunk timing, on the receive-time timeline.

Thin: each subscription hands its message to meanflow_policy.viz.rerun_log.StackLog (the mapping ``so101-viz``
uses for bags). The recording streams to a viewer started here (``spawn``), to a viewer elsewhere
(``connect_url``) and/or into an .rrd file (``save_path``); at shutdown what was logged is flushed and the file
closed. Image and joint-state subscriptions are best effort (a slow viewer drops frames, never delays a
publisher); chunks and timing reports are reliable, like their publishers.

    ros2 run meanflow_policy viz_node                                   # a viewer on this machine's screen
    ros2 run meanflow_policy viz_node --ros-args -p spawn:=false -p save_path:=run.rrd
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rcl_interfaces.msg import IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterValueException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory

from meanflow_policy.viz.rerun_log import StackLog, open_stream
from so101_common import graph
from so101_common.spin import spin_node
from so101_interfaces.msg import ChunkTiming

SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
COMMAND_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)


class VizNode(Node):
    def __init__(self) -> None:
        super().__init__(graph.VIZ_NODE)

        def declare(name: str, default: Any, description: str, **ranges: Any) -> Any:
            descriptor = ParameterDescriptor(description=description, read_only=True, **ranges)
            return self.declare_parameter(name, default, descriptor).value

        spawn = declare("spawn", True, "Start a Rerun viewer on this machine's screen (or use the one already "
                        "listening on the default port 9876) and stream to it.")
        connect_url = declare("connect_url", "", "Also stream to the viewer at this gRPC URL, e.g. "
                              "rerun+http://HOST:9876/proxy (empty: none).")
        save_path = declare("save_path", "", "Also write the recording to this .rrd file (empty: none); open it "
                            "later with `rerun FILE.rrd`.")
        jpeg_quality = declare("jpeg_quality", 85, "JPEG quality of the logged camera images (0: raw pixels).",
                               integer_range=[IntegerRange(from_value=0, to_value=100, step=1)])
        save = Path(save_path).expanduser() if save_path else None
        self.stack = StackLog(open_stream("so101 live", save, bool(spawn), str(connect_url)),
                              int(jpeg_quality))
        for camera in graph.CAMERA_NAMES:
            self._subscribe(Image, graph.camera_image_topic(camera), SENSOR_QOS,
                            lambda t, msg, camera=camera: self.stack.on_image(camera, t, msg))
        self._subscribe(JointState, graph.JOINT_STATES_TOPIC, SENSOR_QOS, self.stack.on_joint_state)
        self._subscribe(JointTrajectory, graph.TRAJECTORY_TOPIC, COMMAND_QOS, self.stack.on_trajectory)
        self._subscribe(ChunkTiming, graph.POLICY_TIMING_TOPIC, COMMAND_QOS, self.stack.on_timing)
        sinks = [s for s, on in (("a viewer", spawn), (str(connect_url), connect_url), (str(save), save)) if on]
        self.get_logger().info(f"streaming the live stack to {', '.join(sinks)}")

    def _subscribe(self, msg_type: type, topic: str, qos: QoSProfile, handle: Callable[[int, Any], None]) -> None:
        def on_message(msg: Any) -> None:
            try:
                handle(self.get_clock().now().nanoseconds, msg)
            except ValueError as exc:
                self.get_logger().warning(f"not shown: a message on {topic}: {exc}", throttle_duration_sec=5.0)

        self.create_subscription(msg_type, topic, on_message, qos)

    def close(self) -> str:
        """Flush the recording and close its sinks; the summary for the shutdown line."""
        problem = self.stack.close()
        done = f"logged {self.stack.counts.describe()}"
        return done + (f"; not everything reached the viewer: {problem}" if problem else "")


def main(args: list[str] | None = None) -> None:
    sys.exit(spin_node(VizNode, graph.VIZ_NODE, args, cleanup=VizNode.close,
                       config_errors=(ValueError, InvalidParameterValueException)))


if __name__ == "__main__":
    main()
