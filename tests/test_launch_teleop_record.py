"""teleop_record.launch.py with hardware:=mock and test-pattern cameras, in a ROS 2 distro.

teleop:=joycon: Joy messages from this test drive the arm through the teleop node, and one episode is recorded
through the recorder's services. teleop:=leader: an emulated leader-arm bus (pty) in this process is mirrored onto
the mock arm. Needs launch_pytest, joy, ros2_control (a distro or docker/); skipped in the pip environment.
"""
from __future__ import annotations

import pytest

launch_pytest = pytest.importorskip("launch_pytest", reason="launch_pytest needs a ROS 2 distro")

from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
import numpy as np  # noqa: E402
from rosbags.rosbag2 import Reader  # noqa: E402
from sensor_msgs.msg import Image, JointState, Joy  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from so101_common.episode_bag import read_episode_metadata  # noqa: E402
from so101_common.graph import (JOINT_NAMES, JOINT_STATES_TOPIC, JOY_TOPIC, RECORDED_TOPICS,  # noqa: E402
                                START_EPISODE_SERVICE, STOP_EPISODE_SERVICE, TRAJECTORY_TOPIC, camera_image_topic)
from so101_common.testing import spin_until  # noqa: E402
from so101_hardware.calibration import ArmCalibration  # noqa: E402
from so101_hardware.emulator import BusEmulator  # noqa: E402
from so101_interfaces.srv import StartEpisode  # noqa: E402
from so101_teleop.leader import Mirror, MirrorSettings  # noqa: E402
from so101_teleop.teleop import JoyMapping  # noqa: E402

# A launch that fails to start must fail this test in minutes, not at the suite's timeout.
pytestmark = pytest.mark.timeout(240)


@launch_pytest.fixture
def teleop_record_mock(tmp_path) -> LaunchDescription:
    from ament_index_python.packages import get_package_share_directory

    launch_file = f"{get_package_share_directory('so101_bringup')}/launch/teleop_record.launch.py"
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file), launch_arguments={
            "hardware": "mock", "wrist_camera": "test_pattern", "top_camera": "test_pattern",
            "output_dir": str(tmp_path / "demos"), "instruction": "launch test"}.items()),
        launch_pytest.actions.ReadyToTest(),
    ])


def _call(node, srv_type, name, request):
    client = node.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=60.0), f"{name} not available"
    future = client.call_async(request)
    assert spin_until(node, future.done, 10.0)
    return future.result()


@pytest.mark.launch(fixture=teleop_record_mock)
def test_teleop_record_with_mock_hardware(ros_node) -> None:
    images = {camera_image_topic(c): [] for c in ("wrist", "top")}
    for topic, store in images.items():
        ros_node.create_subscription(Image, topic, store.append, 10)
    states: list[JointState] = []
    ros_node.create_subscription(JointState, JOINT_STATES_TOPIC, states.append, 10)
    assert spin_until(ros_node, lambda: all(len(s) > 10 for s in images.values()) and states, 60.0)
    assert all((s[-1].width, s[-1].height, s[-1].encoding) == (640, 480, "rgb8") for s in images.values())

    started = _call(ros_node, StartEpisode, START_EPISODE_SERVICE, StartEpisode.Request(instruction="launch test"))
    assert started.success, started.message
    mapping = JoyMapping()
    joy_pub = ros_node.create_publisher(Joy, JOY_TOPIC, 10)
    # Joy published before the teleop node's subscription is matched would be lost.
    assert spin_until(ros_node, lambda: joy_pub.get_subscription_count() > 0, 30.0), "teleop node not subscribed"
    first = dict(zip(states[-1].name, states[-1].position))["shoulder_pan"]
    for _ in range(60):  # 2 s of "deadman + stick left" at 30 Hz
        joy_pub.publish(Joy(axes=[1.0, 0.0], buttons=[int(i == mapping.button_deadman) for i in range(11)]))
        spin_until(ros_node, lambda: False, 1 / 30)
    moved = dict(zip(states[-1].name, states[-1].position))["shoulder_pan"] - first
    assert moved > 0.3, f"shoulder_pan moved {moved:.3f} rad"
    stopped = _call(ros_node, Trigger, STOP_EPISODE_SERVICE, Trigger.Request())
    assert stopped.success, stopped.message
    with Reader(started.episode_path) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert all(counts.get(t, 0) > 0 for t in RECORDED_TOPICS), counts
    assert counts[TRAJECTORY_TOPIC] > 30
    assert read_episode_metadata(started.episode_path).instruction == "launch test"


@pytest.fixture
def leader_bus():
    with BusEmulator() as emulator:
        yield emulator


@launch_pytest.fixture
def teleop_record_leader(tmp_path, leader_bus) -> LaunchDescription:
    from ament_index_python.packages import get_package_share_directory

    launch_file = f"{get_package_share_directory('so101_bringup')}/launch/teleop_record.launch.py"
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file), launch_arguments={
            "hardware": "mock", "cameras": "false", "teleop": "leader", "leader_port": leader_bus.port_name,
            "output_dir": str(tmp_path / "demos"), "instruction": "leader launch test"}.items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.mark.launch(fixture=teleop_record_leader)
def test_teleop_record_with_a_leader_arm(ros_node, leader_bus) -> None:
    states: list[JointState] = []
    ros_node.create_subscription(JointState, JOINT_STATES_TOPIC, states.append, 10)
    assert spin_until(ros_node, lambda: len(states) > 5, 60.0)
    started = _call(ros_node, StartEpisode, START_EPISODE_SERVICE,
                    StartEpisode.Request(instruction="leader launch test"))
    assert started.success, started.message
    cal = ArmCalibration.default()  # leader_calibration:= empty: the leader node uses the same default
    pose = np.array([0.3, -0.4, 0.5, 0.2, 0.1, 0.6])
    for motor, ticks in zip(cal.motors.values(), cal.to_ticks(pose)):
        leader_bus.set_shaft(motor.id, ticks)
    wanted = Mirror(MirrorSettings()).map(cal.to_radians(cal.to_ticks(pose)))

    def mirrored() -> bool:
        by_name = dict(zip(states[-1].name, states[-1].position))
        return np.allclose([by_name[n] for n in JOINT_NAMES], wanted, atol=0.02)

    assert spin_until(ros_node, mirrored, 60.0), (states[-1], wanted)
    stopped = _call(ros_node, Trigger, STOP_EPISODE_SERVICE, Trigger.Request())
    assert stopped.success, stopped.message
    with Reader(started.episode_path) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts[TRAJECTORY_TOPIC] > 30, counts
