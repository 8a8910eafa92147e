"""Linux evdev input events -> sensor_msgs/Joy values numbered as the distro's joy_node numbers them (no ROS here).

Why: without a ROS distro there is no joy_node, and so101_teleop's button map (config/teleop_joycon.yaml) is in
joy_node's numbering. joy_node reads the device through SDL2's Linux joystick backend, which numbers
- buttons: the device's key codes from BTN_JOYSTICK (0x120) upwards in ascending order, then those below it;
- axes: the absolute axes in ascending code order, hats (ABS_HAT0X..ABS_HAT3Y) left out, then two axes per hat;
and joy_node reports each axis scaled to [-1, 1] with its deadzone cut out and the sign flipped (left/up positive,
the kernel's right/down positive). A hat gives +1 left / -1 right and +1 up / -1 down.

``JoyLayout`` is that numbering for one device (from python-evdev's capabilities or an ``evtest`` log);
``JoyState`` takes raw events and says when a Joy message is due (after each SYN_REPORT that changed something) or
when events were dropped (SYN_DROPPED: the caller re-reads the device's state). ``parse_evtest`` reads the text
that ``evtest /dev/input/eventN`` prints, so a session recorded on any machine can be replayed here.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum

EV_SYN, EV_KEY, EV_ABS = 0x00, 0x01, 0x03
SYN_REPORT, SYN_DROPPED = 0, 3
BTN_JOYSTICK = 0x120
KEY_MAX = 0x2FF
ABS_HAT0X, ABS_HAT3Y = 0x10, 0x17
SDL_AXIS_MIN, SDL_AXIS_MAX = -32768, 32767


class EvdevError(ValueError):
    """A device or recording that cannot be read as a joystick; the message names what is wrong."""


@dataclass(frozen=True)
class AxisRange:
    minimum: int
    maximum: int


@dataclass(frozen=True)
class JoyLayout:
    """Which evdev code sits at which Joy index."""

    name: str
    buttons: tuple[int, ...]  # key codes, in Joy button order
    axes: tuple[int, ...]  # absolute-axis codes without hats, in Joy axis order
    hats: tuple[int, ...]  # hat numbers 0..3 present, in order (each adds two axes after ``axes``)
    ranges: Mapping[int, AxisRange] = field(default_factory=dict)

    @classmethod
    def from_capabilities(cls, name: str, keys: Iterable[int], absolute: Mapping[int, AxisRange]) -> "JoyLayout":
        keys = sorted(set(keys))
        if not keys and not absolute:
            raise EvdevError(f"input device {name!r} has no buttons and no axes: not a joystick")
        buttons = tuple(k for k in keys if BTN_JOYSTICK <= k < KEY_MAX) + tuple(k for k in keys if k < BTN_JOYSTICK)
        axes = tuple(c for c in sorted(absolute) if not ABS_HAT0X <= c <= ABS_HAT3Y)
        hats = tuple(h for h in range(4) if ABS_HAT0X + 2 * h in absolute or ABS_HAT0X + 2 * h + 1 in absolute)
        return cls(name, buttons, axes, hats, dict(absolute))

    @classmethod
    def from_evdev(cls, name: str, capabilities: Mapping[int, list]) -> "JoyLayout":
        """From python-evdev's ``InputDevice.capabilities(absinfo=True)``:
        {EV_KEY: [codes], EV_ABS: [(code, AbsInfo)]}."""
        absolute = {code: AxisRange(info.min, info.max) for code, info in capabilities.get(EV_ABS, [])}
        return cls.from_capabilities(name, capabilities.get(EV_KEY, []), absolute)

    @property
    def n_axes(self) -> int:
        return len(self.axes) + 2 * len(self.hats)


def sdl_axis_value(value: int, axis: AxisRange) -> int:
    """A kernel axis value as SDL2 reports it: its [min, max] stretched linearly onto [-32768, 32767]."""
    if axis.maximum == axis.minimum:
        return int(value)
    scaled = (value - axis.minimum) * (SDL_AXIS_MAX - SDL_AXIS_MIN) / (axis.maximum - axis.minimum) + SDL_AXIS_MIN
    return max(SDL_AXIS_MIN, min(SDL_AXIS_MAX, math.floor(scaled + 0.5)))


def joy_axis_value(sdl_value: int, deadzone: float) -> float:
    """joy_node's conversion: deadzone cut out (the rest rescaled to reach 1.0), sign flipped, in [-1, 1]."""
    value = float(max(sdl_value, -SDL_AXIS_MAX))
    dead = SDL_AXIS_MAX * deadzone
    if value > dead:
        value -= dead
    elif value < -dead:
        value += dead
    else:
        return 0.0
    return -value / (1.0 - deadzone) / SDL_AXIS_MAX


class Feed(str, Enum):
    NOTHING = "nothing"
    PUBLISH = "publish"  # a complete report changed the state
    RESYNC = "resync"  # events were dropped: read the device's state and call ``resync``


class JoyState:
    """The Joy message of one device, updated event by event."""

    def __init__(self, layout: JoyLayout, deadzone: float = 0.05) -> None:
        if not 0.0 <= deadzone < 1.0:
            raise EvdevError(f"deadzone must be in [0, 1), got {deadzone}")
        self.layout = layout
        self.deadzone = deadzone
        self.axes = [0.0] * layout.n_axes
        self.buttons = [0] * len(layout.buttons)
        self._button_index = {code: i for i, code in enumerate(layout.buttons)}
        self._axis_index = {code: i for i, code in enumerate(layout.axes)}
        self._changed = False
        self._dropping = False

    def _set_abs(self, code: int, value: int) -> bool:
        if code in self._axis_index:
            new = joy_axis_value(sdl_axis_value(value, self.layout.ranges[code]), self.deadzone)
            index = self._axis_index[code]
        elif ABS_HAT0X <= code <= ABS_HAT3Y and (code - ABS_HAT0X) // 2 in self.layout.hats:
            hat, vertical = divmod(code - ABS_HAT0X, 2)
            index = len(self.layout.axes) + 2 * self.layout.hats.index(hat) + vertical
            new = -1.0 if value > 0 else (1.0 if value < 0 else 0.0)  # left/up positive
        else:
            return False
        changed = self.axes[index] != new
        self.axes[index] = new
        return changed

    def feed(self, ev_type: int, code: int, value: int) -> Feed:
        """One raw event (type, code, value) -> what the caller should do now."""
        if ev_type == EV_SYN:
            if code == SYN_DROPPED:
                self._dropping = True
                return Feed.NOTHING
            if code == SYN_REPORT:
                if self._dropping:
                    self._dropping = False
                    return Feed.RESYNC
                changed, self._changed = self._changed, False
                return Feed.PUBLISH if changed else Feed.NOTHING
            return Feed.NOTHING
        if self._dropping:
            return Feed.NOTHING
        if ev_type == EV_KEY and code in self._button_index:
            pressed = int(value != 0)  # 2 (autorepeat) counts as held
            index = self._button_index[code]
            self._changed |= self.buttons[index] != pressed
            self.buttons[index] = pressed
        elif ev_type == EV_ABS:
            self._changed |= self._set_abs(code, value)
        return Feed.NOTHING

    def resync(self, pressed_keys: Iterable[int], abs_values: Mapping[int, int]) -> None:
        """Replace the state with the device's own (after opening it or after SYN_DROPPED)."""
        pressed = set(pressed_keys)
        self.buttons = [int(code in pressed) for code in self.layout.buttons]
        self.axes = [0.0] * self.layout.n_axes
        for code, value in abs_values.items():
            self._set_abs(code, value)
        self._changed = False
        self._dropping = False


@dataclass(frozen=True)
class RecordedEvent:
    time: float  # s, the kernel's timestamp
    type: int
    code: int
    value: int


@dataclass(frozen=True)
class Recording:
    layout: JoyLayout
    initial_abs: Mapping[int, int]
    events: tuple[RecordedEvent, ...]


_NAME = re.compile(r'^Input device name: "(.*)"')
_TYPE = re.compile(r"^\s+Event type (\d+) ")
_CODE = re.compile(r"^\s+Event code (\d+) ")
_FIELD = re.compile(r"^\s+(Value|Min|Max|Fuzz|Flat|Resolution)\s+(-?\d+)")
_EVENT = re.compile(r"^Event: time (\d+)\.(\d+), type (\d+) \([^)]*\), code (\d+) \([^)]*\), value (-?\d+)")
_SYN = re.compile(r"^Event: time (\d+)\.(\d+), -+ (SYN_REPORT|SYN_DROPPED) -+")


def parse_evtest(text: str, source: str = "evtest log") -> Recording:
    """Read ``evtest``'s output: the device header (name, keys, axis ranges) and the events that followed."""
    name, ev_type, code = "", None, None
    keys: list[int] = []
    fields: dict[int, dict[str, int]] = {}
    events: list[RecordedEvent] = []
    for number, line in enumerate(text.splitlines(), 1):
        if match := _NAME.match(line):
            name = match.group(1)
        elif match := _EVENT.match(line):
            sec, usec, t, c, v = match.groups()
            events.append(RecordedEvent(int(sec) + int(usec) / 1e6, int(t), int(c), int(v)))
        elif match := _SYN.match(line):
            sec, usec, kind = match.groups()
            events.append(RecordedEvent(int(sec) + int(usec) / 1e6, EV_SYN,
                                        SYN_REPORT if kind == "SYN_REPORT" else SYN_DROPPED, 0))
        elif match := _TYPE.match(line):
            ev_type, code = int(match.group(1)), None
        elif match := _CODE.match(line):
            code = int(match.group(1))
            if ev_type == EV_KEY:
                keys.append(code)
            elif ev_type == EV_ABS:
                fields[code] = {}
        elif (match := _FIELD.match(line)) and ev_type == EV_ABS and code is not None:
            fields[code][match.group(1)] = int(match.group(2))
        elif line.startswith("Event:") and "time" in line:
            raise EvdevError(f"{source} line {number}: not an evtest event line: {line.strip()!r}")
    if not name:
        raise EvdevError(f"{source}: no 'Input device name:' line (record with `evtest /dev/input/eventN`)")
    missing = [c for c, f in fields.items() if "Min" not in f or "Max" not in f]
    if missing:
        raise EvdevError(f"{source}: axes {missing} have no Min/Max lines")
    ranges = {c: AxisRange(f["Min"], f["Max"]) for c, f in fields.items()}
    layout = JoyLayout.from_capabilities(name, keys, ranges)
    return Recording(layout, {c: f.get("Value", 0) for c, f in fields.items()}, tuple(events))


def replay(recording: Recording, deadzone: float = 0.05) -> Iterator[tuple[float, list[float], list[int]]]:
    """(event time, axes, buttons) of every Joy message the recording produces, in order."""
    state = JoyState(recording.layout, deadzone)
    state.resync([], recording.initial_abs)
    for event in recording.events:
        if state.feed(event.type, event.code, event.value) is Feed.PUBLISH:
            yield event.time, list(state.axes), list(state.buttons)
