"""Demonstration recording (ROS 2 distro): robot + both cameras + joy_node + Joy-Con teleop + episode recorder.

    ros2 launch so101_bringup teleop_record.launch.py hardware:=real|mock|sim
        [wrist_camera:=/dev/v4l/by-id/...] [top_camera:=/dev/video2] [camera_width:=640] [camera_height:=480]
        [camera_fps:=30] [cameras:=auto|true|false] [joy_device_id:=0] [joy_device_name:=]
        [output_dir:=~/so101_data/demos] [instruction:="pick up the cube"] [teleop_config:=...]

Cameras: started unless cameras:=false (auto = everything but hardware:=sim, whose node renders them).
Episodes are started/stopped/discarded with the Joy-Con (config/teleop_joycon.yaml) or the recorder's services.
"""
from __future__ import annotations

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from so101_common.graph import CAMERA_NAMES, RECORDER_NODE, camera_namespace

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
}


def _actions(context) -> list:
    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    hardware = arg["hardware"]
    cameras = arg["cameras"].lower()
    if cameras not in ("auto", "true", "false"):
        raise ValueError(f"cameras:={arg['cameras']} is not one of auto, true, false")
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
    actions += [
        Node(package="joy", executable="joy_node", output="screen", parameters=[{
            "device_id": int(arg["joy_device_id"]), "device_name": arg["joy_device_name"],
            "deadzone": 0.05, "autorepeat_rate": 20.0}]),
        Node(package="so101_teleop", executable="teleop_node", name="teleop", output="screen",
             parameters=[arg["teleop_config"], {"instruction": arg["instruction"],
                                                "urdf_path": str(DESCRIPTION / "urdf" / "so101.urdf.xacro")}]),
        Node(package="so101_teleop", executable="episode_recorder", name=RECORDER_NODE, output="screen",
             parameters=[{"dataset_dir": arg["output_dir"]}]),
    ]
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()] + [OpaqueFunction(function=_actions)])
