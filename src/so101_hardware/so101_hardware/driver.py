"""The SO-101 arm driver core (no ROS): servos <-> joint radians with safety clamps, one cycle at a time.

The node calls ``read()`` and ``command()`` once per control cycle; this class does the bus work (one SYNC_READ,
one SYNC_WRITE), unit conversion through the calibration, clamping to the joint limits and to a maximum step
per cycle, and keeps per-servo health for diagnostics. Bus errors are retried by the bus, then counted here;
a servo that missed a cycle keeps its last known value and is marked stale (the node does not publish it).

A joint resting outside its calibrated range at torque on: the servo clamps Goal_Position into its EEPROM
position limits, so holding it where it is needs those limits opened (done with torque still off); the goal then
walks inside at ``max_step`` per cycle, and the limits are written back after torque off.
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
    consecutive_misses: int = 0  # cycles since the last reply; > 0: the joint's value is stale
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
        self._ramping: set[int] = set()  # joint indices whose goal is still walking into the calibrated range
        self._opened_limits: set[int] = set()  # joint indices whose EEPROM limits are opened until torque off
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
        ticks = self._present_ticks.copy()
        self._ramping = set(self.outside_range(ticks))
        for k in self._ramping:  # torque is still off: opening the limits cannot move anything
            self._write_limits(self.ids[k], 0, P.MAX_TICK)
            self._opened_limits.add(k)
        self.bus.sync_write(P.GOAL_POSITION, {i: int(t) for i, t in zip(self.ids, ticks)})
        for servo_id in self.ids:
            self.bus.write(servo_id, P.TORQUE_ENABLE, 1, strict=False)
        self.torque_on = True
        self.goal = self.calibration.to_radians(ticks)
        return self.goal.copy()

    def outside_range(self, ticks: np.ndarray) -> list[int]:
        """Indices of joints whose ticks lie outside their calibrated range."""
        motors = list(self.calibration.motors.values())
        return [k for k, (m, t) in enumerate(zip(motors, ticks)) if not m.range_min <= t <= m.range_max]

    def _write_limits(self, servo_id: int, low: int, high: int) -> None:
        self.bus.write(servo_id, P.LOCK, 0)
        self.bus.write(servo_id, P.MIN_POSITION_LIMIT, low)
        self.bus.write(servo_id, P.MAX_POSITION_LIMIT, high)
        self.bus.write(servo_id, P.LOCK, 1)

    def disable(self, attempts: int = 3) -> list[str]:
        """Torque off on every servo, each confirmed by reading Torque_Enable back; returns the failures.

        Every servo is tried even when others fail, each up to ``attempts`` times; a failure names the joint.
        Limits opened at ``enable`` are written back once that servo's torque is confirmed off.
        """
        failures = []
        for k, (joint, servo_id) in enumerate(zip(JOINT_NAMES, self.ids)):
            problem = "not tried"
            for _ in range(attempts):
                try:
                    self.bus.write(servo_id, P.TORQUE_ENABLE, 0, strict=False)
                    value = self.bus.read(servo_id, P.TORQUE_ENABLE, strict=False)
                except P.BusError as exc:
                    problem = str(exc)
                    continue
                if value == 0:
                    problem = ""
                    break
                problem = f"Torque_Enable reads {value} after writing 0"
            if problem:
                failures.append(f"{joint} (ID {servo_id}): {problem}")
                continue
            if k in self._opened_limits:
                motor = self.calibration.motors[joint]
                try:
                    self._write_limits(servo_id, motor.range_min, motor.range_max)
                    self._opened_limits.discard(k)
                except P.BusError as exc:
                    failures.append(f"{joint} (ID {servo_id}): position limits not restored ({exc}); "
                                    "the next configure writes them")
        self.torque_on = bool(failures) and self.torque_on
        self.goal = None
        self._ramping.clear()
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
                health.consecutive_misses += 1
                health.last_comm_error = str(result)
                continue
            fb = P.Feedback.decode(result)
            ticks[k], velocity_ticks[k], fresh[k] = fb.position, fb.velocity, True
            health.consecutive_misses = 0
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

        A joint that started outside its calibrated range is not clipped into it (that would jump); its goal
        walks in by ``max_step`` and is clipped like the others from the cycle it got inside. Returns the goal
        actually sent (rad).
        """
        if not self.torque_on or self.goal is None:
            raise P.BusError("command while torque is off (activate the driver first)")
        target = self.limits.clamp(np.asarray(target, dtype=np.float64))
        step = np.clip(target - self.goal, -self.max_step, self.max_step)
        goal = self.goal + step
        ticks = self.calibration.to_ticks(goal, clip=False)
        self._ramping -= {k for k in self._ramping if k not in self.outside_range(ticks)}
        clipped = self.calibration.to_ticks(goal)
        ticks = np.array([t if k in self._ramping else c for k, (t, c) in enumerate(zip(ticks, clipped))])
        ticks = np.clip(ticks, 0, P.MAX_TICK)
        self.bus.sync_write(P.GOAL_POSITION, {i: int(t) for i, t in zip(self.ids, ticks)})
        self.goal = goal
        return goal.copy()

    @property
    def positions(self) -> np.ndarray | None:
        return None if self._positions is None else self._positions.copy()

