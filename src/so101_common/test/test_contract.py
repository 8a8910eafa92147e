import numpy as np
import pytest

from so101_common import graph
from so101_common.instruction import MAX_INSTRUCTION_CHARS, validate_instruction
from so101_common.joints import HOME_POSITION, JointLimits


def test_graph_names_match_design():
    assert graph.JOINT_NAMES == ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
    assert graph.camera_image_topic("wrist") == "/camera/wrist/image_raw"
    assert graph.camera_info_topic("top") == "/camera/top/camera_info"
    assert graph.TRAJECTORY_TOPIC == "/arm_controller/joint_trajectory"
    assert graph.SET_INSTRUCTION_SERVICE == "/meanflow_policy/set_instruction"
    with pytest.raises(ValueError, match="unknown camera"):
        graph.camera_image_topic("side")


def test_limits_clamp_and_reject_nan():
    lim = JointLimits.so101()
    assert lim.lower.shape == (6,) and np.all(lim.lower < lim.upper)
    assert lim.contains(lim.clamp(np.full(6, 99.0)))
    with pytest.raises(ValueError, match="NaN"):
        lim.clamp(np.array([np.nan] * 6))
    with pytest.raises(ValueError, match="expected 6"):
        lim.clamp(np.zeros(5))
    with pytest.raises(ValueError, match="no limits known"):
        JointLimits.so101(("shoulder_pan", "elbow"))
    assert lim.contains(np.array([HOME_POSITION[n] for n in graph.JOINT_NAMES]))


@pytest.mark.parametrize("text,ok,cleaned", [
    ("  pick the red cube  ", True, "pick the red cube"),
    ("", False, ""),
    ("   \n\t", False, ""),
    ("x" * MAX_INSTRUCTION_CHARS, True, "x" * MAX_INSTRUCTION_CHARS),
    ("x" * (MAX_INSTRUCTION_CHARS + 1), False, ""),
])
def test_instruction_validation(text, ok, cleaned):
    accepted, out, message = validate_instruction(text)
    assert accepted is ok and out == cleaned and message
