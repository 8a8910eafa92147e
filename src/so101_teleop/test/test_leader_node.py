"""Leader -> follower over DDS: two emulated STS3215 buses on ptys, the driver node (standalone) on the follower
bus and the leader node on the leader bus, each its own process; keys typed on the leader node's stdin."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory

from so101_common.graph import JOINT_STATES_TOPIC, TRAJECTORY_TOPIC
from so101_common.joints import JointLimits
from so101_common.testing import spin_until
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration
from so101_hardware.emulator import BusEmulator
from so101_teleop.leader import Mirror, MirrorSettings

ROOT = Path(__file__).resolve().parents[3]
FOLLOWER_CAL = ROOT / "config" / "calibration" / "so101_example.yaml"
LEADER_JSON = {  # LeRobot's teleoperators/so101_leader/<id>.json; the pan range reaches past the follower's limit
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1196, "range_min": 400, "range_max": 3700},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": 1989, "range_min": 862, "range_max": 3253},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": -1190, "range_min": 842, "range_max": 3047},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": 1761, "range_min": 909, "range_max": 3254},
    "wrist_roll": {"id": 5, "drive_mode": 0, "homing_offset": -45, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": 1050, "range_min": 1903, "range_max": 3135},
}
# The emulators answer from threads of this process: on a loaded 2-core machine a 10 ms deadline is too short
# (CI once saw a 50 ms one missed at start-up, while both node processes were importing).
EMULATED_BUS = {"reply_timeout_ms": 100.0}
LIMITS = JointLimits.so101()


def _pose(emulator: BusEmulator, cal: ArmCalibration, q: np.ndarray) -> None:
    """Move the shafts (by hand, for the leader) so that the calibrated arm reads ``q``."""
    for motor, ticks in zip(cal.motors.values(), cal.to_ticks(q, clip=False)):
        emulator.set_shaft(motor.id, ticks + motor.homing_offset)


def test_follower_mirrors_the_leader_within_limits_while_engaged(node_process, ros_node, tmp_path: Path) -> None:
    leader_file = tmp_path / "my_leader.json"
    leader_file.write_text(json.dumps(LEADER_JSON))
    leader_cal = ArmCalibration.from_lerobot(LEADER_JSON)
    follower_cal = ArmCalibration.load_yaml(FOLLOWER_CAL)
    mirror = Mirror(MirrorSettings())  # the node's defaults: gripper range onto the follower's gripper limits
    with BusEmulator() as leader_bus, BusEmulator() as follower_bus:
        _pose(follower_bus, follower_cal, np.array([0.0, -0.3, 0.4, 0.1, 0.0, 0.5]))
        with P.ServoBus(leader_bus.port_name, reply_timeout_ms=50.0) as bus:
            for servo_id in leader_cal.ids:  # left on by someone: the leader node must switch it off
                bus.write(servo_id, P.TORQUE_ENABLE, 1)
        driver = node_process("so101_hardware.driver_node", params={
            **EMULATED_BUS, "port": follower_bus.port_name, "calibration_file": str(FOLLOWER_CAL),
            "mode": "standalone", "autostart": True})
        leader = node_process("so101_teleop.leader_node", stdin_pipe=True, params={
            **EMULATED_BUS, "port": leader_bus.port_name, "calibration_file": str(leader_file),
            "deadman": "key", "catchup_speed": 2.0})
        states: list[np.ndarray] = []
        trajectories: list[np.ndarray] = []
        ros_node.create_subscription(JointState, JOINT_STATES_TOPIC,
                                     lambda m: states.append(np.array(m.position)), 10)
        ros_node.create_subscription(JointTrajectory, TRAJECTORY_TOPIC,
                                     lambda m: trajectories.append(np.array(m.points[0].positions)), 100)
        assert spin_until(ros_node, lambda: len(states) > 3 and "mirroring at" in leader.output(), 30.0), \
            driver.output() + leader.output()
        assert all(leader_bus.register(i, P.TORQUE_ENABLE.address, 1) == 0 for i in leader_cal.ids)
        pose0 = np.array([0.2, -0.2, 0.5, 0.0, 0.3, 0.8])
        _pose(leader_bus, leader_cal, pose0)  # only now: with torque on, the servos held their own goal
        assert spin_until(ros_node, lambda: False, 0.5) is False and trajectories == []  # not engaged yet
        rest = states[-1].copy()

        def follows(pose: np.ndarray) -> bool:
            return bool(states) and np.allclose(states[-1], mirror.map(pose), atol=0.01)

        leader.type(" ")  # deadman toggled on: catch up, then mirror
        assert spin_until(ros_node, lambda: follows(pose0), 20.0), (states[-1], mirror.map(pose0), leader.output())
        # Beyond the follower's limits (pan, wrist flex) and the gripper trigger past its calibrated open end.
        pose1 = np.array([2.3, -0.6, 1.0, -1.9, -0.4, LIMITS.upper[-1] + 0.3])
        _pose(leader_bus, leader_cal, pose1)
        assert spin_until(ros_node, lambda: follows(pose1), 10.0), (states[-1], mirror.map(pose1))
        assert mirror.map(pose1)[0] == pytest.approx(LIMITS.upper[0]) and mirror.map(pose1)[3] == pytest.approx(
            LIMITS.lower[3])

        leader.type(" ")  # released: one hold, then nothing; the follower stays where it is
        assert spin_until(ros_node, lambda: "released" in leader.output(), 5.0)
        spin_until(ros_node, lambda: False, 0.3)
        sent = len(trajectories)
        _pose(leader_bus, leader_cal, pose0)
        spin_until(ros_node, lambda: False, 1.0)
        assert len(trajectories) == sent and follows(pose1)

        leader.type("s")
        assert spin_until(ros_node, lambda: "start_episode: the episode recorder is not running" in leader.output(),
                          5.0), leader.output()

        leader.type(" ")  # engaged again, then the leader's USB adapter is pulled: the follower holds, nothing dies
        assert spin_until(ros_node, lambda: follows(pose0), 20.0)
        leader_bus.stop()
        assert spin_until(ros_node, lambda: "leader bus read failed" in leader.output(), 5.0), leader.output()
        spin_until(ros_node, lambda: False, 0.3)
        sent = len(trajectories)
        spin_until(ros_node, lambda: False, 1.0)
        assert len(trajectories) == sent and follows(pose0) and leader.alive() and driver.alive()
        assert leader.stop() == 0 and "LEADER TORQUE OFF NOT CONFIRMED" in leader.output()

    assert len(trajectories) > 20 and not np.allclose(rest, mirror.map(pose1), atol=0.1)
    assert all(LIMITS.contains(t) for t in trajectories)
    tick = 2 * np.pi / 4096
    for k, (joint, motor) in enumerate(follower_cal.motors.items()):
        goals = np.array(follower_bus.goal_writes(motor.id), dtype=np.float64)
        radians = follower_cal.to_radians(np.outer(goals, np.ones(6)))[:, k]
        assert np.all(radians >= LIMITS.lower[k] - tick) and np.all(radians <= LIMITS.upper[k] + tick), joint
    assert leader_bus.goal_writes(1) == [] and leader_bus.instructions["sync_read"] > 50


def test_bad_leader_configuration_is_one_line_and_exit_2(node_process, tmp_path: Path) -> None:
    leader_file = tmp_path / "my_leader.json"
    leader_file.write_text(json.dumps(LEADER_JSON))
    cases = {
        "port": ({"port": str(tmp_path / "ttyACM9"), "calibration_file": str(leader_file)},
                 f"cannot open serial port {tmp_path / 'ttyACM9'}"),
        "calibration": ({"calibration_file": str(tmp_path / "leader.json")}, "leader.json does not exist"),
        "rate": ({"rate_hz": 30.0}, "parameter rate_hz must be in 60..1000 Hz, got 30.0"),
        "rate type": ({"rate_hz": 200}, "parameter rate_hz must be a floating-point number (e.g. 1.0) (like its "
                                        "default rate_hz:=100.0), got 200"),
        "deadman": ({"deadman": "pedal"}, "deadman must be one of ('none', 'key', 'joy'), got 'pedal'"),
    }
    # started together, as a launch file does; without discovery, as none of them may find a peer (see node_process)
    procs = {name: (node_process("so101_teleop.leader_node", params={"keyboard": False, **params}, discovery=False),
                    text) for name, (params, text) in cases.items()}
    for name, (proc, text) in procs.items():
        assert proc.wait(30.0) == 2, (name, proc.output())
        lines = [line for line in proc.output().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("leader_node: invalid configuration: ") and text in lines[0], \
            (name, lines)
