"""The driver core (no ROS) against the emulated bus: radians, clamps, faults, torque."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from so101_common.joints import JointLimits
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration
from so101_hardware.driver import ArmDriver
from so101_hardware.emulator import BusEmulator

TICK = 2 * math.pi / 4096
EXAMPLE = Path(__file__).resolve().parents[3] / "config" / "calibration" / "so101_example.yaml"


def _driver(bus: P.ServoBus, max_step: float = 0.05) -> ArmDriver:
    return ArmDriver(bus, ArmCalibration.load_yaml(EXAMPLE), max_step)


def _write_calibration(driver: ArmDriver) -> None:
    driver.connect()
    # Fresh servos: offset + 2 limits differ on each, except wrist_roll whose range is the full turn already.
    assert len(driver.sync_calibration(write=True)) == 16
    assert driver.sync_calibration(write=False) == []


def test_positions_in_radians_match_the_shafts(emulator: BusEmulator, bus: P.ServoBus) -> None:
    driver = _driver(bus)
    _write_calibration(driver)
    cal = driver.calibration
    wanted = np.array([0.5, -1.0, 1.2, 0.3, -2.0, 0.8])
    ticks = cal.to_ticks(wanted)
    for motor, t in zip(cal.motors.values(), ticks):
        emulator.set_shaft(motor.id, t + motor.homing_offset)  # shaft = present + offset
    reading = driver.read()
    assert reading.fresh.all()
    assert np.allclose(reading.positions, wanted, atol=1.5 * TICK)


def test_missing_servo_is_named(emulator: BusEmulator, bus: P.ServoBus) -> None:
    emulator.remove(3)
    with pytest.raises(P.MissingServoError, match="elbow_flex \\(ID 3"):
        _driver(bus).connect()


def test_enable_holds_present_position_and_commands_are_clamped(emulator: BusEmulator, bus: P.ServoBus) -> None:
    driver = _driver(bus, max_step=0.05)
    _write_calibration(driver)
    for motor in driver.calibration.motors.values():  # the arm rests inside its calibrated range
        emulator.set_shaft(motor.id, (motor.range_min + motor.range_max) // 2 + 300 + motor.homing_offset)
    start = driver.enable()
    assert all(emulator.register(i, P.TORQUE_ENABLE.address, 1) == 1 for i in range(1, 7))
    time.sleep(0.05)
    assert np.allclose(driver.read().positions, start, atol=1.5 * TICK)  # no jump at torque on

    limits = JointLimits.so101()
    far = np.array([3.0, -3.0, 0.0, 0.0, 0.0, 3.0])  # beyond the limits of pan, lift and gripper
    sent = driver.command(far)
    assert np.allclose(np.abs(sent - start), np.minimum(np.abs(limits.clamp(far) - start), 0.05))
    for _ in range(200):
        sent = driver.command(far)
    assert np.allclose(sent, limits.clamp(far))
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not np.allclose(driver.read().positions, sent, atol=3 * TICK):
        time.sleep(0.02)
    positions = driver.read().positions
    assert np.allclose(positions, sent, atol=3 * TICK)
    assert limits.contains(positions, tol=3 * TICK)

    assert driver.disable() == []
    assert all(emulator.register(i, P.TORQUE_ENABLE.address, 1) == 0 for i in range(1, 7))
    with pytest.raises(P.BusError, match="torque is off"):
        driver.command(start)


def test_faults_are_survived_and_reported(emulator: BusEmulator, bus: P.ServoBus) -> None:
    driver = _driver(bus)
    _write_calibration(driver)
    driver.enable()
    emulator.inject(2, "error_bits", count=None, bits=0x24)
    emulator.inject(4, "no_reply", count=None)
    emulator.inject(5, "bad_checksum", count=1)
    emulator.inject(1, "partial", count=1)
    reading = driver.read()
    assert list(reading.fresh) == [True, True, True, False, True, True]
    health = {h.joint: h for h in driver.health}
    assert health["shoulder_lift"].errors == ["overheat", "overload"]
    assert health["shoulder_lift"].status_error_counts == {"overheat": 1, "overload": 1}
    assert health["wrist_flex"].missed_cycles == 1 and "no reply" in health["wrist_flex"].last_comm_error
    assert bus.counters[5].corrupt == 1 and bus.counters[1].corrupt == 1
    driver.command(reading.positions)  # a stale joint is still commanded (held at its last goal)
    emulator.clear_faults()
    assert driver.read().fresh.all()


def test_configure_servos_writes_only_what_differs_through_the_lock(emulator: BusEmulator, bus: P.ServoBus) -> None:
    driver = _driver(bus)
    driver.connect()
    written = driver.configure_servos(p_gain=16, i_gain=0, d_gain=32, acceleration=254)
    # Fresh emulated servos have 0 everywhere: P, D and acceleration differ on each of the 6.
    assert len(written) == 18
    assert emulator.refused_writes == 0
    assert all(emulator.register(i, P.P_COEFFICIENT.address, 1) == 16 for i in range(1, 7))
    assert all(emulator.register(i, P.LOCK.address, 1) == 1 for i in range(1, 7))
    assert driver.configure_servos(p_gain=16, i_gain=0, d_gain=32, acceleration=254) == []
    with pytest.raises(ValueError, match="outside 0..254"):
        driver.configure_servos(p_gain=300, i_gain=0, d_gain=32, acceleration=254)


def test_arm_outside_its_range_is_walked_in_at_max_step(emulator: BusEmulator, bus: P.ServoBus) -> None:
    driver = _driver(bus, max_step=0.05)
    _write_calibration(driver)
    cal = driver.calibration
    for motor in cal.motors.values():
        emulator.set_shaft(motor.id, (motor.range_min + motor.range_max) // 2 + motor.homing_offset)
    gripper = cal.motors["gripper"]
    outside = gripper.range_min - 1130  # the jaw pushed past its calibrated end stop
    emulator.set_shaft(gripper.id, outside + gripper.homing_offset)
    start = driver.enable()
    assert emulator.goal_writes(gripper.id) == [outside]  # held where it is, not clamped to range_min
    inside = cal.limits.middle
    for _ in range(80):
        driver.read()
        driver.command(inside)
    goals = np.array(emulator.goal_writes(gripper.id))
    max_ticks = 0.05 / abs(cal.to_radians(np.ones(6))[5] - cal.to_radians(np.zeros(6))[5])
    assert np.all(np.abs(np.diff(goals)) <= max_ticks + 1), np.diff(goals)[:5]
    assert gripper.range_min <= goals[-1] <= gripper.range_max
    assert np.allclose(driver.goal, inside) and not np.allclose(start, inside)
    assert driver.disable() == []
    # The position limits opened for the walk are back in the servo's EEPROM.
    assert emulator.register(gripper.id, P.MIN_POSITION_LIMIT.address, 2) == gripper.range_min
    assert emulator.register(gripper.id, P.MAX_POSITION_LIMIT.address, 2) == gripper.range_max
    assert driver.sync_calibration(write=False) == []


def test_torque_off_is_read_back_retried_and_failures_named(emulator: BusEmulator, bus: P.ServoBus) -> None:
    driver = _driver(bus)
    _write_calibration(driver)
    for motor in driver.calibration.motors.values():
        emulator.set_shaft(motor.id, (motor.range_min + motor.range_max) // 2 + motor.homing_offset)
    driver.enable()
    emulator.inject(2, "no_reply", count=3)  # the first torque-off write fails after its retries
    emulator.inject(6, "no_reply", count=None)  # the gripper has stopped answering
    failures = driver.disable()
    assert len(failures) == 1 and failures[0].startswith("gripper (ID 6)"), failures
    assert [emulator.register(i, P.TORQUE_ENABLE.address, 1) for i in range(1, 6)] == [0] * 5
    assert driver.torque_on  # not confirmed: a later release tries again
    emulator.clear_faults()
    assert driver.disable() == [] and not driver.torque_on
    assert emulator.register(6, P.TORQUE_ENABLE.address, 1) == 0
