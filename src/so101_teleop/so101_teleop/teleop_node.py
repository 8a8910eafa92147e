"""Joy-Con teleop node: sensor_msgs/Joy + /joint_states in, JointTrajectory jog targets out at a fixed rate.

Each tick publishes one point (all six joints) ``horizon_s`` ahead while the deadman button is held and Joy
messages keep coming; on release or Joy silence it publishes one hold and goes quiet. Episode buttons call
the recorder's services (start_episode with the ``instruction`` parameter).
"""
from __future__ import annotations

import sys
from dataclasses import fields

from builtin_interfaces.msg import Duration
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from sensor_msgs.msg import JointState, Joy
from so101_common.graph import (
    JOINT_NAMES,
    JOINT_STATES_TOPIC,
    JOY_TOPIC,
    TRAJECTORY_TOPIC,
)
from so101_common.spin import spin_node
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from so101_common.kinematics import EE_FRAME, ArmKinematics
from so101_teleop.episode_client import EpisodeClient
from so101_teleop.kinematics import default_urdf_path
from so101_teleop.teleop import Event, JoyError, JoyMapping, TeleopCore, TeleopSettings

MAPPING_HELP = {
    "axis_x": "Joy axis index of the stick's horizontal axis",
    "axis_y": "Joy axis index of the stick's vertical axis",
    "invert_x": "negate the horizontal axis (joy_node reports left as positive)",
    "invert_y": "negate the vertical axis (joy_node reports up as positive)",
    "deadzone": "stick values below this magnitude count as zero",
    "button_deadman": "button to hold for any motion",
    "button_shift": "held in Cartesian mode: stick y moves up/down, stick x rolls the wrist",
    "button_mode": "toggles joint / Cartesian jog",
    "button_joint_group": "selects the next pair of joints in joint mode",
    "button_gripper_open": "opens the gripper while held",
    "button_gripper_close": "closes the gripper while held",
    "button_home": "drives to the home pose (with the deadman held)",
    "button_start_episode": "calls start_episode with the instruction parameter (-1: disabled)",
    "button_stop_episode": "calls stop_episode (-1: disabled)",
    "button_discard_episode": "calls discard_episode (-1: disabled)",
}
SETTINGS_HELP = {
    "joy_timeout_s": "no Joy message for this long -> stop",
    "joint_speed": "joint jog speed at full stick (rad/s)",
    "cartesian_speed": "end-effector jog speed at full stick (m/s)",
    "roll_speed": "wrist roll speed in Cartesian mode (rad/s)",
    "gripper_speed": "gripper open/close speed (rad/s)",
    "home_speed": "per-joint speed towards the home pose (rad/s)",
    "damping": "damping of the least-squares IK (m)",
    "max_dt": "largest time step one tick may integrate (s)",
}


class TeleopNode(Node):
    def __init__(self) -> None:
        super().__init__("teleop")

        def declare(name: str, default, description: str):
            return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

        mapping = JoyMapping(**{f.name: declare(f.name, f.default, MAPPING_HELP[f.name])
                                for f in fields(JoyMapping)})
        settings = TeleopSettings(**{f.name: float(declare(f.name, float(f.default), SETTINGS_HELP[f.name]))
                                     for f in fields(TeleopSettings)})
        rate_hz = float(declare("rate_hz", 30.0, "rate of published jog targets (Hz)"))
        self.horizon_s = float(declare("horizon_s", 0.1, "time_from_start of each published target (s)"))
        urdf_path = str(declare("urdf_path", "", "URDF or xacro of the arm (empty: the project's "
                                                "urdf/so101.urdf.xacro)"))
        ee_frame = str(declare("ee_frame", EE_FRAME, "end-effector frame of the Cartesian jog"))
        self.instruction = str(declare("instruction", "", "instruction sent with start_episode"))
        if rate_hz <= 0 or self.horizon_s <= 0:
            raise ValueError(f"rate_hz ({rate_hz}) and horizon_s ({self.horizon_s}) must be > 0")

        path = urdf_path or str(default_urdf_path())
        self.core = TeleopCore(mapping, settings, ArmKinematics.from_file(path, ee_frame))
        self.bad_messages = 0
        self.traj_pub = self.create_publisher(JointTrajectory, TRAJECTORY_TOPIC, 10)
        self.create_subscription(Joy, JOY_TOPIC, self._on_joy, 10)
        self.create_subscription(JointState, JOINT_STATES_TOPIC, self._on_joint_states, 10)
        self.episodes = EpisodeClient(self)
        self.create_timer(1.0 / rate_hz, self._tick)
        self.get_logger().info(f"teleop ready: URDF {path}, {rate_hz:g} Hz, horizon {self.horizon_s:g} s, "
                               f"deadman button {mapping.button_deadman}")

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _bad(self, what: str, exc: Exception) -> None:
        self.bad_messages += 1
        self.get_logger().warn(f"ignored {what} #{self.bad_messages}: {exc}", throttle_duration_sec=2.0)

    def _on_joint_states(self, msg: JointState) -> None:
        try:
            self.core.on_joint_states(msg.name, msg.position)
        except ValueError as exc:
            self._bad("joint state", exc)

    def _on_joy(self, msg: Joy) -> None:
        try:
            events = self.core.on_joy(self._now(), msg.axes, msg.buttons)
        except JoyError as exc:
            self._bad("Joy message", exc)
            return
        for event in events:
            self._handle(event)

    def _handle(self, event: Event) -> None:
        if event is Event.MODE:
            self.get_logger().info(f"jog mode: {self.core.mode.value}")
        elif event is Event.JOINT_GROUP:
            self.get_logger().info(f"joint group {self.core.group}")
        elif event is Event.HOME:
            self.get_logger().info("homing (hold the deadman)")
        elif event is Event.START_EPISODE:
            self.episodes.start(self.instruction)
        elif event is Event.STOP_EPISODE:
            self.episodes.stop()
        elif event is Event.DISCARD_EPISODE:
            self.episodes.discard()


    def _tick(self) -> None:
        target = self.core.step(self._now())
        if target is None:
            return
        point = JointTrajectoryPoint()
        point.positions = target.tolist()
        seconds = int(self.horizon_s)
        point.time_from_start = Duration(sec=seconds, nanosec=int(round((self.horizon_s - seconds) * 1e9)))
        msg = JointTrajectory()
        msg.joint_names = list(JOINT_NAMES)
        msg.points = [point]
        self.traj_pub.publish(msg)


def main(args: list[str] | None = None) -> None:
    sys.exit(spin_node(TeleopNode, "teleop_node", args))


if __name__ == "__main__":
    main()
