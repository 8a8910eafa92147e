"""The SO-101 arm driver core (no ROS): servos <-> joint radians with safety clamps, one cycle at a time.

The node calls ``read()`` and ``command()`` once per control cycle; this class does the bus work (one SYNC_READ,
one SYNC_WRITE), unit conversion through the calibration, clamping to the joint limits and to a maximum step
per cycle, and keeps per-servo health for diagnostics. Bus errors are retried by the bus, then counted here;
a servo that missed a cycle keeps its last known value and is marked stale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration


@dataclass
class ServoHealth:
    """What the diagnostics report for one servo."""

    joint: str
    servo_id: int
    voltage_v: float = float("nan")
    temperature_c: float = float("nan")
    load_percent: float = float("nan")
    current_ma: float = float("nan")
    error_bits: int = 0
    missed_cycles: int = 0
    status_error_counts: dict[str, int] = field(default_factory=dict)
    last_comm_error: str = ""

    @property
    def errors(self) -> list[str]:
        return P.status_error_names(self.error_bits)


@dataclass(frozen=True)
class JointReading:
    positions: np.ndarray  # rad
    velocities: np.ndarray  # rad/s
    fresh: np.ndarray  # bool per joint: read this cycle


class ArmDriver:
    """Six STS3215 servos as one arm in radians."""

    def __init__(self, bus: P.ServoBus, calibration: ArmCalibration, max_step: float) -> None:
        if max_step <= 0:
            raise ValueError(f"max_step must be > 0 rad per cycle, got {max_step}")
        self.bus = bus
        self.calibration = calibration
        self.limits = JointLimits.so101(JOINT_NAMES)
        self.max_step = max_step
        self.ids = calibration.ids
        self.health = [ServoHealth(n, i) for n, i in zip(JOINT_NAMES, self.ids)]
        self.cycles = 0
        self.failed_reads = 0
        self.torque_on = False
        self._positions: np.ndarray | None = None
        self._present_ticks = np.zeros(len(JOINT_NAMES), dtype=np.int64)
        self._velocities = np.zeros(len(JOINT_NAMES))
        self.goal: np.ndarray | None = None  # last goal sent (rad)

    # -- configure
    def connect(self) -> dict[str, int]:
        """Ping every servo; a missing one is an error that names it. Returns joint -> model number."""
        models, missing = {}, []
        for joint, servo_id in zip(JOINT_NAMES, self.ids):
            try:
                models[joint] = self.bus.ping(servo_id)
            except P.CommError as exc:
                missing.append(f"{joint} (ID {servo_id}: {exc})")
        if missing:
            raise P.MissingServoError(f"servos not answering on {self.bus.port_name}: {'; '.join(missing)}. "
                                      "Check power (7.4 V), the bus cable and the IDs (so101-calibrate --help).")
        return models

    def sync_calibration(self, write: bool) -> list[str]:
        """Compare the servos' Homing_Offset and position limits with the calibration; write them when asked.

        Returns one line per field that differed. EEPROM writes happen with Lock = 0 and torque off, then Lock = 1.
        """
        differences: list[str] = []
        for joint, servo_id in zip(JOINT_NAMES, self.ids):
            motor = self.calibration.motors[joint]
            wanted = {
                P.HOMING_OFFSET: P.encode_sign_magnitude(motor.homing_offset, P.HOMING_OFFSET_SIGN_BIT),
                P.MIN_POSITION_LIMIT: motor.range_min,
                P.MAX_POSITION_LIMIT: motor.range_max,
            }
            present = {reg: self.bus.read(servo_id, reg) for reg in wanted}
            changed = {reg: value for reg, value in wanted.items() if present[reg] != value}
            for reg, value in changed.items():
                differences.append(f"{joint} (ID {servo_id}) register {reg.address}: servo has "
                                   f"{present[reg]}, calibration says {value}")
            if changed and write:
                self.bus.write(servo_id, P.TORQUE_ENABLE, 0)
                self.bus.write(servo_id, P.LOCK, 0)
                for reg, value in changed.items():
                    self.bus.write(servo_id, reg, value)
                self.bus.write(servo_id, P.LOCK, 1)
        return differences

    def configure_servos(self, p_gain: int, i_gain: int, d_gain: int, acceleration: int) -> list[str]:
        """Position mode, no reply delay and the given gains/acceleration; only fields that differ are written.

        Return_Delay_Time 0 (factory: 500 us per reply) is what makes a 100 Hz loop fit the bus; P 16 / D 32 is
        what LeRobot uses on the SO-101 to avoid shaking. Returns one line per field written.
        """
        wanted = {P.RETURN_DELAY_TIME: 0, P.OPERATING_MODE: 0, P.P_COEFFICIENT: p_gain, P.I_COEFFICIENT: i_gain,
                  P.D_COEFFICIENT: d_gain, P.ACCELERATION: acceleration}
        for reg, value in wanted.items():
            if not 0 <= value <= 254:
                raise ValueError(f"register {reg.address} value {value} outside 0..254")
        written: list[str] = []
        for joint, servo_id in zip(JOINT_NAMES, self.ids):
            changed = {reg: v for reg, v in wanted.items() if self.bus.read(servo_id, reg, strict=False) != v}
            if not changed:
                continue
            self.bus.write(servo_id, P.TORQUE_ENABLE, 0, strict=False)
            self.bus.write(servo_id, P.LOCK, 0, strict=False)
            for reg, value in changed.items():
                self.bus.write(servo_id, reg, value, strict=False)
                written.append(f"{joint} (ID {servo_id}) register {reg.address} = {value}")
            self.bus.write(servo_id, P.LOCK, 1, strict=False)
        return written

    # -- activate / deactivate
    def enable(self) -> np.ndarray:
        """Torque on holding the present position (goal = present first, so nothing jumps). Returns it (rad)."""
        reading = self.read()
        if not reading.fresh.all():
            stale = [n for n, f in zip(JOINT_NAMES, reading.fresh) if not f]
            raise P.BusError(f"cannot enable torque: no position from {stale}")
        ticks = self._present_ticks
        self.bus.sync_write(P.GOAL_POSITION, {i: int(t) for i, t in zip(self.ids, ticks)})
        for servo_id in self.ids:
            self.bus.write(servo_id, P.TORQUE_ENABLE, 1, strict=False)
        self.torque_on = True
        self.goal = self.calibration.to_radians(ticks)
        return self.goal.copy()

    def disable(self) -> list[str]:
        """Torque off on every servo, trying all of them even when some fail; returns the failures."""
        failures = []
        for joint, servo_id in zip(JOINT_NAMES, self.ids):
            try:
                self.bus.write(servo_id, P.TORQUE_ENABLE, 0, strict=False)
            except P.BusError as exc:
                failures.append(f"{joint}: {exc}")
        self.torque_on = False
        self.goal = None
        return failures

    # -- the cycle
    def read(self) -> JointReading:
        """One SYNC_READ of the feedback block of all servos."""
        self.cycles += 1
        results = self.bus.sync_read(P.FEEDBACK_START, P.FEEDBACK_LENGTH, self.ids)
        n = len(JOINT_NAMES)
        ticks = self._present_ticks.astype(np.float64)
        velocity_ticks = np.zeros(n)
        fresh = np.zeros(n, dtype=bool)
        for k, (servo_id, health) in enumerate(zip(self.ids, self.health)):
            result = results[servo_id]
            if isinstance(result, P.CommError):
                health.missed_cycles += 1
                health.last_comm_error = str(result)
                continue
            fb = P.Feedback.decode(result)
            ticks[k], velocity_ticks[k], fresh[k] = fb.position, fb.velocity, True
            health.voltage_v = fb.voltage / 10.0
            health.temperature_c = float(fb.temperature)
            health.load_percent = fb.load / 10.0
            health.current_ma = fb.current * 6.5
            health.error_bits = fb.error_bits
            for name in P.status_error_names(fb.error_bits):
                health.status_error_counts[name] = health.status_error_counts.get(name, 0) + 1
        if not fresh.any():
            self.failed_reads += 1
        if self._positions is None and not fresh.all():
            stale = [n for n, f in zip(JOINT_NAMES, fresh) if not f]
            raise P.BusError(f"first read got no position from {stale}")
        self._present_ticks = ticks.astype(np.int64)
        self._positions = self.calibration.to_radians(ticks)
        self._velocities = np.where(fresh, self.calibration.velocity_to_radians(velocity_ticks), 0.0)
        return JointReading(self._positions.copy(), self._velocities.copy(), fresh)

    def command(self, target: np.ndarray) -> np.ndarray:
        """Clamp a target (rad) to the joint limits and to ``max_step`` from the last goal; one SYNC_WRITE.

        Returns the goal actually sent (rad).
        """
        if not self.torque_on or self.goal is None:
            raise P.BusError("command while torque is off (activate the driver first)")
        target = self.limits.clamp(np.asarray(target, dtype=np.float64))
        step = np.clip(target - self.goal, -self.max_step, self.max_step)
        goal = self.goal + step
        ticks = self.calibration.to_ticks(goal)
        self.bus.sync_write(P.GOAL_POSITION, {i: int(t) for i, t in zip(self.ids, ticks)})
        self.goal = goal
        return goal.copy()

    @property
    def positions(self) -> np.ndarray | None:
        return None if self._positions is None else self._positions.copy()

