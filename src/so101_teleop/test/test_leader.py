"""Leader-arm teleop core: calibration import, the leader bus (real STS3215 frames on the pty emulator), the
leader -> follower mapping (gripper, limits, catch-up) and the deadman/episode controls."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits
from so101_hardware import protocol as P
from so101_hardware.calibration import CalibrationError
from so101_hardware.emulator import BusEmulator
from so101_teleop.leader import (ButtonMap, Control, Controls, LeaderArm, Mirror, MirrorSettings,
                                 load_leader_calibration)

# A leader arm as LeRobot's calibration saves it (teleoperators/so101_leader/<id>.json); wider ranges than the
# follower's, so the leader can ask for angles beyond the follower's limits.
LEADER_JSON = {
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1196, "range_min": 400, "range_max": 3700},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": 1989, "range_min": 862, "range_max": 3253},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": -1190, "range_min": 842, "range_max": 3047},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": 1761, "range_min": 909, "range_max": 3254},
    "wrist_roll": {"id": 5, "drive_mode": 0, "homing_offset": -45, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": 1050, "range_min": 1903, "range_max": 3135},
}
LIMITS = JointLimits.so101()
G = JOINT_NAMES.index("gripper")


@pytest.fixture
def leader_json(tmp_path: Path) -> Path:
    path = tmp_path / "my_leader.json"
    path.write_text(json.dumps(LEADER_JSON))
    return path


def test_lerobot_leader_json_is_imported_and_bad_files_name_themselves(leader_json: Path, tmp_path: Path) -> None:
    cal = load_leader_calibration(leader_json)
    assert cal.ids == (1, 2, 3, 4, 5, 6)
    assert cal.motors["gripper"].range_min == 1903 and cal.motors["shoulder_pan"].homing_offset == -1196
    with pytest.raises(CalibrationError, match="missing.json does not exist"):
        load_leader_calibration(tmp_path / "missing.json")
    with pytest.raises(CalibrationError, match=r"leader.txt: expected a LeRobot \.json"):
        load_leader_calibration(tmp_path / "leader.txt")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**LEADER_JSON, "gripper": {"id": 6}}))
    with pytest.raises(CalibrationError, match="gripper: missing fields"):
        load_leader_calibration(broken)


def test_leader_bus_torque_off_calibration_written_and_read_in_radians(leader_json: Path) -> None:
    cal = load_leader_calibration(leader_json)
    with BusEmulator() as emulator, P.ServoBus(emulator.port_name, reply_timeout_ms=50.0) as bus:
        for servo_id in cal.ids:  # someone left the leader's torque on: it must come off
            bus.write(servo_id, P.TORQUE_ENABLE, 1)
        leader = LeaderArm(bus, cal)
        differences = leader.start(write_calibration=True)
        assert len(differences) == 16  # offsets of all six and the limits of all but wrist_roll (factory 0..4095)
        for name, motor in cal.motors.items():
            assert emulator.register(motor.id, P.TORQUE_ENABLE.address, 1) == 0, name
            offset = emulator.register(motor.id, P.HOMING_OFFSET.address, 2)
            assert P.decode_sign_magnitude(offset, P.HOMING_OFFSET_SIGN_BIT) == motor.homing_offset, name
        q = np.array([0.3, -0.5, 0.8, 0.2, -1.0, 0.7])
        for motor, ticks in zip(cal.motors.values(), cal.to_ticks(q)):
            emulator.set_shaft(motor.id, ticks + motor.homing_offset)  # the hand moves the shafts
        assert np.allclose(leader.read(), q, atol=2 * np.pi / 4096)
        emulator.inject(3, "no_reply", count=None)
        assert leader.read() is None  # never a stale elbow value with fresh others
        assert emulator.goal_writes(1) == [] and emulator.instructions["sync_write"] == 0  # nothing commanded


def test_mirror_maps_gripper_range_and_clamps_to_follower_limits() -> None:
    mirror = Mirror(MirrorSettings(gripper_closed=0.0, gripper_open=1.2))
    leader = np.array([2.3, -0.2, 0.1, -2.0, 0.0, LIMITS.lower[G]])
    target = mirror.map(leader)
    assert target[0] == pytest.approx(LIMITS.upper[0]) and target[3] == pytest.approx(LIMITS.lower[3])
    assert target[G] == pytest.approx(0.0)  # leader closed end -> gripper_closed
    leader[G] = LIMITS.upper[G]
    assert mirror.map(leader)[G] == pytest.approx(1.2)
    leader[G] = (LIMITS.lower[G] + LIMITS.upper[G]) / 2
    assert mirror.map(leader)[G] == pytest.approx(0.6)
    leader[G] = LIMITS.upper[G] + 1.0  # trigger pushed past its calibrated range
    assert mirror.map(leader)[G] == pytest.approx(1.2)
    inverted = Mirror(MirrorSettings(gripper_closed=1.0, gripper_open=0.0))
    assert inverted.map(leader)[G] == pytest.approx(0.0)  # leader open end -> gripper_open, here 0
    with pytest.raises(ValueError, match="gripper_open 3.0 outside"):
        Mirror(MirrorSettings(gripper_open=3.0))
    with pytest.raises(ValueError, match="finite"):
        mirror.map(np.array([np.nan, 0, 0, 0, 0, 0]))


def test_mirror_catches_up_from_the_follower_then_mirrors_directly() -> None:
    mirror = Mirror(MirrorSettings(catchup_speed=1.0, sync_tolerance=0.05))
    leader = np.array([0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert mirror.step(0.0, leader, engaged=True) is None  # no follower state yet: nothing to start from
    mirror.on_follower_state(list(reversed(JOINT_NAMES)), [0.0] * 6)
    first = mirror.step(0.0, leader, engaged=True)
    assert np.allclose(first, 0.0)  # starts where the follower is, no jump
    t, targets = 0.0, []
    while mirror.catching_up:
        t += 0.01
        targets.append(mirror.step(t, leader, engaged=True))
    steps = np.abs(np.diff(np.array([first] + targets)[:, 0]))
    assert steps[:-1].max() <= 1.0 * 0.01 + 1e-12  # catchup_speed
    assert steps[-1] <= 0.05 + 1e-12  # the last step closes at most sync_tolerance
    assert 0.4 < t < 0.5 and targets[-1][0] == pytest.approx(0.5)
    leader = leader + np.array([0.3, -0.4, 0, 0, 0, 0])
    assert np.allclose(mirror.step(t + 0.01, leader, engaged=True)[:2], [0.8, -0.4])  # direct: no rate limit
    assert mirror.step(t + 0.02, None, engaged=True) is None  # missed leader read: nothing sent
    hold = mirror.step(t + 0.03, leader + 0.2, engaged=False)
    assert np.allclose(hold[:2], [0.8, -0.4])  # release: one hold of the last target
    assert mirror.step(t + 0.04, leader + 0.2, engaged=False) is None
    mirror.on_follower_state(JOINT_NAMES, [0.8, -0.4, 0, 0, 0, 0])
    assert mirror.step(t + 0.05, leader + 0.2, engaged=True) is not None and mirror.catching_up  # catch-up again


def test_controls_deadman_sources_and_episode_events() -> None:
    buttons = ButtonMap()
    none = Controls("none", buttons, 0.25)
    assert none.engaged(0.0)
    key = Controls("key", buttons, 0.25)
    assert key.transitions(0.0) == (False, [])
    assert key.on_key(" ") == []
    assert key.transitions(0.1) == (True, [Control.ENGAGE])
    assert key.transitions(0.2) == (True, [])
    key.on_key(" ")
    assert key.transitions(0.3) == (False, [Control.DISENGAGE])
    assert key.on_key("s") == [Control.START_EPISODE] and key.on_key("E") == [Control.STOP_EPISODE]
    assert key.on_key("d") == [Control.DISCARD_EPISODE] and key.on_key("x") == []
    joy = Controls("joy", buttons, 0.25)
    assert Controls("none", buttons, 0.25).on_key(" ") == [] and not joy.engaged(0.0)
    pressed = [0] * 11
    pressed[buttons.button_deadman] = 1
    assert joy.on_joy(1.0, pressed) == [] and joy.engaged(1.1)
    assert not joy.engaged(1.3)  # Joy silent for longer than joy_timeout_s: released
    pressed[buttons.button_start_episode] = 1
    assert joy.on_joy(1.4, pressed) == [Control.START_EPISODE]
    assert joy.on_joy(1.5, pressed) == []  # held, not pressed again
    with pytest.raises(ValueError, match="button_stop_episode and button_start_episode both use button 8"):
        ButtonMap(button_stop_episode=8)
    with pytest.raises(ValueError, match="deadman must be one of"):
        Controls("pedal", buttons, 0.25)
