"""The robot side of the policy node, over DDS: fake sensors publishing like the robot, and a probe that collects
the node's trajectories, timings and diagnostics and calls its services (used by the node benchmark and tests)."""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from rclpy.time import Time
from sensor_msgs.msg import Image, JointState
from std_srvs.srv import SetBool
from trajectory_msgs.msg import JointTrajectory

from so101_common import graph
from so101_common.images import rgb_to_image
from so101_common.joints import home_vector
from so101_interfaces.msg import ChunkTiming
from so101_interfaces.srv import SetInstruction

from so101_common.stamps import s_to_ns

CAMERA_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)


class FakeSensors:
    """Publishes camera images and joint states the way the robot does, from an existing rclpy node.

    The images are built once (a gradient per camera); only their stamps change, so publishing costs no more
    than the DDS write. Shared by the node benchmark and the node tests.
    """

    def __init__(self, node: Node, height: int = 480, width: int = 640,
                 cameras: Sequence[str] = graph.CAMERA_NAMES, joint_topic: str = graph.JOINT_STATES_TOPIC) -> None:
        self.node = node
        self._images: dict[str, Image] = {}
        self._image_pubs = {}
        for i, camera in enumerate(cameras):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
            rgb[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
            rgb[..., 2] = 60 * i
            self._images[camera] = rgb_to_image(rgb, frame_id=f"{camera}_camera")
            self._image_pubs[camera] = node.create_publisher(Image, graph.camera_image_topic(camera), CAMERA_QOS)
        self._joint_pub = node.create_publisher(JointState, joint_topic, 10)
        self.positions = home_vector()

    def publish_images(self, stamp_ns: int | None = None) -> int:
        """Publish one frame per camera, all with the same stamp (default: now); returns that stamp."""
        stamp_ns = time.time_ns() if stamp_ns is None else int(stamp_ns)
        for camera, msg in self._images.items():
            msg.header.stamp = Time(nanoseconds=stamp_ns).to_msg()
            self._image_pubs[camera].publish(msg)
        return stamp_ns

    def publish_image_message(self, camera: str, msg: Image) -> None:
        """Publish a caller-made image (e.g. a malformed one) on a camera's topic."""
        self._image_pubs[camera].publish(msg)

    def publish_joints(self, stamp_ns: int | None = None) -> None:
        msg = JointState()
        stamp_ns = time.time_ns() if stamp_ns is None else int(stamp_ns)
        msg.header.stamp = Time(nanoseconds=stamp_ns).to_msg()
        msg.name = list(graph.JOINT_NAMES)
        msg.position = [float(v) for v in self.positions]
        self._joint_pub.publish(msg)


class PolicyProbe:
    """The robot side of the policy node over DDS: fake sensors, the node's outputs collected, its services.

    Streams run on timers of ``node``; whoever spins that node (the benchmark, a test's ``spin_until``) drives
    them. ``image_stamp_offset_s`` shifts image stamps into the past to simulate a delayed camera.
    """

    def __init__(self, node: Node, height: int = 480, width: int = 640) -> None:
        self.node = node
        self.sensors = FakeSensors(node, height, width)
        self.image_stamp_offset_s = 0.0
        self.images_on = True
        self.trajectories: list[tuple[JointTrajectory, int]] = []  # (message, receipt time ns)
        self.timings: list[ChunkTiming] = []
        self.diagnostics: list[DiagnosticStatus] = []
        node.create_subscription(JointTrajectory, graph.TRAJECTORY_TOPIC,
                                 lambda m: self.trajectories.append((m, time.time_ns())), 10)
        node.create_subscription(ChunkTiming, graph.POLICY_TIMING_TOPIC, self.timings.append, 10)
        node.create_subscription(DiagnosticArray, graph.DIAGNOSTICS_TOPIC, self._on_diagnostics, 10)
        self.instruction_client = node.create_client(SetInstruction, graph.SET_INSTRUCTION_SERVICE)
        self.enable_client = node.create_client(SetBool, graph.POLICY_ENABLE_SERVICE)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        self.diagnostics += [s for s in msg.status if s.name.startswith(graph.POLICY_NODE)]

    def start_streams(self, image_hz: float, joint_hz: float | None = 30.0) -> None:
        """Publish images at ``image_hz`` and joint states at ``joint_hz`` (None: the robot publishes them)."""
        if joint_hz:
            self.node.create_timer(1.0 / joint_hz, self.sensors.publish_joints)
        self.node.create_timer(1.0 / image_hz, self._publish_images)

    def _publish_images(self) -> None:
        if self.images_on:
            stamp = time.time_ns() - s_to_ns(self.image_stamp_offset_s)
            self.sensors.publish_images(stamp)

    def set_instruction(self, text: str) -> Future:
        return self.instruction_client.call_async(SetInstruction.Request(instruction=text))

    def enable(self, on: bool) -> Future:
        return self.enable_client.call_async(SetBool.Request(data=on))
