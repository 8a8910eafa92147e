"""evdev -> Joy in joy_node's numbering, fed with evdev event sequences (there is no /dev/uinput here).

data/joycon_right_session.evtest is a session in the text format `evtest` prints (device header, then events):
a right Joy-Con under hid-nintendo with the key codes and stick ranges that driver declares. It was composed from
those declarations, not captured from a physical Joy-Con (none is attached here); a user's own `evtest` log
replays the same way.
"""
from __future__ import annotations

from pathlib import Path

import evdev
import pytest
from evdev import AbsInfo, InputEvent, ecodes

from so101_teleop.joy_evdev import (AxisRange, EvdevError, Feed, JoyLayout, JoyState, joy_axis_value, parse_evtest,
                                    replay, sdl_axis_value)
from so101_teleop.teleop import JoyMapping

SESSION = Path(__file__).parent / "data" / "joycon_right_session.evtest"


def test_joycon_numbering_is_the_one_the_teleop_map_expects() -> None:
    layout = parse_evtest(SESSION.read_text()).layout
    assert layout.name == "Nintendo Switch Right Joy-Con"
    names = [ecodes.BTN[code] for code in layout.buttons]
    m = JoyMapping()  # config/teleop_joycon.yaml's defaults
    assert "BTN_TR" in names[m.button_deadman] and "BTN_START" in names[m.button_start_episode]
    assert "BTN_TL2" in names[m.button_stop_episode] and "BTN_TL" in names[m.button_discard_episode]
    assert "BTN_MODE" in names[m.button_home] and "BTN_SOUTH" in names[m.button_gripper_close]
    assert "BTN_TR2" in names[m.button_shift] and len(layout.buttons) == 11
    assert layout.axes == (ecodes.ABS_RX, ecodes.ABS_RY) and layout.n_axes == 2


def test_session_replays_as_joy_node_would_publish_it() -> None:
    messages = list(replay(parse_evtest(SESSION.read_text())))
    m = JoyMapping()
    first_axes, first_buttons = messages[0][1], messages[0][2]
    assert first_buttons[m.button_deadman] == 1 and first_axes == [0.0, 0.0]  # R pressed; the stick at rest is 0
    xs = [axes[0] for _, axes, _ in messages]
    assert xs[1:4] == sorted(xs[1:4]) and xs[3] == pytest.approx(1.0)  # pushed left: +1 (joy_node: left positive)
    assert 0.0 < xs[1] < 0.3
    # The 60 jittery reports while the stick is held stay inside the deadzone: no message from them.
    held = [msg for msg in messages if msg[1][0] == pytest.approx(1.0)]
    assert len(held) == 1
    released = next(msg for msg in messages if msg[2][m.button_deadman] == 0)
    assert released[1] == [0.0, 0.0]
    starts = [b[m.button_start_episode] for _, _, b in messages]
    assert starts.count(1) == 1 and starts[-1] == 0
    # Events between SYN_DROPPED and the next SYN_REPORT are dropped: the B press in there never shows.
    assert all(b[m.button_gripper_close] == 0 for _, _, b in messages)
    ys = [axes[1] for _, axes, _ in messages]
    assert ys[-2] == pytest.approx(-1.0) and ys[-1] == 0.0  # kernel +32767 (down) -> -1
    assert len(messages) == 11


def test_python_evdev_capabilities_hats_and_sdl_button_order() -> None:
    """A gamepad with a hat and keys below BTN_JOYSTICK, described and driven with python-evdev's own types."""
    capabilities = {
        ecodes.EV_KEY: [ecodes.BTN_SOUTH, ecodes.BTN_EAST, ecodes.KEY_BACK, ecodes.BTN_TRIGGER],
        ecodes.EV_ABS: [(ecodes.ABS_X, AbsInfo(128, 0, 255, 0, 15, 0)),
                        (ecodes.ABS_HAT0Y, AbsInfo(0, -1, 1, 0, 0, 0)),
                        (ecodes.ABS_HAT0X, AbsInfo(0, -1, 1, 0, 0, 0)),
                        (ecodes.ABS_RZ, AbsInfo(0, 0, 1023, 0, 0, 0))],
    }
    layout = JoyLayout.from_evdev("pad", capabilities)
    # SDL: codes from BTN_JOYSTICK up first (BTN_TRIGGER 0x120, BTN_SOUTH, BTN_EAST), then lower ones (KEY_BACK).
    assert layout.buttons == (ecodes.BTN_TRIGGER, ecodes.BTN_SOUTH, ecodes.BTN_EAST, ecodes.KEY_BACK)
    assert layout.axes == (ecodes.ABS_X, ecodes.ABS_RZ) and layout.hats == (0,) and layout.n_axes == 4
    state = JoyState(layout, deadzone=0.0)
    state.resync([ecodes.KEY_BACK], {ecodes.ABS_X: 128, ecodes.ABS_RZ: 0})
    assert state.buttons == [0, 0, 0, 1] and state.axes[0] == pytest.approx(-128 / 32767)  # 0..255 has no centre
    assert state.axes[1] == pytest.approx(1.0)  # at its minimum: SDL -32768 -> joy_node +1
    events = [InputEvent(1, 0, ecodes.EV_ABS, ecodes.ABS_HAT0X, -1),
              InputEvent(1, 0, ecodes.EV_ABS, ecodes.ABS_HAT0Y, 1),
              InputEvent(1, 0, ecodes.EV_KEY, ecodes.BTN_SOUTH, 1), InputEvent(1, 0, ecodes.EV_ABS, ecodes.ABS_X, 255)]
    assert [state.feed(e.type, e.code, e.value) for e in events] == [Feed.NOTHING] * 4  # nothing until SYN_REPORT
    assert state.feed(ecodes.EV_SYN, ecodes.SYN_REPORT, 0) is Feed.PUBLISH
    assert state.axes[2:] == [1.0, -1.0]  # hat left -> +1, hat down -> -1
    assert state.buttons == [0, 1, 0, 1] and state.axes[0] == pytest.approx(-1.0)
    assert state.feed(ecodes.EV_SYN, ecodes.SYN_REPORT, 0) is Feed.NOTHING  # no change, no message
    assert state.feed(ecodes.EV_SYN, ecodes.SYN_DROPPED, 0) is Feed.NOTHING
    assert state.feed(ecodes.EV_KEY, ecodes.BTN_EAST, 1) is Feed.NOTHING
    assert state.feed(ecodes.EV_SYN, ecodes.SYN_REPORT, 0) is Feed.RESYNC and state.buttons[2] == 0
    assert evdev.InputDevice  # the real module, whose classes the node uses on a device


def test_axis_scaling_matches_sdl_and_joy_node() -> None:
    stick = AxisRange(-32767, 32767)
    assert sdl_axis_value(0, stick) == 0 and sdl_axis_value(32767, stick) == 32767
    assert sdl_axis_value(-32767, stick) == -32768
    assert joy_axis_value(-32768, 0.05) == pytest.approx(1.0) and joy_axis_value(32767, 0.05) == pytest.approx(-1.0)
    assert joy_axis_value(1500, 0.05) == 0.0  # inside 0.05 * 32767
    assert joy_axis_value(-(1638.35 + 31128.65 / 2), 0.05) == pytest.approx(0.5)  # rescaled outside the deadzone
    assert sdl_axis_value(500, AxisRange(0, 255)) == 32767  # beyond the declared range: clamped


def test_bad_recordings_and_devices_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(EvdevError, match="no 'Input device name:' line"):
        parse_evtest("Event: time 1.000000, type 1 (EV_KEY), code 304 (BTN_SOUTH), value 1\n", "x.log")
    with pytest.raises(EvdevError, match="x.log line 2: not an evtest event line"):
        parse_evtest('Input device name: "pad"\nEvent: time 1.0 type garbage\n', "x.log")
    with pytest.raises(EvdevError, match="'keyboard' has no buttons and no axes"):
        JoyLayout.from_capabilities("keyboard", [], {})
    with pytest.raises(EvdevError, match="deadzone must be in"):
        JoyState(parse_evtest(SESSION.read_text()).layout, deadzone=1.0)
