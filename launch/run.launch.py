"""Run the Mean-Flow policy on the robot: ``ros2 launch so101_bringup run.launch.py checkpoint:=DIR nfe:=1``.

It lives in so101_bringup, the package that depends on both sides (meanflow_policy for the node, the robot side
for robot.launch.py), so no package depends on bringup. The robot side comes from robot.launch.py
(``hardware:=real|mock|sim``, ``cameras:=true``; its other
arguments such as ``port:=`` or ``wrist_camera:=`` pass through); ``robot:=false`` starts the policy node alone, for
a robot or simulator started elsewhere. ``viz:=true`` also starts viz_node (meanflow_policy): the cameras, joint
states, each chunk ahead of the arm and the chunk timing in a Rerun viewer on this machine's screen.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, LogInfo
from launch.conditions import IfCondition, UnlessCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from so101_common import graph

# (name, default, description, parameter type of the policy node or None for launch-only arguments)
ARGUMENTS = (
    ("checkpoint", "", "Policy checkpoint directory (config.json, model.safetensors, stats.json)", str),
    ("nfe", "1", "Action-expert evaluations per chunk (1 = one-step Mean-Flow)", int),
    ("device", "cpu", "Torch device: cpu or cuda", str),
    ("backbone_precision", "float32", "Backbone precision: float32, int8, bfloat16, float16 or auto (the fastest "
     "for the device)", str),
    ("compile_kernels", "false", "With device:=cuda: also compile the vision encoder and expert (slow first chunk)",
     bool),
    ("instruction", "", "Initial instruction (empty: set it with the set_instruction service)", str),
    ("rate_hz", "5.0", "Most chunks per second", float),
    ("max_obs_age_s", "0.5", "Older images or joint states are stale: no chunk from them", float),
    ("latency_compensation", "false", "Drop chunk points already due at publish time", bool),
    ("start_enabled", "true", "Act as soon as there is an instruction (false: wait for ~/enable)", bool),
    ("handoff", "off", "How a new chunk takes over from the trajectory being executed: off, replace, blend or rtc "
     "(asynchronous: the arm keeps moving while the next chunk is computed)", str),
    ("chunk_smoothing", "0", "Passes of the [1, 2, 1]/4 low-pass filter along each chunk's rows (arm joints) before "
     "it is published; 0: off", int),
    ("hardware", "mock", "Robot side: real, mock or sim (sim publishes camera images itself)", None),
    ("cameras", "false", "Start the wrist and top camera nodes with the robot (needed with hardware:=real)", None),
    ("robot", "true", "Also launch the robot side (robot.launch.py)", None),
    ("viz", "false", "Also start viz_node: cameras, joint states, chunks and chunk timing in a Rerun viewer", None),
)


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, default, description, _ in ARGUMENTS]
    robot = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([FindPackageShare("so101_bringup"), "launch",
                                                            "robot.launch.py"])),
        launch_arguments={"hardware": LaunchConfiguration("hardware"),
                          "cameras": LaunchConfiguration("cameras")}.items(),
        condition=IfCondition(LaunchConfiguration("robot")),
    )
    policy = Node(
        package="meanflow_policy",
        executable="policy_node",
        name=graph.POLICY_NODE,
        output="screen",
        emulate_tty=True,
        parameters=[{name: ParameterValue(LaunchConfiguration(name), value_type=kind)
                     for name, _, _, kind in ARGUMENTS if kind is not None}],
    )
    alone = LogInfo(msg="robot:=false: starting the policy node alone", condition=UnlessCondition(
        LaunchConfiguration("robot")))
    viz = Node(package="meanflow_policy", executable="viz_node", name=graph.VIZ_NODE, output="screen",
               condition=IfCondition(LaunchConfiguration("viz")))
    return LaunchDescription([*declared, robot, alone, policy, viz])
