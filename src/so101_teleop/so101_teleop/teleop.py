"""Joy-Con teleoperation logic without ROS: Joy axes/buttons in, joint position targets out.

A target is only produced while the deadman button is held and Joy messages are fresh; when either stops,
one last target (hold where the command is now) is produced and then nothing, so the controller stops the arm.
On each new engagement the target restarts from the measured joint positions, so the arm never jumps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

import numpy as np
import yaml

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_common.joints import joint_vector, JointLimits, home_vector
from so101_common.kinematics import ArmKinematics

# Joint jog: the stick's (x, y) axes drive one pair of joints; the group button cycles through the pairs.
JOINT_GROUPS: tuple[tuple[str, str], ...] = (
    ("shoulder_pan", "shoulder_lift"),
    ("wrist_roll", "elbow_flex"),
    ("wrist_roll", "wrist_flex"),
)


class JoyError(ValueError):
    """A Joy message that does not fit the configured mapping (too few axes or buttons, NaN axes)."""


@dataclass(frozen=True)
class JoyMapping:
    """Axis and button indices of sensor_msgs/Joy. Defaults: a right Joy-Con under hid-nintendo + joy_node.

    Button indices follow the kernel key codes in ascending order (how SDL numbers them):
    0 B, 1 A, 2 X, 3 Y, 4 SL, 5 R, 6 SR, 7 ZR, 8 +, 9 Home, 10 stick press. Axes: 0 stick x, 1 stick y
    (joy_node reports left and up as positive). -1 disables a button.
    """

    axis_x: int = 0
    axis_y: int = 1
    invert_x: bool = False
    invert_y: bool = False
    deadzone: float = 0.15
    button_deadman: int = 5
    button_shift: int = 7
    button_mode: int = 2
    button_joint_group: int = 3
    button_gripper_open: int = 1
    button_gripper_close: int = 0
    button_home: int = 9
    button_start_episode: int = 8
    button_stop_episode: int = 6
    button_discard_episode: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("axis_") and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{f.name} must be an axis index >= 0, got {value!r}")
            if f.name.startswith("button_") and (not isinstance(value, int) or value < -1):
                raise ValueError(f"{f.name} must be a button index >= 0 (or -1 to disable), got {value!r}")
        if self.button_deadman < 0:
            raise ValueError("button_deadman cannot be disabled: motion needs a deadman button")
        if not 0.0 <= self.deadzone < 1.0:
            raise ValueError(f"deadzone must be in [0, 1), got {self.deadzone}")
        used = [(f.name, getattr(self, f.name)) for f in fields(self)
                if f.name.startswith("button_") and getattr(self, f.name) >= 0]
        seen: dict[int, str] = {}
        for name, index in used:
            if index in seen:
                raise ValueError(f"{name} and {seen[index]} both use button {index}")
            seen[index] = name

    @classmethod
    def from_dict(cls, values: dict) -> "JoyMapping":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown Joy mapping keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, node_name: str = "teleop") -> "JoyMapping":
        """Read the mapping keys from a ROS parameter file (``<node>: ros__parameters: {...}``)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        params = data.get(node_name, data.get(f"/{node_name}", {})).get("ros__parameters")
        if not isinstance(params, dict):
            raise ValueError(f"{path} has no '{node_name}: ros__parameters:' block")
        names = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in params.items() if k in names})

    def max_button(self) -> int:
        return max(getattr(self, f.name) for f in fields(self) if f.name.startswith("button_"))


@dataclass(frozen=True)
class TeleopSettings:
    joy_timeout_s: float = 0.25
    joint_speed: float = 0.8  # rad/s at full stick
    cartesian_speed: float = 0.08  # m/s at full stick
    roll_speed: float = 1.2  # rad/s, wrist roll in Cartesian mode (shift + stick x)
    gripper_speed: float = 1.5  # rad/s
    home_speed: float = 0.6  # rad/s, per joint
    damping: float = 0.02
    max_dt: float = 0.1  # a late tick never moves further than this much time's worth

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)}")


class Mode(str, Enum):
    JOINT = "joint"
    CARTESIAN = "cartesian"


class Event(str, Enum):
    START_EPISODE = "start_episode"
    STOP_EPISODE = "stop_episode"
    DISCARD_EPISODE = "discard_episode"
    MODE = "mode"
    JOINT_GROUP = "joint_group"
    HOME = "home"


class TeleopCore:
    def __init__(self, mapping: JoyMapping, settings: TeleopSettings, kinematics: ArmKinematics,
                 limits: JointLimits | None = None) -> None:
        self.mapping = mapping
        self.settings = settings
        self.kin = kinematics
        self.limits = limits or JointLimits.so101()
        self.mode = Mode.JOINT
        self.group = 0
        self.homing = False
        self.target: np.ndarray | None = None
        self.measured: np.ndarray | None = None
        self._active = False
        self._joy_time: float | None = None
        self._axes = np.zeros(2)
        self._buttons: set[int] = set()
        self._last_step: float | None = None
        self._gripper = JOINT_NAMES.index(GRIPPER_JOINT_NAME)
        self._home = self.limits.clamp(home_vector())

    def on_joint_states(self, names: Sequence[str], positions: Sequence[float]) -> None:
        """Store the measured positions (a JointState may list joints in any order, or more joints)."""
        self.measured = joint_vector(names, positions)

    def on_joy(self, now: float, axes: Sequence[float], buttons: Sequence[int]) -> list[Event]:
        """Take one Joy message; returns the button events it triggers (on press, not while held)."""
        m = self.mapping
        needed_axes = max(m.axis_x, m.axis_y) + 1
        if len(axes) < needed_axes:
            raise JoyError(f"Joy message has {len(axes)} axes; the mapping uses axis index {needed_axes - 1}")
        if len(buttons) <= m.max_button():
            raise JoyError(f"Joy message has {len(buttons)} buttons; the mapping uses button index "
                           f"{m.max_button()}")
        raw = np.array([axes[m.axis_x], axes[m.axis_y]], dtype=np.float64)
        if not np.all(np.isfinite(raw)):
            raise JoyError(f"Joy axes contain NaN or inf: {raw.tolist()}")
        raw = np.clip(raw * [-1.0 if m.invert_x else 1.0, -1.0 if m.invert_y else 1.0], -1.0, 1.0)
        # Rescale outside the dead zone so the commanded speed starts at 0 and still reaches full scale.
        mag = np.abs(raw)
        self._axes = np.where(mag > m.deadzone, np.sign(raw) * (mag - m.deadzone) / (1.0 - m.deadzone), 0.0)
        pressed = {i for i, b in enumerate(buttons) if b}
        new = pressed - self._buttons
        self._buttons = pressed
        self._joy_time = now
        events = []
        for event, index in ((Event.START_EPISODE, m.button_start_episode),
                             (Event.STOP_EPISODE, m.button_stop_episode),
                             (Event.DISCARD_EPISODE, m.button_discard_episode),
                             (Event.MODE, m.button_mode), (Event.JOINT_GROUP, m.button_joint_group),
                             (Event.HOME, m.button_home)):
            if index >= 0 and index in new:
                events.append(event)
        if Event.MODE in events:
            self.mode = Mode.CARTESIAN if self.mode is Mode.JOINT else Mode.JOINT
        if Event.JOINT_GROUP in events:
            self.group = (self.group + 1) % len(JOINT_GROUPS)
        if Event.HOME in events:
            self.homing = True
        return events

    def held(self, index: int) -> bool:
        return index >= 0 and index in self._buttons

    def engaged(self, now: float) -> bool:
        fresh = self._joy_time is not None and now - self._joy_time <= self.settings.joy_timeout_s
        return fresh and self.held(self.mapping.button_deadman)

    def step(self, now: float) -> np.ndarray | None:
        """Target for this control tick, or None when nothing should be sent."""
        dt = 0.0 if self._last_step is None else min(max(0.0, now - self._last_step), self.settings.max_dt)
        self._last_step = now
        if self.measured is None:
            return None
        if not self.engaged(now):
            self.homing = False
            if self._active:
                self._active = False
                return self.target.copy()  # stop: hold the last commanded position
            return None
        if not self._active:
            self._active = True
            self.target = self.limits.clamp(self.measured)
        assert self.target is not None
        if self.homing:
            self.target = self._toward_home(dt)
        else:
            self.target = self._jog(dt)
        grip = float(self.held(self.mapping.button_gripper_open)) - float(self.held(self.mapping.button_gripper_close))
        self.target[self._gripper] += grip * self.settings.gripper_speed * dt
        self.target = self.limits.clamp(self.target)
        return self.target.copy()

    def _toward_home(self, dt: float) -> np.ndarray:
        delta = self._home - self.target
        step = np.clip(delta, -self.settings.home_speed * dt, self.settings.home_speed * dt)
        target = self.target + step
        if np.max(np.abs(self._home - target)) < 1e-6:
            self.homing = False
        return target

    def _jog(self, dt: float) -> np.ndarray:
        x, y = self._axes
        target = self.target.copy()
        if self.mode is Mode.JOINT:
            jx, jy = JOINT_GROUPS[self.group]
            target[JOINT_NAMES.index(jx)] += x * self.settings.joint_speed * dt
            target[JOINT_NAMES.index(jy)] += y * self.settings.joint_speed * dt
            return target
        if self.held(self.mapping.button_shift):
            dx = np.array([0.0, 0.0, y]) * self.settings.cartesian_speed * dt
            target[JOINT_NAMES.index("wrist_roll")] += x * self.settings.roll_speed * dt
        else:
            # Stick forward -> +x (away from the base), stick left -> +y (REP 103 base frame).
            dx = np.array([y, x, 0.0]) * self.settings.cartesian_speed * dt
        if np.any(dx):
            target = self.kin.ik_step(target, dx, self.settings.damping)
        return target
