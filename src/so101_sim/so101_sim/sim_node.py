"""sim_node: the simulated SO-101 on the ROS graph, standing in for the robot.

Publishes both camera topics (+ camera_info), /joint_states and the task-success flag; executes
JointTrajectory messages from the arm controller's topic like joint_trajectory_controller (interpolated, a new
message replaces the running trajectory) through the TrajectoryFollower shared with the hardware driver;
serves a reset service (episode from the ``seed`` parameter, which then advances by one) and publishes the task's
partial-credit score. The ``task`` parameter can be set while running (an operator switching tasks between
episodes): it is validated at once, and the new task's scene is built at the next reset. With
``hardware_topics`` it is instead the hardware behind ros2_control's topic-based interface (position
commands in, joint states out on the so101_hw topics), so a distro's controller_manager drives it.
Simulated time advances one control period per timer tick (real time when the CPU keeps up).
"""
from __future__ import annotations

import math
import sys

from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image, JointState
from so101_common.graph import (
    CAMERA_NAMES,
    HW_COMMANDS_TOPIC,
    HW_STATES_TOPIC,
    JOINT_NAMES,
    JOINT_STATES_TOPIC,
    SIM_NODE,
    SIM_RESET_SERVICE,
    SIM_TASK_SCORE_TOPIC,
    SIM_TASK_SUCCESS_TOPIC,
    TRAJECTORY_TOPIC,
    camera_image_topic,
    camera_info_topic,
)
from so101_common.images import stamp_to_ns
from so101_common.spin import spin_node
from so101_common.trajectory import TrajectoryError
from std_msgs.msg import Bool, Float32
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from so101_sim.env import SimEnv
from so101_common.stamps import NS_PER_S
from so101_sim.messages import (
    camera_frame,
    image_msg,
    joint_state_msg,
    trajectory_arrays,
)
from so101_sim.scene import SceneConfig
from so101_sim.tasks import TASKS


def _describe(text: str) -> ParameterDescriptor:
    return ParameterDescriptor(description=text)


class SimNode(Node):
    """Steps a SimEnv on a timer and connects it to the graph's topics and services."""

    def __init__(self) -> None:
        super().__init__(SIM_NODE)
        self.declare_parameter("task", "pick_place", _describe(
            f"task to simulate, one of {sorted(TASKS)}; may be set while running: a new task's scene is built and "
            f"takes effect at the next {SIM_RESET_SERVICE}"))
        self.declare_parameter("seed", 0, _describe("seed of the next reset (the startup episode uses it too); "
                                                    "advances by one after every reset"))
        self.declare_parameter("image_size", 128, _describe("camera images are image_size x image_size pixels"))
        self.declare_parameter("fps", 30.0, _describe("control rate (Hz): physics advances 1/fps per tick and "
                                                      "/joint_states is published each tick"))
        self.declare_parameter("camera_rate", 30.0, _describe("camera publish rate (Hz), at most fps"))
        self.declare_parameter("hardware_topics", False,
                               _describe(f"be ros2_control's topic-based hardware: take position commands on "
                                         f"{HW_COMMANDS_TOPIC} and publish states on {HW_STATES_TOPIC} instead of "
                                         f"following {TRAJECTORY_TOPIC} and publishing {JOINT_STATES_TOPIC}"))
        task = self.get_parameter("task").value
        size = int(self.get_parameter("image_size").value)
        fps = float(self.get_parameter("fps").value)
        camera_rate = float(self.get_parameter("camera_rate").value)
        if task not in TASKS:
            raise ValueError(f"parameter task={task!r} is not a registered task {sorted(TASKS)}")
        if not 0 < camera_rate <= fps:
            raise ValueError(f"parameter camera_rate={camera_rate} must be in (0, fps={fps}]")
        self.scene_cfg = SceneConfig(image_height=size, image_width=size, fps=fps)
        self.env = SimEnv(self.scene_cfg, task=task)
        self.camera_every = max(1, round(fps / camera_rate))
        self.rejected = 0
        self._ros_minus_sim_ns = 0

        self.pub_success = self.create_publisher(Bool, SIM_TASK_SUCCESS_TOPIC, 10)
        self.pub_score = self.create_publisher(Float32, SIM_TASK_SCORE_TOPIC, 10)
        self.pub_images = {c: self.create_publisher(Image, camera_image_topic(c), 5) for c in CAMERA_NAMES}
        self.pub_info = {c: self.create_publisher(CameraInfo, camera_info_topic(c), 5) for c in CAMERA_NAMES}
        self.create_service(Trigger, SIM_RESET_SERVICE, self._on_reset)
        self.hardware_topics = bool(self.get_parameter("hardware_topics").value)
        if self.hardware_topics:
            # ros2_control owns /joint_states (joint_state_broadcaster) and the trajectory topic (the
            # arm controller); the sim is then only its hardware, behind the topic-based interface.
            self.pub_joints = self.create_publisher(JointState, HW_STATES_TOPIC, 10)
            self.create_subscription(JointState, HW_COMMANDS_TOPIC, self._on_hw_command, 10)
            inputs = f"position commands from {HW_COMMANDS_TOPIC}, states on {HW_STATES_TOPIC}"
        else:
            self.pub_joints = self.create_publisher(JointState, JOINT_STATES_TOPIC, 10)
            self.create_subscription(JointTrajectory, TRAJECTORY_TOPIC, self._on_trajectory, 10)
            inputs = f"trajectories from {TRAJECTORY_TOPIC}, states on {JOINT_STATES_TOPIC}"
        self._reset_episode()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_timer(1.0 / fps, self._tick)
        self.get_logger().info(
            f"sim ready: task {task!r}, {fps:g} Hz control, cameras {list(CAMERA_NAMES)} {size}x{size} at "
            f"{fps / self.camera_every:g} Hz, {inputs}, reset on {SIM_RESET_SERVICE}")

    # -- time ---------------------------------------------------------------------------------------------
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _sim_time_of(self, stamp_ns: int) -> float:
        return (stamp_ns - self._ros_minus_sim_ns) / NS_PER_S

    # -- callbacks ----------------------------------------------------------------------------------------
    def _on_trajectory(self, msg: JointTrajectory) -> None:
        try:
            names, times, positions = trajectory_arrays(msg)
            stamp = stamp_to_ns(msg.header.stamp)
            start = None if stamp == 0 else self._sim_time_of(stamp)
            self.env.set_trajectory(names, times, positions, start_time=start)
        except (ValueError, TrajectoryError) as exc:
            self.rejected += 1
            self.get_logger().warning(f"rejected trajectory #{self.rejected}: {exc}")

    def _on_hw_command(self, msg: JointState) -> None:
        try:
            if len(msg.position) != len(msg.name):
                raise ValueError(f"{len(msg.position)} positions for {len(msg.name)} joint names")
            unknown = [n for n in msg.name if n not in JOINT_NAMES]
            if unknown:
                raise ValueError(f"unknown joints {unknown}")
            target = self.env.commanded()
            for name, value in zip(msg.name, msg.position):
                target[JOINT_NAMES.index(name)] = value
            self.env.hold(target)
        except ValueError as exc:
            self.rejected += 1
            self.get_logger().warning(f"rejected hardware command #{self.rejected}: {exc}")

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Refuse an unknown task at once (the node keeps its current one); a known one waits for the reset."""
        for param in params:
            if param.name != "task":
                continue
            if param.value not in TASKS:
                reason = f"task={param.value!r} is not a registered task; registered tasks: {sorted(TASKS)}"
                self.get_logger().warning(f"refused parameter {reason}")
                return SetParametersResult(successful=False, reason=reason)
            if param.value != self.env.task.name:
                self.get_logger().info(f"task {param.value!r} set: its scene is built at the next "
                                       f"{SIM_RESET_SERVICE} (until then {self.env.task.name!r} runs)")
        return SetParametersResult(successful=True)

    def _switch_task(self) -> str | None:
        """Build the ``task`` parameter's scene if it is not the running one; returns the task it replaced."""
        task = str(self.get_parameter("task").value)
        old = self.env
        if task == old.task.name:
            return None
        self.env = SimEnv(self.scene_cfg, task=task)
        old.close()
        return old.task.name

    def _reset_episode(self) -> int:
        seed = int(self.get_parameter("seed").value)
        self.env.reset(seed)
        self.set_parameters([Parameter("seed", value=seed + 1)])
        self._ros_minus_sim_ns = self._now_ns()
        self._publish(self._now_ns())
        return seed

    def _on_reset(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            replaced = self._switch_task()
            seed = self._reset_episode()
        except ValueError as exc:
            response.success, response.message = False, f"reset failed: {exc}"
            self.get_logger().error(response.message)
            return response
        response.success = True
        response.message = f"reset to seed {seed} ({self.env.task.name}: {self.env.task.instruction})"
        if replaced is not None:
            response.message += f"; task switched from {replaced!r}: new scene built"
        self.get_logger().info(response.message)
        return response

    def _tick(self) -> None:
        self.env.step()
        now = self._now_ns()
        # Keep the ROS<->sim clock map current, so stamped trajectories start where the sender meant.
        self._ros_minus_sim_ns = now - int(round(self.env.time * NS_PER_S))
        self._publish(now)

    # -- output -------------------------------------------------------------------------------------------
    def _publish(self, stamp_ns: int) -> None:
        env = self.env
        effort = env.data.actuator_force[env.scene.actuator]
        state = joint_state_msg(stamp_ns, env.joint_positions(), env.joint_velocities(), effort)
        self.pub_joints.publish(state)
        self.pub_success.publish(Bool(data=env.success()))
        self.pub_score.publish(Float32(data=float(env.score())))
        if env.steps % self.camera_every == 0:
            for camera, rgb in env.render().items():
                img = image_msg(stamp_ns, camera, rgb)
                self.pub_images[camera].publish(img)
                self.pub_info[camera].publish(self._camera_info(camera, img))

    def _camera_info(self, camera: str, img: Image) -> CameraInfo:
        """Pinhole intrinsics from the MuJoCo camera's vertical field of view (no distortion)."""
        fovy = math.radians(float(self.env.model.cam_fovy[self.env.scene.cameras[camera]]))
        h, w = img.height, img.width
        f = (h / 2.0) / math.tan(fovy / 2.0)
        info = CameraInfo()
        info.header = img.header
        info.header.frame_id = camera_frame(camera)
        info.height, info.width = h, w
        info.distortion_model = "plumb_bob"
        info.d = [0.0] * 5
        info.k = [f, 0.0, w / 2.0, 0.0, f, h / 2.0, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [f, 0.0, w / 2.0, 0.0, 0.0, f, h / 2.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        return info

    def destroy_node(self) -> None:
        self.env.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return spin_node(SimNode, "sim_node", args)


if __name__ == "__main__":
    sys.exit(main())
