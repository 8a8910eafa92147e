"""The teleop node as its own process over DDS: synthetic Joy + JointState in, JointTrajectory targets out."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from sensor_msgs.msg import JointState, Joy
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from so101_common.graph import (DISCARD_EPISODE_SERVICE, JOINT_NAMES, JOINT_STATES_TOPIC, JOY_TOPIC,
                                START_EPISODE_SERVICE, STOP_EPISODE_SERVICE, TRAJECTORY_TOPIC)
from so101_common.joints import JointLimits, home_vector
from so101_common.testing import spin_until
from so101_common.kinematics import ArmKinematics
from so101_teleop.kinematics import default_urdf_path
from so101_teleop.teleop import JoyMapping

M = JoyMapping()
# The shipped Joy-Con config, and private topic names (remapped in the node): other processes on this DDS domain may
# use the real ones.
PREFIX = f"/teleop_test_{os.getpid()}"
CONFIG = Path(__file__).resolve().parents[3] / "config" / "teleop_joycon.yaml"
SERVICES = (START_EPISODE_SERVICE, STOP_EPISODE_SERVICE, DISCARD_EPISODE_SERVICE)
SERVICE_REMAPS = [a for name in SERVICES for a in ("-r", f"{name}:={PREFIX}{name}")]
TOPIC_REMAPS = [a for t in (JOY_TOPIC, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC) for a in ("-r", f"{t}:={PREFIX}{t}")]
REMAPS = ["--ros-args", "--params-file", str(CONFIG), *TOPIC_REMAPS, *SERVICE_REMAPS]
# Longer than the 0.25 s default: this test process publishes the Joy stream itself, and on a loaded machine it can
# stall for a few hundred ms; the node must not count that as the joystick going silent.
JOY_TIMEOUT_S = 0.6


class Rig:
    def __init__(self, node) -> None:
        self.node = node
        self.joy_pub = node.create_publisher(Joy, PREFIX + JOY_TOPIC, 10)
        self.js_pub = node.create_publisher(JointState, PREFIX + JOINT_STATES_TOPIC, 10)
        self.received: list[tuple[float, JointTrajectory]] = []
        node.create_subscription(JointTrajectory, PREFIX + TRAJECTORY_TOPIC,
                                 lambda m: self.received.append((time.monotonic(), m)), 50)

    def drive(self, seconds: float, x: float = 0.0, y: float = 0.0, pressed: tuple[int, ...] = (),
              joy: bool = True, n_buttons: int = 11) -> None:
        """Publish joint states (home) and, if ``joy``, Joy messages at 50 Hz for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.js_pub.publish(JointState(name=list(JOINT_NAMES), position=home_vector().tolist()))
            if joy:
                self.joy_pub.publish(Joy(axes=[x, y], buttons=[int(i in pressed) for i in range(n_buttons)]))
            spin_until(self.node, lambda: False, 0.02)

    def targets(self) -> np.ndarray:
        return np.array([m.points[0].positions for _, m in self.received])


@pytest.fixture
def rig(node_process, ros_node):
    proc = node_process("so101_teleop.teleop_node", params={"joint_speed": 2.0, "instruction": "teleop test",
                                                            "joy_timeout_s": JOY_TIMEOUT_S}, extra_args=REMAPS)
    r = Rig(ros_node)
    assert spin_until(ros_node, lambda: r.joy_pub.get_subscription_count() > 0
                      and len(ros_node.get_publishers_info_by_topic(PREFIX + TRAJECTORY_TOPIC)) > 0, 20.0), \
        proc.output()
    r.proc = proc
    # Handshake: deadman with the stick at rest until targets flow both ways (targets restart from the measured
    # pose on every engagement, so this moves nothing), then release.
    for _ in range(50):
        r.drive(0.2, pressed=(M.button_deadman,))
        if r.received:
            break
    assert r.received, proc.output()
    r.drive(0.5)
    r.received.clear()
    return r


def test_deadman_rate_limits_and_timeout(rig: Rig) -> None:
    rig.drive(0.5, x=1.0)
    assert rig.received == [], "no deadman, no motion"
    rig.drive(1.5, x=1.0, y=-1.0, pressed=(M.button_deadman,))
    times = [t for t, _ in rig.received]
    assert len(times) > 20, rig.proc.output()
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 22.0 <= rate <= 38.0, f"{rate:.1f} Hz, expected 30"
    msg = rig.received[-1][1]
    assert list(msg.joint_names) == list(JOINT_NAMES) and len(msg.points) == 1
    assert msg.points[0].time_from_start.sec == 0 and msg.points[0].time_from_start.nanosec == 100_000_000
    targets = rig.targets()
    limits = JointLimits.so101()
    assert all(limits.contains(t) for t in targets)
    assert np.all(np.diff(targets[:, 0]) >= 0) and targets[-1, 0] == pytest.approx(limits.upper[0])
    assert targets[-1, 1] == pytest.approx(limits.lower[1])
    assert np.allclose(targets[:, 2:], home_vector()[2:])
    # Joy goes silent while the deadman was held: targets stop within joy_timeout_s + margin.
    rig.received.clear()
    silent_from = time.monotonic()
    rig.drive(JOY_TIMEOUT_S + 1.0, joy=False)
    assert rig.received, "a final hold is published"
    assert rig.received[-1][0] - silent_from < JOY_TIMEOUT_S + 0.2, [t - silent_from for t, _ in rig.received]
    assert np.allclose(rig.targets()[-1], targets[-1])


def test_cartesian_jog_moves_ee_forward(rig: Rig) -> None:
    rig.drive(0.2, pressed=(M.button_mode,))
    rig.drive(0.2)
    rig.drive(1.0, y=1.0, pressed=(M.button_deadman,))
    kin = ArmKinematics.from_file(default_urdf_path())
    moved = kin.fk(rig.targets()[-1]) - kin.fk(home_vector())
    assert 0.04 < moved[0] < 0.1, moved  # 0.08 m/s for ~1 s
    assert abs(moved[1]) < 0.005 and abs(moved[2]) < 0.005, moved


def test_bad_joy_is_ignored_and_node_lives(rig: Rig) -> None:
    for _ in range(20):  # until the node has logged the bad messages (discovery may take a moment)
        rig.drive(0.3, x=1.0, pressed=(M.button_deadman,), n_buttons=3)
        if "ignored Joy message" in rig.proc.output():
            break
    assert rig.received == []
    assert rig.proc.alive()
    assert "ignored Joy message" in rig.proc.output() and "has 3 buttons" in rig.proc.output()
    rig.drive(0.5, x=1.0, pressed=(M.button_deadman,))
    assert len(rig.received) > 5


def test_episode_buttons_call_the_recorder(rig: Rig, node_process, ros_node, tmp_path: Path) -> None:
    data = tmp_path / "data"
    node_process("so101_teleop.recorder_node", params={"dataset_dir": str(data), "min_free_mb": 1.0},
                 extra_args=["--ros-args", *SERVICE_REMAPS])
    stop = ros_node.create_client(Trigger, PREFIX + STOP_EPISODE_SERVICE)
    assert stop.wait_for_service(timeout_sec=15.0)

    def recording() -> bool:
        return data.is_dir() and any(p.is_dir() for p in data.iterdir())

    for _ in range(20):  # press "+" until the teleop node has discovered the recorder's service
        rig.drive(0.2, pressed=(M.button_start_episode,))
        rig.drive(0.3)
        if recording():
            break
    assert recording(), rig.proc.output()
    episode = next(p for p in data.iterdir() if p.is_dir())
    # "+" again: the recorder refuses; the teleop node logs the refusal as a warning on the line where it logs a
    # success as info, which rclpy once turned into a ValueError that ended the node
    rig.drive(0.2, pressed=(M.button_start_episode,))
    rig.drive(0.2)
    assert spin_until(ros_node, lambda: "start_episode: already recording" in rig.proc.output(), 5.0), \
        rig.proc.output()
    assert rig.proc.alive() and "Traceback" not in rig.proc.output(), rig.proc.output()
    rig.drive(0.2, pressed=(M.button_discard_episode,))
    rig.drive(0.2)
    assert spin_until(ros_node, lambda: not episode.exists(), 5.0), rig.proc.output()
    assert "start_episode: recording" in rig.proc.output() and "discard_episode: discarded" in rig.proc.output()
