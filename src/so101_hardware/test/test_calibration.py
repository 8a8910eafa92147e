"""Calibration: tick <-> radian mapping, files, LeRobot import, and the calibration procedure on the emulator."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits
from so101_hardware import protocol as P
from so101_hardware.calibrate import Calibrator, main as calibrate_main
from so101_hardware.calibration import ArmCalibration, CalibrationError, MotorCalibration
from so101_hardware.emulator import BusEmulator

LEROBOT = {
    "shoulder_pan": {"id": 1, "drive_mode": 0, "homing_offset": -1015, "range_min": 758, "range_max": 3292},
    "shoulder_lift": {"id": 2, "drive_mode": 0, "homing_offset": 1311, "range_min": 812, "range_max": 3195},
    "elbow_flex": {"id": 3, "drive_mode": 0, "homing_offset": -1078, "range_min": 871, "range_max": 3090},
    "wrist_flex": {"id": 4, "drive_mode": 0, "homing_offset": 953, "range_min": 891, "range_max": 3177},
    "wrist_roll": {"id": 5, "drive_mode": 1, "homing_offset": -1387, "range_min": 0, "range_max": 4095},
    "gripper": {"id": 6, "drive_mode": 0, "homing_offset": 1155, "range_min": 2023, "range_max": 3480},
}
EXAMPLE = Path(__file__).resolve().parents[3] / "config" / "calibration" / "so101_example.yaml"


def test_arm_joint_mapping_is_zero_at_mid_range_and_4096_ticks_per_turn() -> None:
    cal = ArmCalibration.from_lerobot(LEROBOT)
    mid = np.array([(v["range_min"] + v["range_max"]) / 2 for v in LEROBOT.values()])
    rad = cal.to_radians(mid)
    assert np.allclose(rad[:5], 0.0)
    quarter = cal.to_radians(mid + 1024)
    assert quarter[0] == pytest.approx(math.pi / 2)
    assert quarter[4] == pytest.approx(-math.pi / 2)  # wrist_roll has drive_mode 1: direction flipped
    assert cal.velocity_to_radians(np.full(6, 4096.0))[1] == pytest.approx(2 * math.pi)


def test_gripper_range_maps_onto_its_joint_limits() -> None:
    cal = ArmCalibration.from_lerobot(LEROBOT)
    limits = JointLimits.so101()
    g = JOINT_NAMES.index("gripper")
    ticks = np.full(6, 2048.0)
    ticks[g] = 2023
    assert cal.to_radians(ticks)[g] == pytest.approx(limits.lower[g])
    ticks[g] = 3480
    assert cal.to_radians(ticks)[g] == pytest.approx(limits.upper[g])
    flipped = dict(LEROBOT, gripper=dict(LEROBOT["gripper"], drive_mode=1))
    assert ArmCalibration.from_lerobot(flipped).to_radians(ticks)[g] == pytest.approx(limits.lower[g])


def test_ticks_round_trip_and_clip_to_calibrated_range() -> None:
    cal = ArmCalibration.from_lerobot(LEROBOT)
    q = np.array([0.3, -0.7, 1.2, -0.4, 2.0, 0.9])
    assert np.allclose(cal.to_radians(cal.to_ticks(q)), q, atol=2 * math.pi / 4096)
    ticks = cal.to_ticks(np.array([10.0, -10.0, 0, 0, 0, 5.0]))
    assert ticks[0] == 3292 and ticks[1] == 812 and ticks[5] == 3480
    with pytest.raises(ValueError, match="finite"):
        cal.to_ticks(np.array([0, 0, np.nan, 0, 0, 0]))


def test_yaml_round_trip_and_the_example_file(tmp_path: Path) -> None:
    cal = ArmCalibration.from_lerobot(LEROBOT)
    loaded = ArmCalibration.load_yaml(cal.save_yaml(tmp_path / "cal.yaml"))
    assert loaded.motors == cal.motors
    example = ArmCalibration.load_yaml(EXAMPLE)
    assert example.ids == (1, 2, 3, 4, 5, 6)


def test_lerobot_json_import_via_cli(tmp_path: Path) -> None:
    source = tmp_path / "so101_follower.json"
    source.write_text(json.dumps(LEROBOT))
    out = tmp_path / "config" / "so101.yaml"
    assert calibrate_main(["--from-lerobot", str(source), "--output", str(out)]) == 0
    assert ArmCalibration.load_yaml(out).to_lerobot() == LEROBOT


def test_bad_calibrations_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="missing \\['gripper'\\]"):
        ArmCalibration.from_lerobot({k: v for k, v in LEROBOT.items() if k != "gripper"})
    with pytest.raises(CalibrationError, match="elbow_flex: need 0 <= range_min < range_max"):
        ArmCalibration.from_lerobot(dict(LEROBOT, elbow_flex=dict(LEROBOT["elbow_flex"], range_min=4000)))
    with pytest.raises(CalibrationError, match="wrist_flex: missing fields \\['homing_offset'\\]"):
        ArmCalibration.from_lerobot(dict(LEROBOT, wrist_flex={"id": 4, "drive_mode": 0, "range_min": 1,
                                                              "range_max": 2}))
    with pytest.raises(CalibrationError, match="distinct"):
        ArmCalibration.from_lerobot(dict(LEROBOT, gripper=dict(LEROBOT["gripper"], id=1)))
    with pytest.raises(CalibrationError, match="does not exist"):
        ArmCalibration.load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert calibrate_main(["--from-lerobot", str(bad), "--output", str(tmp_path / "x.yaml")]) == 1


def test_calibration_procedure_on_the_emulated_arm(emulator: BusEmulator, bus: P.ServoBus) -> None:
    middle = {1: 3000, 2: 1000, 3: 2500, 4: 500, 5: 2048, 6: 1800}
    for servo_id, shaft in middle.items():
        emulator.set_shaft(servo_id, shaft)
    calibrator = Calibrator(bus)
    calibrator.prepare()
    offsets = calibrator.set_middle()
    assert offsets["shoulder_pan"] == 3000 - 2047 and offsets["wrist_flex"] == 500 - 2047
    assert bus.read(1, P.PRESENT_POSITION) == 2047

    # The "user" sweeps every joint +-600 ticks around the middle, one pose per sample the calibrator takes (a thread
    # sleeping between poses once moved on before a loaded machine had sampled an end).
    poses = iter(range(-600, 601, 100))

    def next_pose() -> bool:
        step = next(poses, None)
        if step is None:
            return True
        for servo_id, shaft in middle.items():
            emulator.set_shaft(servo_id, shaft + step)
        return False

    calibrator.sweep(next_pose, period_s=0.0)
    cal = calibrator.finish()
    assert cal.motors["shoulder_pan"] == MotorCalibration(1, 0, 953, 2047 - 600, 2047 + 600)
    assert (cal.motors["wrist_roll"].range_min, cal.motors["wrist_roll"].range_max) == (0, 4095)
    # Limits and offsets were written with the EEPROM unlocked, then locked again.
    assert emulator.refused_writes == 0
    assert emulator.register(1, P.MIN_POSITION_LIMIT.address, 2) == 1447
    assert emulator.register(1, P.LOCK.address, 1) == 1
    assert P.decode_sign_magnitude(emulator.register(4, P.HOMING_OFFSET.address, 2), 11) == 500 - 2047
    # The middle pose is the zero pose.
    for servo_id, shaft in middle.items():
        emulator.set_shaft(servo_id, shaft)
    ticks = [bus.read(i, P.PRESENT_POSITION) for i in range(1, 7)]
    assert np.allclose(cal.to_radians(np.array(ticks))[:5], 0.0, atol=1e-3)


def test_calibration_refuses_a_joint_that_did_not_move(emulator: BusEmulator, bus: P.ServoBus) -> None:
    calibrator = Calibrator(bus)
    calibrator.prepare()
    calibrator.set_middle()
    calibrator.sample()
    with pytest.raises(CalibrationError, match="shoulder_pan \\(ID 1\\) did not move"):
        calibrator.finish()
