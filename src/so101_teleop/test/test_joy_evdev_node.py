"""The evdev Joy node over DDS driving the Joy-Con teleop node, as in the pip environment (no joy_node): the recorded
session (see test_joy_evdev) is replayed by the node; the teleop node jogs on it with the shipped button map."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sensor_msgs.msg import JointState, Joy
from trajectory_msgs.msg import JointTrajectory

from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, JOY_TOPIC, TRAJECTORY_TOPIC
from so101_common.joints import home_vector
from so101_common.testing import spin_until

ROOT = Path(__file__).resolve().parents[3]
SESSION = Path(__file__).parent / "data" / "joycon_right_session.evtest"
CONFIG = ROOT / "config" / "teleop_joycon.yaml"


def test_replayed_joycon_session_jogs_the_arm_through_the_teleop_node(node_process, ros_node) -> None:
    teleop = node_process("so101_teleop.teleop_node", params={"joint_speed": 2.0},
                          extra_args=["--ros-args", "--params-file", str(CONFIG)])
    states = ros_node.create_publisher(JointState, JOINT_STATES_TOPIC, 10)
    targets: list[np.ndarray] = []
    ros_node.create_subscription(JointTrajectory, TRAJECTORY_TOPIC,
                                 lambda m: targets.append(np.array(m.points[0].positions)), 100)
    home = JointState(name=list(JOINT_NAMES), position=home_vector().tolist())
    # The teleop node hears the arm before the session plays: it jogs from the measured state.
    assert spin_until(ros_node, lambda: states.get_subscription_count() > 0, 30.0), teleop.output()
    joys: list[Joy] = []
    ros_node.create_subscription(Joy, JOY_TOPIC, joys.append, 100)
    # Two subscribers (the teleop node and this test) are matched before the replay starts, so neither misses it.
    joy = node_process("so101_teleop.joy_evdev_node", params={"replay_file": str(SESSION), "replay_subscribers": 2})

    def replayed() -> bool:
        states.publish(home)
        return "replay finished" in joy.output() and len(joys) > 5

    assert spin_until(ros_node, replayed, 30.0), joy.output() + teleop.output()
    spin_until(ros_node, lambda: "start_episode" in teleop.output(), 5.0)
    assert all(len(m.axes) == 2 and len(m.buttons) == 11 and m.header.frame_id == "joy" for m in joys)
    assert targets, teleop.output()
    moved = targets[-1] - home_vector()
    assert moved[0] > 0.5, moved  # R held + stick left for ~1 s at 2 rad/s: shoulder_pan up (joint group 0)
    assert np.allclose(moved[2:], 0.0)
    # The + press of the session reached the teleop node as its start-episode button (no recorder runs here).
    assert "start_episode: the episode recorder is not running" in teleop.output()
    count = len(joys)
    spin_until(ros_node, lambda: False, 0.5)
    assert len(joys) > count  # autorepeat keeps the state coming after the last event (joy_node's 20 Hz)
    assert joy.alive() and joy.stop() == 0


def test_missing_device_is_reported_and_bad_parameters_exit_2(node_process, ros_node) -> None:
    missing = node_process("so101_teleop.joy_evdev_node", params={"device": "/dev/input/event_missing"})
    assert spin_until(ros_node, lambda: "input device /dev/input/event_missing: No such file" in missing.output(),
                      15.0), missing.output()
    assert missing.alive()
    bad = node_process("so101_teleop.joy_evdev_node", params={"deadzone": 1.5}, discovery=False)
    assert bad.wait(20.0) == 2
    lines = [line for line in bad.output().splitlines() if line.strip()]
    assert lines == ["joy_evdev_node: invalid configuration: parameter deadzone must be in [0, 1), got 1.5"]
