"""Demonstration recording (ROS 2 distro): robot + both cameras + joy_node + Joy-Con teleop + episode recorder.

    ros2 launch so101_bringup teleop_record.launch.py hardware:=real|mock|sim teleop:=joycon|leader
        [wrist_camera:=/dev/v4l/by-id/...] [top_camera:=/dev/video2] [camera_width:=640] [camera_height:=480]
        [camera_fps:=30] [cameras:=auto|true|false] [joy_device_id:=0] [joy_device_name:=]
        [output_dir:=~/so101_data/demos] [instruction:="pick up the cube"] [teleop_config:=...]
        [leader_port:=/dev/ttyACM1] [leader_calibration:=~/.cache/.../so101_leader/ID.json] [leader_deadman:=none|joy]
        [viz:=false|true]

Cameras: started unless cameras:=false (auto = everything but hardware:=sim, whose node renders them).
teleop:=joycon jogs the arm with the Joy-Con (teleop_node); teleop:=leader mirrors a leader arm (leader_node).
Episodes are started/stopped/discarded with the Joy-Con (config/teleop_joycon.yaml) or the recorder's services.
viz:=true also starts viz_node (meanflow_policy): cameras, joint states and the commanded targets in a Rerun viewer.
"""
from __future__ import annotations

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from so101_common.graph import CAMERA_NAMES, RECORDER_NODE, VIZ_NODE, camera_namespace

# Installed data only: launch files and configuration from this package, the URDF/xacro from so101_description.
BRINGUP = Path(get_package_share_directory("so101_bringup"))
DESCRIPTION = Path(get_package_share_directory("so101_description"))
ARGUMENTS = {
    "hardware": ("mock", "mock (no robot), real (servo bus driver) or sim (so101_sim node)"),
    "port": ("/dev/ttyACM0", "serial port of the servo bus (hardware:=real)"),
    "cameras": ("auto", "start the camera nodes: true, false, or auto (all but hardware:=sim)"),
    "wrist_camera": ("/dev/video0", "wrist camera: /dev/videoN, /dev/v4l/by-id/..., a video file or test_pattern"),
    "top_camera": ("/dev/video2", "top-down camera: /dev/videoN, /dev/v4l/by-id/..., a video file or test_pattern"),
    "wrist_calibration": ("", "camera_calibration YAML of the wrist camera (empty: uncalibrated)"),
    "top_calibration": ("", "camera_calibration YAML of the top camera (empty: uncalibrated)"),
    "camera_width": ("640", "image width"),
    "camera_height": ("480", "image height"),
    "camera_fps": ("30", "camera rate"),
    "joy_device_id": ("0", "joy_node device_id (SDL joystick index)"),
    "joy_device_name": ("", "joy_node device_name, e.g. 'Nintendo Switch Right Joy-Con' (overrides the id)"),
    "teleop_config": (str(BRINGUP / "config" / "teleop_joycon.yaml"), "button/axis map and jog speeds"),
    "output_dir": ("~/so101_data/demos", "dataset folder; one rosbag2 directory per episode"),
    "instruction": ("pick up the cube and place it in the bowl", "instruction stored with each episode"),
    "teleop": ("joycon", "joycon (Joy-Con jogging, teleop_node) or leader (a leader arm mirrored, leader_node)"),
    "leader_port": ("/dev/ttyACM1", "serial port of the leader arm's bus (teleop:=leader)"),
    "leader_calibration": ("", "the leader's calibration: LeRobot JSON or so101-calibrate YAML (teleop:=leader)"),
    "leader_deadman": ("none", "teleop:=leader: none (always mirror) or joy (while the Joy-Con's R is held); "
                       "the space-key toggle needs the node in a terminal of its own"),
    "viz": ("false", "true: also start viz_node, the cameras, joint states and commanded targets in a Rerun viewer"),
}
TELEOP_MODES = ("joycon", "leader")
LEADER_DEADMAN = ("none", "joy")


def _actions(context) -> list:
    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    hardware = arg["hardware"]
    cameras = arg["cameras"].lower()
    if cameras not in ("auto", "true", "false"):
        raise ValueError(f"cameras:={arg['cameras']} is not one of auto, true, false")
    if arg["teleop"] not in TELEOP_MODES:
        raise ValueError(f"teleop:={arg['teleop']} is not one of {', '.join(TELEOP_MODES)}")
    if arg["viz"].lower() not in ("true", "false"):
        raise ValueError(f"viz:={arg['viz']} is not one of true, false")
    if arg["leader_deadman"] not in LEADER_DEADMAN:
        raise ValueError(f"leader_deadman:={arg['leader_deadman']} is not one of {', '.join(LEADER_DEADMAN)} "
                         "(a launched node has no terminal: for the space key run leader_node in its own)")
    actions: list = [IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(BRINGUP / "launch" / "robot.launch.py")),
        launch_arguments={"hardware": hardware, "port": arg["port"], "cameras": "false"}.items())]
    if cameras == "true" or (cameras == "auto" and hardware != "sim"):
        for camera in CAMERA_NAMES:
            actions.append(Node(
                package="so101_camera", executable="camera_node", name="camera", output="screen",
                namespace=camera_namespace(camera).strip("/"),
                parameters=[{"source": arg[f"{camera}_camera"], "calibration_file": arg[f"{camera}_calibration"],
                             "width": int(arg["camera_width"]), "height": int(arg["camera_height"]),
                             "fps": float(arg["camera_fps"]), "frame_id": f"{camera}_camera_optical_frame"}]))
    # joy_node in both modes: with a leader arm the Joy-Con's buttons still start/stop episodes (and hold the
    # deadman with leader_deadman:=joy).
    actions.append(Node(package="joy", executable="joy_node", output="screen", parameters=[{
        "device_id": int(arg["joy_device_id"]), "device_name": arg["joy_device_name"],
        "deadzone": 0.05, "autorepeat_rate": 20.0}]))
    if arg["teleop"] == "leader":
        actions.append(Node(package="so101_teleop", executable="leader_node", name="leader_teleop", output="screen",
                            parameters=[{"port": arg["leader_port"], "calibration_file": arg["leader_calibration"],
                                         "deadman": arg["leader_deadman"], "keyboard": False,
                                         "instruction": arg["instruction"]}]))
    else:
        actions.append(Node(package="so101_teleop", executable="teleop_node", name="teleop", output="screen",
                            parameters=[arg["teleop_config"], {
                                "instruction": arg["instruction"],
                                "urdf_path": str(DESCRIPTION / "urdf" / "so101.urdf.xacro")}]))
    actions.append(Node(package="so101_teleop", executable="episode_recorder", name=RECORDER_NODE, output="screen",
                        parameters=[{"dataset_dir": arg["output_dir"]}]))
    if arg["viz"].lower() == "true":
        actions.append(Node(package="meanflow_policy", executable="viz_node", name=VIZ_NODE, output="screen"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()] + [OpaqueFunction(function=_actions)])
