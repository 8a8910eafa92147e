"""robot.launch.py with hardware:=mock in a ROS 2 distro: /joint_states arrives and a trajectory moves the joints.

Needs launch_pytest, ros2_control and ros2_controllers (a distro or docker/); skipped in the pip environment.
"""
from __future__ import annotations

import numpy as np
import pytest

launch_pytest = pytest.importorskip("launch_pytest", reason="launch_pytest needs a ROS 2 distro")

from builtin_interfaces.msg import Duration  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC  # noqa: E402
from so101_common.testing import spin_until  # noqa: E402

# A launch that fails to start must fail this test in minutes, not at the suite's timeout.
pytestmark = pytest.mark.timeout(240)


@launch_pytest.fixture
def robot_mock() -> LaunchDescription:
    from ament_index_python.packages import get_package_share_directory

    launch_file = f"{get_package_share_directory('so101_bringup')}/launch/robot.launch.py"
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file),
                                 launch_arguments={"hardware": "mock"}.items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.mark.launch(fixture=robot_mock)
def test_mock_hardware_follows_a_trajectory(ros_node) -> None:
    states: list[JointState] = []
    ros_node.create_subscription(JointState, JOINT_STATES_TOPIC, states.append, 10)
    assert spin_until(ros_node, lambda: len(states) > 0, 60.0), "no /joint_states from joint_state_broadcaster"
    assert set(states[-1].name) == set(JOINT_NAMES)
    pub = ros_node.create_publisher(JointTrajectory, TRAJECTORY_TOPIC, 10)
    assert spin_until(ros_node, lambda: pub.get_subscription_count() > 0, 60.0), "arm_controller not running"
    target = [0.3, -0.5, 0.6, 0.2, -0.4, 0.5]
    pub.publish(JointTrajectory(joint_names=list(JOINT_NAMES), points=[
        JointTrajectoryPoint(positions=target, time_from_start=Duration(sec=1))]))

    def reached() -> bool:
        last = dict(zip(states[-1].name, states[-1].position))
        return np.allclose([last[n] for n in JOINT_NAMES], target, atol=0.01)

    assert spin_until(ros_node, reached, 10.0), f"mock joints at {states[-1].position}"
