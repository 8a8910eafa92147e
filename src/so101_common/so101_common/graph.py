"""The ROS graph contract: every topic, service and joint name used between packages.

Packages import names from here instead of spelling them, so renaming one is a one-line change.
"""
from __future__ import annotations

JOINT_NAMES: tuple[str, ...] = (
    "shoulder_pan",
    "shoulder_lift",
    "elbow_flex",
    "wrist_flex",
    "wrist_roll",
    "gripper",
)
ARM_JOINT_NAMES: tuple[str, ...] = JOINT_NAMES[:5]
GRIPPER_JOINT_NAME = "gripper"

# Feetech servo IDs on the bus, in JOINT_NAMES order.
SERVO_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

CAMERA_NAMES: tuple[str, ...] = ("wrist", "top")


def camera_namespace(camera: str) -> str:
    """Namespace of one camera node, e.g. ``/camera/wrist``."""
    if camera not in CAMERA_NAMES:
        raise ValueError(f"unknown camera {camera!r}; expected one of {CAMERA_NAMES}")
    return f"/camera/{camera}"


def camera_image_topic(camera: str) -> str:
    return f"{camera_namespace(camera)}/image_raw"


def camera_info_topic(camera: str) -> str:
    return f"{camera_namespace(camera)}/camera_info"


JOINT_STATES_TOPIC = "/joint_states"
TRAJECTORY_TOPIC = "/arm_controller/joint_trajectory"
JOY_TOPIC = "/joy"
DIAGNOSTICS_TOPIC = "/diagnostics"

# Topics served for ros2_control's topic-based hardware interface (driver node or sim node).
HW_COMMANDS_TOPIC = "/so101_hw/joint_commands"
HW_STATES_TOPIC = "/so101_hw/joint_states"

POLICY_NODE = "meanflow_policy"
SET_INSTRUCTION_SERVICE = f"/{POLICY_NODE}/set_instruction"
POLICY_ENABLE_SERVICE = f"/{POLICY_NODE}/enable"
POLICY_TIMING_TOPIC = f"/{POLICY_NODE}/chunk_timing"

# The live Rerun viewer bridge (meanflow_policy viz_node): cameras, joint states, chunks and chunk timing in.
VIZ_NODE = "so101_viz"

RECORDER_NODE = "episode_recorder"
START_EPISODE_SERVICE = f"/{RECORDER_NODE}/start_episode"
STOP_EPISODE_SERVICE = f"/{RECORDER_NODE}/stop_episode"
DISCARD_EPISODE_SERVICE = f"/{RECORDER_NODE}/discard_episode"

SIM_NODE = "so101_sim"
SIM_RESET_SERVICE = f"/{SIM_NODE}/reset"
SIM_TASK_SUCCESS_TOPIC = f"/{SIM_NODE}/task_success"
# The task's partial credit for the episode so far (std_msgs/Float32 in [0, 1]), published with the success flag.
SIM_TASK_SCORE_TOPIC = f"/{SIM_NODE}/task_score"

# What an episode bag records by default (the recorder and the sim demo writer both use this list).
RECORDED_TOPICS: tuple[str, ...] = (
    camera_image_topic("wrist"),
    camera_image_topic("top"),
    JOINT_STATES_TOPIC,
    TRAJECTORY_TOPIC,
    JOY_TOPIC,
)
