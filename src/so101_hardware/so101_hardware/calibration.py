"""Per-joint calibration (no ROS): servo ticks <-> joint radians, YAML files, LeRobot calibration import.

The fields are LeRobot's ({id, drive_mode, homing_offset, range_min, range_max}) so an arm calibrated there works
here unchanged. Present_Position already has Homing_Offset applied by the servo; the mapping to radians is:
- arm joints: zero at the middle of the calibrated range, 4096 ticks per turn, sign flipped by drive_mode
  (the middle pose of the calibration is the zero pose of the URDF);
- gripper: the calibrated range maps linearly onto the gripper joint's URDF limits (closed..open), since the
  jaw is calibrated by its end stops rather than by a middle pose.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES, SERVO_IDS
from so101_common.joints import JointLimits
from so101_hardware.protocol import HOMING_OFFSET_SIGN_BIT, MAX_TICK, TICKS_PER_TURN

FORMAT_VERSION = 1
_FIELDS = ("id", "drive_mode", "homing_offset", "range_min", "range_max")


class CalibrationError(ValueError):
    """A calibration that is missing joints or has impossible values; the message names the joint and field."""


@dataclass(frozen=True)
class MotorCalibration:
    id: int
    drive_mode: int
    homing_offset: int
    range_min: int
    range_max: int

    def check(self, joint: str) -> None:
        if not 1 <= self.id <= 253:
            raise CalibrationError(f"{joint}: id {self.id} is not a servo ID (1..253)")
        if self.drive_mode not in (0, 1):
            raise CalibrationError(f"{joint}: drive_mode must be 0 or 1, got {self.drive_mode}")
        limit = (1 << HOMING_OFFSET_SIGN_BIT) - 1
        if not -limit <= self.homing_offset <= limit:
            raise CalibrationError(f"{joint}: homing_offset {self.homing_offset} outside +-{limit}")
        if not 0 <= self.range_min < self.range_max <= MAX_TICK:
            raise CalibrationError(f"{joint}: need 0 <= range_min < range_max <= {MAX_TICK}, "
                                   f"got {self.range_min}..{self.range_max}")


def _motor_from_mapping(joint: str, data: object) -> MotorCalibration:
    if not isinstance(data, Mapping):
        raise CalibrationError(f"{joint}: expected a mapping with {list(_FIELDS)}, got {type(data).__name__}")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise CalibrationError(f"{joint}: missing fields {missing}")
    try:
        values = {f: int(data[f]) for f in _FIELDS}
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"{joint}: every field must be an integer ({exc})") from exc
    motor = MotorCalibration(**values)
    motor.check(joint)
    return motor


class ArmCalibration:
    """Calibration of the six SO-101 joints, in so101_common.graph.JOINT_NAMES order."""

    def __init__(self, motors: Mapping[str, MotorCalibration], limits: JointLimits | None = None) -> None:
        missing = [n for n in JOINT_NAMES if n not in motors]
        extra = [n for n in motors if n not in JOINT_NAMES]
        if missing or extra:
            raise CalibrationError(f"calibration must name exactly {list(JOINT_NAMES)}; "
                                   f"missing {missing}, unknown {extra}")
        self.motors = {n: motors[n] for n in JOINT_NAMES}
        for name, motor in self.motors.items():
            motor.check(name)
        ids = [m.id for m in self.motors.values()]
        if len(set(ids)) != len(ids):
            raise CalibrationError(f"servo IDs must be distinct, got {ids}")
        self.limits = limits or JointLimits.so101(JOINT_NAMES)
        # rad = scale * ticks + bias, per joint.
        scale, bias = [], []
        for i, (name, m) in enumerate(self.motors.items()):
            sign = -1.0 if m.drive_mode else 1.0
            if name == GRIPPER_JOINT_NAME:
                span = self.limits.upper[i] - self.limits.lower[i]
                s = sign * span / (m.range_max - m.range_min)
                start = m.range_max if m.drive_mode else m.range_min
                scale.append(s)
                bias.append(self.limits.lower[i] - s * start)
            else:
                s = sign * 2.0 * math.pi / TICKS_PER_TURN
                scale.append(s)
                bias.append(-s * (m.range_min + m.range_max) / 2.0)
        self._scale = np.array(scale)
        self._bias = np.array(bias)
        self._tick_min = np.array([m.range_min for m in self.motors.values()], dtype=np.float64)
        self._tick_max = np.array([m.range_max for m in self.motors.values()], dtype=np.float64)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(m.id for m in self.motors.values())

    @classmethod
    def default(cls) -> "ArmCalibration":
        """An uncalibrated arm: IDs from the graph, no offset, full range. For emulators and first tests only."""
        return cls({n: MotorCalibration(i, 0, 0, 0, MAX_TICK) for n, i in zip(JOINT_NAMES, SERVO_IDS)})

    def to_radians(self, ticks: np.ndarray) -> np.ndarray:
        return self._scale * np.asarray(ticks, dtype=np.float64) + self._bias

    def velocity_to_radians(self, ticks_per_s: np.ndarray) -> np.ndarray:
        return self._scale * np.asarray(ticks_per_s, dtype=np.float64)

    def to_ticks(self, radians: np.ndarray, clip: bool = True) -> np.ndarray:
        """Joint radians -> integer Goal_Position ticks, clipped into each joint's calibrated tick range.

        ``clip=False`` only for a joint that must be walked into its range from outside (ArmDriver.command).
        """
        radians = np.asarray(radians, dtype=np.float64)
        if radians.shape != (len(JOINT_NAMES),) or not np.all(np.isfinite(radians)):
            raise ValueError(f"expected {len(JOINT_NAMES)} finite joint positions, got {radians!r}")
        ticks = np.rint((radians - self._bias) / self._scale)
        if clip:
            ticks = np.clip(ticks, self._tick_min, self._tick_max)
        return ticks.astype(np.int64)

    # -- files
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "joints": {n: asdict(m) for n, m in self.motors.items()}}

    def save_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "# SO-101 calibration (so101-calibrate). Fields as in LeRobot: ticks of the STS3215 servos.\n"
        path.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load_yaml(cls, path: str | Path) -> "ArmCalibration":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist (run so101-calibrate)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise CalibrationError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict) or "joints" not in data:
            raise CalibrationError(f"{path}: expected a mapping with a 'joints' key")
        if data.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(f"{path}: format_version {data.get('format_version')!r}, "
                                   f"this code reads {FORMAT_VERSION}")
        joints = data["joints"]
        if not isinstance(joints, dict):
            raise CalibrationError(f"{path}: 'joints' must be a mapping of joint name to fields")
        return cls({n: _motor_from_mapping(n, v) for n, v in joints.items()})

    @classmethod
    def from_lerobot(cls, source: str | Path | Mapping) -> "ArmCalibration":
        """Read LeRobot's calibration JSON ({joint: {id, drive_mode, homing_offset, range_min, range_max}})."""
        if isinstance(source, Mapping):
            data = source
        else:
            path = Path(source)
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CalibrationError(f"cannot read LeRobot calibration {path}: {exc}") from exc
        if not isinstance(data, Mapping):
            raise CalibrationError("a LeRobot calibration is a JSON object of joint name -> fields")
        return cls({n: _motor_from_mapping(n, v) for n, v in data.items()})

    def to_lerobot(self) -> dict:
        return {n: asdict(m) for n, m in self.motors.items()}
