"""The installed so101_description xacro expands for every hardware mode into the arm the stack drives.

Found through the share directory only (as the launch files and the teleop node find it), so a package that
forgets to install the model, or installs it elsewhere, fails here.
"""
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import xacro
from ament_index_python.packages import get_package_share_directory

from so101_common.graph import JOINT_NAMES


def installed_xacro() -> Path:
    return Path(get_package_share_directory("so101_description")) / "urdf" / "so101.urdf.xacro"


def expand(**mappings: str) -> ET.Element:
    return ET.fromstring(xacro.process_file(str(installed_xacro()), mappings=mappings).toxml())


@pytest.mark.parametrize("hardware,plugin", [
    ("mock", "mock_components/GenericSystem"),
    ("real", "joint_state_topic_hardware_interface/JointStateTopicSystem"),
    ("sim", "joint_state_topic_hardware_interface/JointStateTopicSystem"),
])
def test_xacro_expands_with_the_ros2_control_block_of_each_hardware(hardware, plugin):
    robot = expand(hardware=hardware)
    moving = [j.get("name") for j in robot.iter("joint") if j.get("type") in ("revolute", "continuous", "prismatic")
              and j.find("limit") is not None]
    assert moving == list(JOINT_NAMES)
    blocks = robot.findall("ros2_control")
    assert len(blocks) == 1
    assert blocks[0].findtext("hardware/plugin") == plugin
    assert [j.get("name") for j in blocks[0].findall("joint")] == list(JOINT_NAMES)


def test_kinematics_only_expansion_has_no_ros2_control_block():
    robot = expand(ros2_control="false")
    assert robot.findall("ros2_control") == []
    assert {link.get("name") for link in robot.iter("link")} >= {"base_link"}


def test_unknown_hardware_is_a_xacro_error_naming_it():
    with pytest.raises(xacro.XacroException, match="hardware must be mock, real or sim"):
        expand(hardware="gazebo")
