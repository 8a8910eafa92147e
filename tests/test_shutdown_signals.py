"""Ctrl-C under ``ros2 launch``, as real processes: every node gets SIGINT twice (the terminal's, then launch's own),
sometimes SIGTERM after; a node must then exit 0, without a traceback, with one shutdown line.

The driver (torque read back from the emulator) and the recorder (bag readable) have their own, stronger
variants in their packages; this file covers the camera, teleop, sim and policy nodes.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
from rcl_interfaces.msg import Log
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState

from so101_common.graph import JOINT_STATES_TOPIC, POLICY_NODE, SIM_NODE
from so101_common.testing import spin_until

SEQUENCES = {
    "SIGINT-SIGINT": (signal.SIGINT, signal.SIGINT),
    "SIGINT-SIGINT-SIGTERM": (signal.SIGINT, signal.SIGINT, signal.SIGTERM),
    "SIGINT-storm": (),  # SIGINT every 5 ms until the node is gone: some land inside its cleanup
}
# module, parameters, logger name, a topic the node publishes while it runs (None: its startup log is enough)
NODES = {
    "camera": ("so101_camera.camera_node", {"source": "test_pattern", "width": 64, "height": 48, "fps": 30.0},
               "camera", (Image, "/image_raw")),
    "teleop": ("so101_teleop.teleop_node", {"instruction": "shutdown test"}, "teleop", None),
    "sim": ("so101_sim.sim_node", {"image_size": 32, "camera_rate": 10.0}, SIM_NODE, (JointState, JOINT_STATES_TOPIC)),
    "policy": ("meanflow_policy.ros.policy_node", {"rate_hz": 10.0, "instruction": "put the cube in the box"},
               POLICY_NODE, None),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from meanflow_policy.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("policy") / "tiny", seed=0)


@pytest.mark.parametrize("sequence", list(SEQUENCES))
@pytest.mark.parametrize("which", list(NODES))
def test_node_exits_cleanly_on_repeated_signals(node_process, ros_node, checkpoint, which: str,
                                               sequence: str) -> None:
    module, params, logger, topic = NODES[which]
    if which == "policy":
        params = {**params, "checkpoint": str(checkpoint)}
    logs: list[Log] = []
    latched = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    ros_node.create_subscription(Log, "/rosout", logs.append, latched)
    received: list[object] = []
    if topic is not None:
        ros_node.create_subscription(topic[0], topic[1], received.append, 10)
    proc = node_process(module, params=params)
    assert spin_until(ros_node, lambda: any(m.name.endswith(logger) for m in logs)
                      and (topic is None or len(received) > 2), 60.0), proc.output()
    if SEQUENCES[sequence]:
        proc.send(*SEQUENCES[sequence], gap_s=0.02)
    else:
        assert proc.send_until_exit(signal.SIGINT, 0.005) >= 1
    assert proc.wait(30.0) == 0, proc.output()
    out = proc.output()
    assert "Traceback" not in out and "RCLError" not in out, out
    assert len([line for line in out.splitlines() if "shutting down (SIGINT" in line]) == 1, out
