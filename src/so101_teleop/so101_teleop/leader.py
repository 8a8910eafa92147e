"""Leader-arm teleoperation without ROS: a hand-moved SO-101 leader arm in, follower joint targets out.

The leader is a second SO-101 (six STS3215 on its own bus, its own calibration, torque off: it is moved by hand).
``LeaderArm`` reads it with one SYNC_READ per tick through so101_hardware's protocol and driver core;
``Mirror`` turns its joint angles into follower targets: the gripper's calibrated range is mapped onto
[gripper_closed, gripper_open] of the follower, every joint is clamped to the follower's limits, and each new
engagement first walks the follower from where it is to the leader at ``catchup_speed`` (the leader may be far
away: a direct mirror would jump), then mirrors directly. ``Controls`` decides when mirroring is engaged (always,
a key toggle, or a held Joy-Con button) and turns keys/buttons into episode events.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

import numpy as np

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_common.joints import joint_vector, JointLimits
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration, CalibrationError
from so101_hardware.driver import ArmDriver

DEADMAN_SOURCES = ("none", "key", "joy")
# Keys read from stdin (a terminal cannot report a held key, so the deadman key toggles).
KEY_ENGAGE = " "
KEY_START = "s"
KEY_STOP = "e"
KEY_DISCARD = "d"
KEY_HELP = (f"keys: space = start/stop mirroring (deadman:=key), {KEY_START} = start episode, "
            f"{KEY_STOP} = end episode (saved), {KEY_DISCARD} = discard episode")


def load_leader_calibration(path: str | Path) -> ArmCalibration:
    """A LeRobot calibration JSON (``.json``) or a so101-calibrate YAML (``.yaml``/``.yml``) of the leader arm."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".json":
        if not path.is_file():
            raise CalibrationError(f"leader calibration file {path} does not exist (LeRobot keeps it in "
                                   "~/.cache/huggingface/lerobot/calibration/teleoperators/so101_leader/<id>.json)")
        return ArmCalibration.from_lerobot(path)
    if suffix in (".yaml", ".yml"):
        return ArmCalibration.load_yaml(path)
    raise CalibrationError(f"leader calibration file {path}: expected a LeRobot .json or a so101-calibrate .yaml")


class LeaderArm:
    """The leader arm's bus: connect, calibration into the servos, torque off (read back), one SYNC_READ a tick."""

    def __init__(self, bus: P.ServoBus, calibration: ArmCalibration) -> None:
        self.bus = bus
        # ArmDriver brings the ping, EEPROM calibration sync, confirmed torque off and the fault-tolerant
        # SYNC_READ; its command path is never used here (max_step is irrelevant for a leader).
        self.driver = ArmDriver(bus, calibration, max_step=1.0)

    def start(self, write_calibration: bool) -> list[str]:
        """Ping all six servos, sync the calibration, switch torque off; returns the calibration differences.

        Raises BusError naming the servos that are missing or whose torque-off was not confirmed.
        """
        self.driver.connect()
        differences = self.driver.sync_calibration(write=write_calibration)
        self.release()
        return differences

    def release(self) -> None:
        """Torque off on every leader servo, confirmed by reading it back (so the arm can be moved by hand)."""
        failures = self.driver.disable()
        if failures:
            raise P.BusError("leader torque off not confirmed: " + "; ".join(failures))

    def read(self) -> np.ndarray | None:
        """Joint angles (rad) of the leader, or None when a servo did not answer this tick (never a stale value)."""
        reading = self.driver.read()
        return reading.positions if reading.fresh.all() else None


@dataclass(frozen=True)
class MirrorSettings:
    catchup_speed: float = 0.5  # rad/s per joint while walking the follower to the leader after engaging
    sync_tolerance: float = 0.05  # rad: closer than this on every joint ends the catch-up
    gripper_closed: float = float(JointLimits.so101().lower[-1])  # follower gripper at the leader's closed end
    gripper_open: float = float(JointLimits.so101().upper[-1])  # follower gripper at the leader's open end
    max_dt: float = 0.1  # s: a late tick never walks further than this much time's worth

    def check(self, limits: JointLimits) -> None:
        for name in ("catchup_speed", "sync_tolerance", "max_dt"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        g = JOINT_NAMES.index(GRIPPER_JOINT_NAME)
        for name in ("gripper_closed", "gripper_open"):
            value = getattr(self, name)
            if not limits.lower[g] <= value <= limits.upper[g]:
                raise ValueError(f"{name} {value} outside the follower's gripper limits "
                                 f"{limits.lower[g]:.4f}..{limits.upper[g]:.4f} rad")
        if self.gripper_closed == self.gripper_open:
            raise ValueError("gripper_closed and gripper_open must differ")


class Mirror:
    """Leader joint angles -> follower targets (gripper mapped, clamped, catch-up on engagement)."""

    def __init__(self, settings: MirrorSettings, leader_limits: JointLimits | None = None,
                 follower_limits: JointLimits | None = None) -> None:
        self.follower_limits = follower_limits or JointLimits.so101()
        self.leader_limits = leader_limits or JointLimits.so101()
        settings.check(self.follower_limits)
        self.settings = settings
        self.target: np.ndarray | None = None
        self.measured: np.ndarray | None = None
        self.active = False
        self.catching_up = False
        self._last_step: float | None = None
        self._g = JOINT_NAMES.index(GRIPPER_JOINT_NAME)

    def on_follower_state(self, names: Sequence[str], positions: Sequence[float]) -> None:
        """The follower's measured joints (any order, extra joints ignored)."""
        self.measured = joint_vector(names, positions)

    def map(self, leader: np.ndarray) -> np.ndarray:
        """Leader angles -> the follower target they ask for: gripper range mapped, clamped to the limits."""
        leader = np.asarray(leader, dtype=np.float64)
        if leader.shape != (len(JOINT_NAMES),) or not np.all(np.isfinite(leader)):
            raise ValueError(f"expected {len(JOINT_NAMES)} finite leader joint angles, got {leader!r}")
        target = leader.copy()
        g, s = self._g, self.settings
        # The leader's gripper (its calibrated range spans its gripper limits) as a fraction closed..open.
        low, high = self.leader_limits.lower[g], self.leader_limits.upper[g]
        fraction = (leader[g] - low) / (high - low)
        target[g] = s.gripper_closed + float(np.clip(fraction, 0.0, 1.0)) * (s.gripper_open - s.gripper_closed)
        return self.follower_limits.clamp(target)

    def step(self, now: float, leader: np.ndarray | None, engaged: bool) -> np.ndarray | None:
        """The follower target for this tick, or None when nothing should be sent.

        Disengaging sends one last target (hold where it is) and then nothing. Engaging needs the follower's
        measured position (the catch-up starts there). A tick without a complete leader reading sends nothing:
        the follower keeps its last target.
        """
        dt = 0.0 if self._last_step is None else min(max(0.0, now - self._last_step), self.settings.max_dt)
        self._last_step = now
        if not engaged:
            if self.active:
                self.active = False
                return self.target.copy()
            return None
        if not self.active:
            if self.measured is None or leader is None:
                return None
            self.active = True
            self.catching_up = True
            self.target = self.follower_limits.clamp(self.measured)
        if leader is None:
            return None
        wanted = self.map(leader)
        if self.catching_up and np.max(np.abs(wanted - self.target)) <= self.settings.sync_tolerance:
            self.catching_up = False  # close enough: the last jump is at most sync_tolerance
        if self.catching_up:
            reach = self.settings.catchup_speed * dt
            self.target = self.target + np.clip(wanted - self.target, -reach, reach)
        else:
            self.target = wanted
        return self.target.copy()


class Control(str, Enum):
    ENGAGE = "engage"
    DISENGAGE = "disengage"
    START_EPISODE = "start_episode"
    STOP_EPISODE = "stop_episode"
    DISCARD_EPISODE = "discard_episode"


@dataclass(frozen=True)
class ButtonMap:
    """Joy-Con buttons (sensor_msgs/Joy indices, joy_node numbering; -1 disables). Defaults: the Joy-Con teleop's."""

    button_deadman: int = 5  # R: hold to mirror (deadman:=joy)
    button_start_episode: int = 8  # +
    button_stop_episode: int = 6  # SR
    button_discard_episode: int = 4  # SL

    def __post_init__(self) -> None:
        used: dict[int, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < -1:
                raise ValueError(f"{f.name} must be a button index >= 0 (or -1 to disable), got {value!r}")
            if value >= 0 and value in used:
                raise ValueError(f"{f.name} and {used[value]} both use button {value}")
            used[value] = f.name


class Controls:
    """Engagement (deadman) and episode events from keys and Joy-Con buttons."""

    def __init__(self, deadman: str, buttons: ButtonMap, joy_timeout_s: float) -> None:
        if deadman not in DEADMAN_SOURCES:
            raise ValueError(f"deadman must be one of {DEADMAN_SOURCES}, got {deadman!r}")
        if not joy_timeout_s > 0:
            raise ValueError(f"joy_timeout_s must be > 0, got {joy_timeout_s}")
        self.deadman = deadman
        self.buttons = buttons
        self.joy_timeout_s = joy_timeout_s
        self._key_engaged = False
        self._pressed: set[int] = set()
        self._joy_time: float | None = None
        self._was_engaged = False

    def on_key(self, key: str) -> list[Control]:
        """One character from stdin -> the events it triggers (unknown keys: none)."""
        if key == KEY_ENGAGE and self.deadman == "key":
            self._key_engaged = not self._key_engaged
            return []  # the engage/disengage event comes from engaged() at the next tick
        return {KEY_START: [Control.START_EPISODE], KEY_STOP: [Control.STOP_EPISODE],
                KEY_DISCARD: [Control.DISCARD_EPISODE]}.get(key.lower(), [])

    def on_joy(self, now: float, buttons: Sequence[int]) -> list[Control]:
        """One Joy message -> episode events on press (not while held); updates the deadman button."""
        pressed = {i for i, b in enumerate(buttons) if b}
        new = pressed - self._pressed
        self._pressed = pressed
        self._joy_time = now
        b = self.buttons
        return [event for event, index in ((Control.START_EPISODE, b.button_start_episode),
                                           (Control.STOP_EPISODE, b.button_stop_episode),
                                           (Control.DISCARD_EPISODE, b.button_discard_episode))
                if index >= 0 and index in new]

    def engaged(self, now: float) -> bool:
        if self.deadman == "none":
            return True
        if self.deadman == "key":
            return self._key_engaged
        fresh = self._joy_time is not None and now - self._joy_time <= self.joy_timeout_s
        return fresh and self.buttons.button_deadman in self._pressed

    def transitions(self, now: float) -> tuple[bool, list[Control]]:
        """(engaged now, [ENGAGE] or [DISENGAGE] when that changed since the last call, else [])."""
        engaged = self.engaged(now)
        events = [] if engaged == self._was_engaged else [Control.ENGAGE if engaged else Control.DISENGAGE]
        self._was_engaged = engaged
        return engaged, events
