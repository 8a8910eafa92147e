"""The SO-101 under ros2_control (ROS 2 distro): description, controllers, hardware side, cameras.

    ros2 launch so101_bringup robot.launch.py hardware:=mock|real|sim [port:=/dev/ttyACM0]
        [calibration_file:=...] [cameras:=true] [wrist_camera:=/dev/video0] [top_camera:=/dev/video2]
        [topic_plugin:=...  (default: by $ROS_DISTRO, Humble's topic_based_ros2_control or the newer one)]

mock: mock_components/GenericSystem, nothing else needed. real: the so101_hardware driver node (autostarted
lifecycle node, ros2_control mode) serves the topic-based hardware's topics. sim: the so101_sim node serves them.
Controllers: joint_state_broadcaster (-> /joint_states) and arm_controller (<- /arm_controller/joint_trajectory).
"""
from __future__ import annotations

import os
from pathlib import Path

import xacro
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from so101_common.graph import (CAMERA_NAMES, HW_COMMANDS_TOPIC, HW_STATES_TOPIC, TRAJECTORY_TOPIC,
                                camera_namespace)

# Installed data only (works with or without --symlink-install, in the distro image, for a package installed alone):
# configuration from this package, the URDF/xacro from so101_description.
BRINGUP = Path(get_package_share_directory("so101_bringup"))
DESCRIPTION = Path(get_package_share_directory("so101_description"))
TOPIC_PLUGIN = "joint_state_topic_hardware_interface/JointStateTopicSystem"
HUMBLE_TOPIC_PLUGIN = "topic_based_ros2_control/TopicBasedSystem"
ARM_CONTROLLER = TRAJECTORY_TOPIC.strip("/").split("/")[0]
ARGUMENTS = {
    "hardware": ("mock", "mock (no robot), real (servo bus driver) or sim (so101_sim node)"),
    "port": ("/dev/ttyACM0", "serial port of the servo bus (hardware:=real)"),
    "calibration_file": (str(BRINGUP / "config" / "calibration" / "so101.yaml"),
                         "calibration YAML from so101-calibrate (hardware:=real)"),
    "topic_plugin": ("", "topic-based hardware plugin; empty: chosen by $ROS_DISTRO (Humble: "
                     "topic_based_ros2_control/TopicBasedSystem, later: joint_state_topic_hardware_interface/"
                     "JointStateTopicSystem)"),
    "cameras": ("false", "start the wrist and top camera nodes"),
    "wrist_camera": ("/dev/video0", "wrist camera source (device, file or test_pattern)"),
    "top_camera": ("/dev/video2", "top camera source (device, file or test_pattern)"),
}


def robot_description(hardware: str, topic_plugin: str) -> str:
    """The expanded URDF with its ros2_control block for ``hardware``."""
    doc = xacro.process_file(str(DESCRIPTION / "urdf" / "so101.urdf.xacro"), mappings={
        "hardware": hardware, "topic_plugin": topic_plugin,
        "commands_topic": HW_COMMANDS_TOPIC, "states_topic": HW_STATES_TOPIC})
    return doc.toxml()


def _nodes(context) -> list:
    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    hardware = arg["hardware"]
    if hardware not in ("mock", "real", "sim"):
        raise ValueError(f"hardware:={hardware} is not one of mock, real, sim")
    cameras = arg["cameras"].lower()
    if cameras not in ("true", "false"):
        raise ValueError(f"cameras:={arg['cameras']} is not one of true, false")
    if hardware == "sim" and cameras == "true":
        raise ValueError("cameras:=true with hardware:=sim: the sim node renders both cameras itself, and camera "
                         "nodes would publish a second image stream on the same topics")
    humble = os.environ.get("ROS_DISTRO", "") == "humble"
    plugin = arg["topic_plugin"] or (HUMBLE_TOPIC_PLUGIN if humble else TOPIC_PLUGIN)
    description = ParameterValue(robot_description(hardware, plugin), value_type=str)
    # Jazzy and later: the controller manager reads /robot_description; Humble: its own parameter.
    manager_params: list = [str(BRINGUP / "config" / "controllers.yaml")]
    if humble:
        manager_params.append({"robot_description": description})
    nodes = [
        Node(package="robot_state_publisher", executable="robot_state_publisher", output="screen",
             parameters=[{"robot_description": description}]),
        Node(package="controller_manager", executable="ros2_control_node", output="screen",
             parameters=manager_params),
        Node(package="controller_manager", executable="spawner", output="screen",
             arguments=["joint_state_broadcaster", ARM_CONTROLLER, "--controller-manager-timeout", "30"]),
    ]
    if hardware == "real":
        nodes.append(Node(package="so101_hardware", executable="driver_node", output="screen", parameters=[{
            "port": arg["port"], "calibration_file": arg["calibration_file"], "mode": "ros2_control",
            "autostart": True}]))
    elif hardware == "sim":
        nodes.append(Node(package="so101_sim", executable="sim_node", output="screen",
                          parameters=[{"hardware_topics": True}]))
    if cameras == "true":
        for camera in CAMERA_NAMES:
            nodes.append(Node(package="so101_camera", executable="camera_node", name="camera", output="screen",
                              namespace=camera_namespace(camera).strip("/"),
                              parameters=[{"source": arg[f"{camera}_camera"]}]))
    return nodes


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()] + [OpaqueFunction(function=_nodes)])
