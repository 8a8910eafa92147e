"""ROS messages of the sim's state, shared by the demo writer (serialised into bags) and the sim node (published).

Message construction only: this module imports ROS message types and no rclpy node machinery.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from so101_common.graph import JOINT_NAMES
from so101_common.images import rgb_to_image
from so101_common.stamps import NS_PER_S


def _stamp(msg_header, stamp_ns: int) -> None:
    msg_header.stamp.sec = int(stamp_ns // NS_PER_S)
    msg_header.stamp.nanosec = int(stamp_ns % NS_PER_S)


def camera_frame(camera: str) -> str:
    return f"{camera}_camera"


def joint_state_msg(stamp_ns: int, position: np.ndarray, velocity: np.ndarray, effort: np.ndarray) -> JointState:
    """All six joints in JOINT_NAMES order, radians and rad/s (REP 103)."""
    msg = JointState()
    _stamp(msg.header, stamp_ns)
    msg.name = list(JOINT_NAMES)
    msg.position = [float(v) for v in position]
    msg.velocity = [float(v) for v in velocity]
    msg.effort = [float(v) for v in effort]
    return msg


def image_msg(stamp_ns: int, camera: str, rgb: np.ndarray) -> Image:
    return rgb_to_image(rgb, stamp_ns=stamp_ns, frame_id=camera_frame(camera))


def trajectory_msg(stamp_ns: int, times_from_start: Sequence[float] | np.ndarray,
                   positions: np.ndarray) -> JointTrajectory:
    """A trajectory for all six joints; ``positions`` is (points, 6)."""
    msg = JointTrajectory()
    _stamp(msg.header, stamp_ns)
    msg.joint_names = list(JOINT_NAMES)
    for t, q in zip(times_from_start, positions):
        point = JointTrajectoryPoint()
        point.positions = [float(v) for v in q]
        ns = int(round(float(t) * NS_PER_S))
        point.time_from_start.sec = ns // NS_PER_S
        point.time_from_start.nanosec = ns % NS_PER_S
        msg.points.append(point)
    return msg


def trajectory_arrays(msg: JointTrajectory) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(joint names, times_from_start (N,), positions (N, J)) of a JointTrajectory; ValueError names the flaw."""
    names = list(msg.joint_names)
    if not msg.points:
        raise ValueError("trajectory has no points")
    times, rows = [], []
    for i, point in enumerate(msg.points):
        if len(point.positions) != len(names):
            raise ValueError(f"point {i} has {len(point.positions)} positions for {len(names)} joint names")
        times.append(point.time_from_start.sec + point.time_from_start.nanosec / NS_PER_S)
        rows.append(list(point.positions))
    return names, np.asarray(times, dtype=np.float64), np.asarray(rows, dtype=np.float64)
