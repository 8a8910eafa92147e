"""viz_node over real DDS: what the stack publishes (cameras, joint states, a chunk, its timing) ends up in the
.rrd file it saves, one row per message, and the file is complete after SIGINT; a node with nowhere to send the
recording refuses to start with one line; a message it cannot show is a warning naming it."""
from __future__ import annotations

import re
import signal
import time
from collections import Counter

import numpy as np
import pytest
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rerun.chunk import RrdReader
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory

from meanflow_policy.data.demo_bags import joint_state, joint_trajectory
from so101_common import graph
from so101_common.images import rgb_to_image
from so101_common.testing import spin_until
from so101_interfaces.msg import ChunkTiming

NODE = "meanflow_policy.ros.viz_node"
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def _rows(path) -> Counter:
    rows: Counter = Counter()
    for chunk in RrdReader(path).stream():
        batch = chunk.to_record_batch()
        for name in batch.schema.names:
            if not chunk.is_static and ":" in name:
                rows[(chunk.entity_path, name)] += batch.num_rows - batch.column(name).null_count
    return rows


def test_live_stack_is_saved_one_row_per_message(node_process, ros_node, tmp_path) -> None:
    out = tmp_path / "live.rrd"
    proc = node_process(NODE, params={"spawn": False, "save_path": str(out), "jpeg_quality": 50})
    pubs = {camera: ros_node.create_publisher(Image, graph.camera_image_topic(camera), RELIABLE)
            for camera in graph.CAMERA_NAMES}
    pubs["state"] = ros_node.create_publisher(JointState, graph.JOINT_STATES_TOPIC, RELIABLE)
    pubs["chunk"] = ros_node.create_publisher(JointTrajectory, graph.TRAJECTORY_TOPIC, RELIABLE)
    pubs["timing"] = ros_node.create_publisher(ChunkTiming, graph.POLICY_TIMING_TOPIC, RELIABLE)
    assert spin_until(ros_node, lambda: all(p.get_subscription_count() >= 1 for p in pubs.values()), 30.0), (
        proc.output())
    now = time.time_ns()
    for k in range(4):  # paced: the image and joint-state subscriptions are best effort (a slow viewer drops)
        for camera in graph.CAMERA_NAMES:
            pubs[camera].publish(rgb_to_image(np.full((24, 32, 3), 60 * k, np.uint8), now, camera))
        for _ in range(3):
            pubs["state"].publish(joint_state(now, graph.JOINT_NAMES, np.full(6, 0.1 * k)))
            spin_until(ros_node, lambda: False, 0.04)
    points = [((i + 1) / 30, np.full(6, 0.01 * i)) for i in range(20)]
    pubs["chunk"].publish(joint_trajectory(now, graph.JOINT_NAMES, points))
    pubs["timing"].publish(ChunkTiming(obs_age_ms=4.0, prefix_ms=5.0, expert_ms=2.0, total_ms=8.0, nfe=1))
    pubs["chunk"].publish(JointTrajectory(joint_names=list(graph.JOINT_NAMES)))  # no points: named, not shown
    assert spin_until(ros_node, lambda: "trajectory has no points" in proc.output(), 10.0), proc.output()
    assert proc.stop(signal.SIGINT, timeout=20.0) == 0, proc.output()
    logged = re.search(r"logged images \((\d+) wrist, (\d+) top\), (\d+) joint states, 1 chunks, 1 timing reports",
                       proc.output())
    assert logged, proc.output()
    wrist, top, states = (int(n) for n in logged.groups())
    assert 1 <= wrist <= 4 and 1 <= top <= 4 and 1 <= states <= 12, "best effort may drop some, not all"
    rows = _rows(out)  # every message the node took is one row of the complete file
    assert rows[("/cameras/wrist", "EncodedImage:blob")] == wrist
    assert rows[("/cameras/top", "EncodedImage:blob")] == top
    for joint in graph.JOINT_NAMES:
        assert rows[(f"/joints/{joint}/state", "Scalars:scalars")] == states
        assert rows[(f"/joints/{joint}/plan/0", "Scalars:scalars")] == 20
    assert rows[("/policy/timing/total_ms", "Scalars:scalars")] == 1


@pytest.mark.parametrize("params, message", [
    ({"spawn": False}, "nothing to send the recording to"),
    ({"spawn": True}, "no display to open a viewer on"),
])
def test_nowhere_to_send_the_recording_is_one_line_and_exit_2(node_process, monkeypatch, params, message) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    proc = node_process(NODE, params=params, discovery=False)
    assert proc.wait(30.0) == 2
    assert f"so101_viz: invalid configuration: {message}" in proc.output()
