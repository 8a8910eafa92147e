"""The teleop core alone: deadman, timeout, joint and Cartesian jog, limits, gripper, home, button events."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits, home_vector
from so101_common.kinematics import ArmKinematics
from so101_teleop.kinematics import default_urdf_path
from so101_teleop.teleop import Event, JoyError, JoyMapping, Mode, TeleopCore, TeleopSettings

CONFIG = Path(__file__).resolve().parents[3] / "config" / "teleop_joycon.yaml"
M = JoyMapping()
N_BUTTONS = 11


@pytest.fixture(scope="module")
def kin() -> ArmKinematics:
    return ArmKinematics.from_file(default_urdf_path())


@pytest.fixture
def core(kin: ArmKinematics) -> TeleopCore:
    c = TeleopCore(M, TeleopSettings(), kin)
    c.on_joint_states(list(reversed(JOINT_NAMES)), list(reversed(home_vector().tolist())))
    return c


def joy(core: TeleopCore, t: float, x: float = 0.0, y: float = 0.0, pressed: tuple[int, ...] = ()) -> list[Event]:
    buttons = [1 if i in pressed else 0 for i in range(N_BUTTONS)]
    return core.on_joy(t, [x, y], buttons)


def run(core: TeleopCore, t0: float, seconds: float, rate: float = 50.0, **kw) -> tuple[float, np.ndarray | None]:
    """Joy + control ticks at ``rate`` for ``seconds``; returns the time reached and the last target."""
    t, target = t0, None
    for _ in range(int(seconds * rate)):
        t += 1.0 / rate
        joy(core, t, **kw)
        target = core.step(t)
    return t, target


def test_config_file_is_the_documented_default() -> None:
    assert JoyMapping.from_yaml(CONFIG) == JoyMapping()


def test_mapping_validation() -> None:
    with pytest.raises(ValueError, match="button_mode and button_deadman both use button 5"):
        JoyMapping(button_mode=5)
    with pytest.raises(ValueError, match="button_deadman cannot be disabled"):
        JoyMapping(button_deadman=-1)
    with pytest.raises(ValueError, match="unknown Joy mapping keys \\['button_fly'\\]"):
        JoyMapping.from_dict({"button_fly": 3})
    with pytest.raises(ValueError, match="axis_x must be an axis index"):
        JoyMapping(axis_x=-1)
    with pytest.raises(ValueError, match="joint_speed must be > 0"):
        TeleopSettings(joint_speed=0.0)


def test_nothing_without_joint_state_or_deadman(kin: ArmKinematics) -> None:
    c = TeleopCore(M, TeleopSettings(), kin)
    joy(c, 0.0, x=1.0, pressed=(M.button_deadman,))
    assert c.step(0.01) is None, "no target before the first joint state"
    c.on_joint_states(JOINT_NAMES, home_vector())
    _, target = run(c, 0.0, 0.5, x=1.0)
    assert target is None, "no target without the deadman"


def test_joint_jog_speed_and_stop_on_release(core: TeleopCore) -> None:
    t, target = run(core, 0.0, 1.0, x=1.0, y=-0.5, pressed=(M.button_deadman,))
    moved = target - home_vector()
    speed = TeleopSettings().joint_speed
    # 50 ticks over 0.98 s of motion (the first tick syncs to the measured position).
    assert moved[0] == pytest.approx(speed * 0.98, rel=0.02)
    scaled_y = -(0.5 - M.deadzone) / (1 - M.deadzone)
    assert moved[1] == pytest.approx(speed * 0.98 * scaled_y, rel=0.02)
    assert np.allclose(moved[2:], 0.0)
    joy(core, t + 0.02, x=1.0)  # deadman released
    hold = core.step(t + 0.02)
    assert np.array_equal(hold, target), "release sends one hold at the current target"
    assert core.step(t + 0.04) is None


def test_joy_timeout_stops(core: TeleopCore) -> None:
    t, target = run(core, 0.0, 0.3, x=1.0, pressed=(M.button_deadman,))
    timeout = TeleopSettings().joy_timeout_s
    assert core.step(t + timeout * 0.5) is not None, "still fresh"
    hold = core.step(t + timeout + 0.01)
    assert hold is not None and core.step(t + timeout + 0.05) is None


def test_joint_limits_respected(core: TeleopCore) -> None:
    limits = JointLimits.so101()
    _, target = run(core, 0.0, 4.0, x=1.0, y=1.0, pressed=(M.button_deadman,))
    assert target[0] == pytest.approx(limits.upper[0]) and target[1] == pytest.approx(limits.upper[1])
    assert limits.contains(target)


def test_deadzone(core: TeleopCore) -> None:
    _, target = run(core, 0.0, 0.5, x=M.deadzone * 0.9, y=-M.deadzone * 0.9, pressed=(M.button_deadman,))
    assert np.allclose(target, home_vector())


@pytest.mark.parametrize(("x", "y", "shift", "axis", "sign"), [
    (0.0, 1.0, False, 0, 1.0), (0.0, -1.0, False, 0, -1.0),
    (1.0, 0.0, False, 1, 1.0), (-1.0, 0.0, False, 1, -1.0),
    (0.0, 1.0, True, 2, 1.0), (0.0, -1.0, True, 2, -1.0),
])
def test_cartesian_jog_moves_ee_in_commanded_direction(core: TeleopCore, kin: ArmKinematics, x: float, y: float,
                                                       shift: bool, axis: int, sign: float) -> None:
    events = joy(core, 0.0, pressed=(M.button_mode,))
    assert events == [Event.MODE] and core.mode is Mode.CARTESIAN
    pressed = (M.button_deadman, M.button_shift) if shift else (M.button_deadman,)
    _, target = run(core, 0.0, 0.5, x=x, y=y, pressed=pressed)
    moved = kin.fk(target) - kin.fk(home_vector())
    expected = TeleopSettings().cartesian_speed * 0.48
    assert moved[axis] * sign == pytest.approx(expected, rel=0.1), moved
    assert np.linalg.norm(np.delete(moved, axis)) < 0.1 * expected, moved


def test_wrist_roll_in_cartesian_shift(core: TeleopCore) -> None:
    joy(core, 0.0, pressed=(M.button_mode,))
    _, target = run(core, 0.0, 0.5, x=1.0, pressed=(M.button_deadman, M.button_shift))
    roll = JOINT_NAMES.index("wrist_roll")
    assert target[roll] == pytest.approx(TeleopSettings().roll_speed * 0.48, rel=0.02)


def test_joint_group_cycles(core: TeleopCore) -> None:
    assert joy(core, 0.0, pressed=(M.button_joint_group,)) == [Event.JOINT_GROUP]
    assert joy(core, 0.01, pressed=(M.button_joint_group,)) == [], "held, not pressed again"
    _, target = run(core, 0.01, 0.5, x=1.0, y=1.0, pressed=(M.button_deadman,))
    moved = target - home_vector()
    assert moved[JOINT_NAMES.index("wrist_roll")] > 0.3 and moved[JOINT_NAMES.index("elbow_flex")] > 0.3
    assert moved[0] == 0.0 and moved[1] == 0.0


def test_gripper_open_close(core: TeleopCore) -> None:
    g = JOINT_NAMES.index("gripper")
    t, target = run(core, 0.0, 0.5, pressed=(M.button_deadman, M.button_gripper_open))
    assert target[g] == pytest.approx(TeleopSettings().gripper_speed * 0.48, rel=0.02)
    _, target = run(core, t, 3.0, pressed=(M.button_deadman, M.button_gripper_close))
    assert target[g] == pytest.approx(JointLimits.so101().lower[g])


def test_home_moves_at_bounded_speed(core: TeleopCore) -> None:
    core.on_joint_states(JOINT_NAMES, np.array([1.0, 0.5, -0.5, -1.0, 2.0, 1.0]))
    joy(core, 0.0, pressed=(M.button_deadman,))
    start = core.step(0.0)
    assert joy(core, 0.02, pressed=(M.button_deadman, M.button_home)) == [Event.HOME]
    previous, t = start, 0.02
    for _ in range(300):
        target = core.step(t)
        assert np.max(np.abs(target - previous)) <= TeleopSettings().home_speed * 0.02 + 1e-9
        previous = target
        t += 0.02
        joy(core, t, pressed=(M.button_deadman,))
    assert np.allclose(previous, home_vector()) and not core.homing


def test_episode_button_events(core: TeleopCore) -> None:
    assert joy(core, 0.0, pressed=(M.button_start_episode,)) == [Event.START_EPISODE]
    assert joy(core, 0.1, pressed=(M.button_stop_episode,)) == [Event.STOP_EPISODE]
    assert joy(core, 0.2, pressed=(M.button_discard_episode,)) == [Event.DISCARD_EPISODE]


def test_bad_joy_messages(core: TeleopCore) -> None:
    with pytest.raises(JoyError, match="has 1 axes; the mapping uses axis index 1"):
        core.on_joy(0.0, [0.0], [0] * N_BUTTONS)
    with pytest.raises(JoyError, match="has 4 buttons; the mapping uses button index 9"):
        core.on_joy(0.0, [0.0, 0.0], [0] * 4)
    with pytest.raises(JoyError, match="NaN"):
        core.on_joy(0.0, [float("nan"), 0.0], [0] * N_BUTTONS)
    with pytest.raises(ValueError, match="lacks joints \\['gripper'\\]"):
        core.on_joint_states(JOINT_NAMES[:5], [0.0] * 5)
