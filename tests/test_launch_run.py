"""``run.launch.py`` with mock hardware: the policy node comes up with the robot and sends a 20-point chunk.

Needs a ROS 2 distro (launch, launch_ros, launch_pytest, ros2_control); in the pip environment it is skipped.
Mock hardware has no cameras, so this test publishes the images; joint states come from the robot launch.
"""
import pytest

launch_pytest = pytest.importorskip(
    "launch_pytest", reason="launch_pytest is only available in a ROS 2 distro (not in the pip environment)")

import rclpy  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from launch_pytest.actions import ReadyToTest  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402

from meanflow_policy.ros.probe import PolicyProbe  # noqa: E402
from so101_common import graph  # noqa: E402
from so101_common.testing import spin_until  # noqa: E402

# A launch that fails to start must fail this test in minutes, not at the suite's timeout.
pytestmark = [pytest.mark.launch, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from meanflow_policy.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("launch") / "tiny", seed=0)


@launch_pytest.fixture
def run_launch(checkpoint):
    from ament_index_python.packages import get_package_share_directory

    path = f"{get_package_share_directory('so101_bringup')}/launch/run.launch.py"
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(path), launch_arguments={
            "checkpoint": str(checkpoint), "nfe": "1", "hardware": "mock",
            "instruction": "pick up the cube"}.items()),
        ReadyToTest(),
    ])


@pytest.mark.launch(fixture=run_launch)
def test_run_launch_publishes_a_chunk():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("test_run_launch", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    node.executor_for_test = executor
    try:
        probe = PolicyProbe(node, height=48, width=64)
        probe.start_streams(image_hz=15.0, joint_hz=None)
        # The timing message follows its trajectory: wait for both, not for the first trajectory alone.
        def chunk_and_timing() -> bool:
            return any(len(m.points) == 20 for m, _ in probe.trajectories) and bool(probe.timings)

        assert spin_until(node, chunk_and_timing, 120.0), (
            f"{len(probe.trajectories)} trajectories, {len(probe.timings)} timing messages in 120 s")
        msg = next(m for m, _ in probe.trajectories if len(m.points) == 20)
        assert tuple(msg.joint_names) == graph.JOINT_NAMES
        assert probe.timings[-1].nfe == 1
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
