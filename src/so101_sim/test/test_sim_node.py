"""The sim node over real DDS: a separate process, driven through its topics and services."""
from __future__ import annotations

import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, Float32
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from so101_common.graph import (CAMERA_NAMES, GRIPPER_JOINT_NAME, HW_COMMANDS_TOPIC, HW_STATES_TOPIC, JOINT_NAMES,
                                JOINT_STATES_TOPIC, SIM_NODE, SIM_RESET_SERVICE, SIM_TASK_SCORE_TOPIC,
                                SIM_TASK_SUCCESS_TOPIC, TRAJECTORY_TOPIC, camera_image_topic, camera_info_topic)
from so101_common.images import image_to_rgb
from so101_common.joints import home_vector
from so101_common.testing import spin_until

MODULE = "so101_sim.sim_node"
SIZE = 64


def _trajectory(names, times, positions) -> JointTrajectory:
    msg = JointTrajectory()
    msg.joint_names = list(names)
    for t, q in zip(times, positions):
        p = JointTrajectoryPoint()
        p.positions = [float(v) for v in q]
        p.time_from_start.sec = int(t)
        p.time_from_start.nanosec = int(round((t - int(t)) * 1e9))
        msg.points.append(p)
    return msg


@pytest.fixture
def sim(node_process, ros_node):
    proc = node_process(MODULE, params={"image_size": SIZE, "seed": 3})
    got: dict[str, list] = {"joints": [], "success": [], **{c: [] for c in CAMERA_NAMES},
                            **{f"info_{c}": [] for c in CAMERA_NAMES}}
    ros_node.create_subscription(JointState, JOINT_STATES_TOPIC, got["joints"].append, 50)
    ros_node.create_subscription(Bool, SIM_TASK_SUCCESS_TOPIC, got["success"].append, 10)
    for c in CAMERA_NAMES:
        ros_node.create_subscription(Image, camera_image_topic(c), got[c].append, 5)
        ros_node.create_subscription(CameraInfo, camera_info_topic(c), got[f"info_{c}"].append, 5)
    pub = ros_node.create_publisher(JointTrajectory, TRAJECTORY_TOPIC, 10)
    ready = spin_until(ros_node, lambda: len(got["joints"]) > 5 and all(got[c] for c in CAMERA_NAMES)
                       and pub.get_subscription_count() > 0, timeout=40)
    assert ready, f"sim node did not come up:\n{proc.output()}"
    return proc, got, pub


def _latest(got) -> np.ndarray:
    msg = got["joints"][-1]
    return np.array([msg.position[list(msg.name).index(n)] for n in JOINT_NAMES])


def test_publishes_state_cameras_and_success(sim):
    proc, got, _ = sim
    msg = got["joints"][-1]
    assert list(msg.name) == list(JOINT_NAMES)
    np.testing.assert_allclose(_latest(got), home_vector(), atol=0.05)
    for c in CAMERA_NAMES:
        rgb = image_to_rgb(got[c][-1])
        assert rgb.shape == (SIZE, SIZE, 3) and got[c][-1].encoding == "rgb8"
        assert rgb.std() > 5, f"{c} image is flat"
        info = got[f"info_{c}"][-1]
        assert (info.width, info.height) == (SIZE, SIZE) and info.k[0] > 0
    assert got["success"] and got["success"][-1].data is False
    assert proc.alive()


def test_executes_20_point_trajectory(sim, ros_node):
    proc, got, pub = sim
    start = _latest(got)
    goal = start + np.array([0.4, 0.3, -0.3, -0.2, 0.5, 0.6])
    times = np.arange(1, 21) / 30.0
    points = start + (goal - start) * (times / times[-1])[:, None]
    got["joints"].clear()
    pub.publish(_trajectory(JOINT_NAMES, times, points))
    # Halfway through the 0.67 s trajectory the arm must be between start and goal, not at either end.
    assert spin_until(ros_node, lambda: len(got["joints"]) >= 10, timeout=10)
    mid = _latest(got)
    assert np.all(np.abs(mid - start) > 0.02) and np.all(np.abs(goal - mid) > 0.02), (start, mid, goal)
    spin_until(ros_node, lambda: len(got["joints"]) >= 60, timeout=15)
    np.testing.assert_allclose(_latest(got), goal, atol=0.03)
    assert proc.alive()


def test_bad_trajectories_are_rejected_and_node_survives(sim, ros_node):
    proc, got, pub = sim
    start = _latest(got)
    pub.publish(_trajectory([JOINT_NAMES[0], "no_such_joint"], [0.5], [[0.3, 0.3]]))
    pub.publish(_trajectory(JOINT_NAMES, [0.5, 0.2], [start, start]))  # times not increasing
    pub.publish(_trajectory(JOINT_NAMES, [0.3], [[float("nan")] * 6]))
    got["joints"].clear()
    spin_until(ros_node, lambda: len(got["joints"]) >= 20, timeout=10)
    np.testing.assert_allclose(_latest(got), start, atol=0.02)
    goal = start.copy()
    goal[0] += 0.3
    pub.publish(_trajectory([JOINT_NAMES[0]], [0.3], [[goal[0]]]))  # only one joint named
    got["joints"].clear()
    spin_until(ros_node, lambda: len(got["joints"]) >= 40, timeout=10)
    np.testing.assert_allclose(_latest(got), goal, atol=0.03)
    assert proc.alive()
    out = proc.output()
    assert "no_such_joint" in out and "strictly increasing" in out and "NaN" in out


def test_reset_service_returns_arm_home_and_advances_seed(sim, ros_node):
    proc, got, pub = sim
    start = _latest(got)
    goal = start.copy()
    goal[0] += 0.5
    pub.publish(_trajectory(JOINT_NAMES, [0.3], [goal]))
    got["joints"].clear()
    spin_until(ros_node, lambda: len(got["joints"]) >= 30, timeout=10)
    assert abs(_latest(got)[0] - goal[0]) < 0.05
    client = ros_node.create_client(Trigger, SIM_RESET_SERVICE)
    assert client.wait_for_service(timeout_sec=10)
    replies = []
    for _ in range(2):
        future = client.call_async(Trigger.Request())
        assert spin_until(ros_node, future.done, timeout=10)
        replies.append(future.result())
    assert all(r.success for r in replies)
    # Startup used seed 3, so the two resets use seeds 4 and 5.
    assert "seed 4" in replies[0].message and "seed 5" in replies[1].message
    got["joints"].clear()
    spin_until(ros_node, lambda: len(got["joints"]) >= 5, timeout=10)
    np.testing.assert_allclose(_latest(got), home_vector(), atol=0.05)


def test_hardware_topics_for_ros2_control(node_process, ros_node):
    proc = node_process(MODULE, params={"image_size": 32, "camera_rate": 5.0, "hardware_topics": True})
    states: list[JointState] = []
    ros_node.create_subscription(JointState, HW_STATES_TOPIC, states.append, 50)
    pub = ros_node.create_publisher(JointState, HW_COMMANDS_TOPIC, 10)
    assert spin_until(ros_node, lambda: len(states) > 3 and pub.get_subscription_count() > 0, timeout=40), \
        proc.output()
    elbow = 2
    target = home_vector()
    target[elbow] += 0.4
    cmd = JointState()
    cmd.name = [JOINT_NAMES[elbow]]
    cmd.position = [float(target[elbow])]
    pub.publish(cmd)
    bad = JointState()
    bad.name = [JOINT_NAMES[elbow], GRIPPER_JOINT_NAME]
    bad.position = [0.1]
    pub.publish(bad)
    states.clear()
    spin_until(ros_node, lambda: len(states) >= 45, timeout=10)
    last = states[-1]
    np.testing.assert_allclose([last.position[list(last.name).index(n)] for n in JOINT_NAMES], target, atol=0.03)
    assert proc.alive() and "1 positions for 2 joint names" in proc.output()
    # ros2_control owns /joint_states and the trajectory topic in this mode.
    assert ros_node.count_publishers(JOINT_STATES_TOPIC) == 0
    assert ros_node.count_subscribers(TRAJECTORY_TOPIC) == 0


def test_bad_parameter_stops_the_node_with_a_clear_error(node_process):
    proc = node_process(MODULE, params={"camera_rate": 0.0}, discovery=False)
    proc.proc.wait(timeout=30)
    assert proc.proc.returncode == 2
    assert "camera_rate=0.0 must be in (0, fps=30.0]" in proc.output()


def test_runs_a_paper_task_and_names_its_instruction_on_reset(node_process, ros_node):
    proc = node_process(MODULE, params={"image_size": 32, "camera_rate": 5.0, "task": "sorting_swapped",
                                        "seed": 7})
    success: list[Bool] = []
    top: list[Image] = []
    ros_node.create_subscription(Bool, SIM_TASK_SUCCESS_TOPIC, success.append, 10)
    ros_node.create_subscription(Image, camera_image_topic("top"), top.append, 5)
    assert spin_until(ros_node, lambda: success and top, timeout=40), proc.output()
    client = ros_node.create_client(Trigger, SIM_RESET_SERVICE)
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(Trigger.Request())
    assert spin_until(ros_node, future.done, timeout=10)
    reply = future.result()
    assert reply.success and "seed 8" in reply.message
    assert "sorting_swapped: put the green cube in the left box and the red cube in the right box" in reply.message
    assert success[-1].data is False
    # The sorting scene: both cubes in the top camera's view.
    rgb = image_to_rgb(top[-1]).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert ((r > 100) & (r > 2 * g) & (r > 2 * b)).sum() >= 2 and ((g > 100) & (g > 2 * r) & (g > 2 * b)).sum() >= 2


def test_unknown_task_stops_the_node_with_a_clear_error(node_process):
    proc = node_process(MODULE, params={"task": "stack"}, discovery=False)
    proc.proc.wait(timeout=30)
    assert proc.proc.returncode == 2
    assert "parameter task='stack' is not a registered task" in proc.output()


def _colour_masks(msg: Image) -> dict[str, np.ndarray]:
    """Pixels of the red cube and of the orange toy (not the arm's yellow) in one camera image."""
    r, g, b = (image_to_rgb(msg)[..., i].astype(int) for i in range(3))
    # The cube's shades keep green = blue; the toy's darker shades are red too, but with green well above blue.
    return {"red_cube": (r > 100) & (r > 2 * g) & (np.abs(g - b) < 20),
            "toy": (r > 150) & (g > 0.3 * r) & (g < 0.7 * r) & (b < 0.5 * g)}


def _set_task(ros_node, client: AsyncParameterClient, value: str):
    future = client.set_parameters([Parameter("task", value=value)])
    assert spin_until(ros_node, future.done, timeout=10)
    return future.result().results[0]


def _reset(ros_node, client) -> Trigger.Response:
    future = client.call_async(Trigger.Request())
    assert spin_until(ros_node, future.done, timeout=30)
    return future.result()


def test_task_switches_at_run_time_at_the_next_reset(node_process, ros_node):
    """An operator changes the task between episodes: an unknown name is refused with the registered ones and
    the node keeps its task; a known one is built at the next reset, which says so, and the cameras and the
    score topic then show that task."""
    proc = node_process(MODULE, params={"image_size": 64, "camera_rate": 10.0, "seed": 1})
    top: list[Image] = []
    score: list[Float32] = []
    ros_node.create_subscription(Image, camera_image_topic("top"), top.append, 5)
    ros_node.create_subscription(Float32, SIM_TASK_SCORE_TOPIC, score.append, 10)
    params = AsyncParameterClient(ros_node, SIM_NODE)
    reset = ros_node.create_client(Trigger, SIM_RESET_SERVICE)
    assert spin_until(ros_node, lambda: top and score, timeout=40), proc.output()
    assert params.wait_for_services(timeout_sec=10) and reset.wait_for_service(timeout_sec=10)
    assert score[-1].data == 0.0
    assert _colour_masks(top[-1])["red_cube"].sum() >= 4 and _colour_masks(top[-1])["toy"].sum() == 0

    refused = _set_task(ros_node, params, "stack")
    assert not refused.successful
    assert "task='stack' is not a registered task" in refused.reason and "'stacking'" in refused.reason
    reply = _reset(ros_node, reset)
    assert reply.success and "(pick_place:" in reply.message and "switched" not in reply.message
    assert proc.alive()

    assert _set_task(ros_node, params, "stacking").successful
    # Not before the reset: the running episode keeps its scene.
    top.clear()
    assert spin_until(ros_node, lambda: len(top) >= 3, timeout=10)
    assert _colour_masks(top[-1])["red_cube"].sum() >= 4
    reply = _reset(ros_node, reset)
    assert reply.success, reply.message
    assert "(stacking: put the orange toy on the coloured blocks)" in reply.message
    assert "task switched from 'pick_place'" in reply.message
    top.clear()
    score.clear()
    assert spin_until(ros_node, lambda: len(top) >= 3 and score, timeout=20)
    masks = _colour_masks(top[-1])
    assert masks["toy"].sum() >= 4 and masks["red_cube"].sum() == 0
    assert score[-1].data == 0.0
    assert proc.alive()
    out = proc.output()
    assert "refused parameter task='stack'" in out and "task switched from 'pick_place'" in out
