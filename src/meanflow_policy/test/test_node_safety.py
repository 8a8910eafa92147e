"""The policy node over real DDS when inputs go wrong: stale, future-stamped or malformed images and joint states,
frames that stopped coming, a model that keeps hitting the joint limits, checkpoints that must not load."""
import re
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.event_handler import PublisherEventCallbacks
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState

from meanflow_policy.testing import corrupt_checkpoint
from so101_common import graph
from so101_common.joints import JointLimits
from so101_common.testing import spin_until

NODE = "meanflow_policy.ros.policy_node"
START_TIMEOUT = 90.0
AHEAD = "ahead of this node's clock"


def test_stale_images_give_no_chunks_and_a_diagnostic(start_policy, ros_node):
    proc, probe = start_policy(max_obs_age_s=0.5)
    probe.image_stamp_offset_s = 2.0
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: any(d.level == DiagnosticStatus.WARN for d in probe.diagnostics),
                      START_TIMEOUT), proc.output()
    warn = next(d for d in probe.diagnostics if d.level == DiagnosticStatus.WARN)
    assert "stale" in warn.message and "max_obs_age_s 0.5" in warn.message
    assert "stale observation" in proc.output() and "camera wrist image is 2.0" in proc.output()
    spin_until(ros_node, lambda: False, 1.0)
    assert probe.trajectories == []
    probe.image_stamp_offset_s = 0.0
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 2, 20.0), "no recovery with fresh images"
    assert proc.alive()


def test_malformed_inputs_are_logged_and_the_node_carries_on(start_policy, ros_node):
    proc, probe = start_policy(image_reliability="reliable")
    probe.images_on = False
    probe.start_streams(image_hz=15.0)
    assert probe.instruction_client.wait_for_service(timeout_sec=START_TIMEOUT)
    assert spin_until(ros_node, lambda: "ready:" in proc.output(), START_TIMEOUT), proc.output()

    wrong_encoding = Image(height=48, width=64, encoding="16UC1", step=128, data=bytes(48 * 128))
    truncated = Image(height=48, width=64, encoding="rgb8", step=192, data=bytes(100))
    nan_joints = JointState(name=list(graph.JOINT_NAMES), position=[0.0, float("nan"), 0, 0, 0, 0])
    sensor_pub = ros_node.create_publisher(JointState, graph.JOINT_STATES_TOPIC, 10)
    # A best-effort camera cannot feed a reliable image subscription: the node must say so.
    ros_node.create_publisher(Image, graph.camera_image_topic("top"),
                              QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT),
                              event_callbacks=PublisherEventCallbacks(incompatible_qos=lambda info: None))

    def bad_inputs_reported() -> bool:
        probe.sensors.publish_image_message("wrist", wrong_encoding)
        probe.sensors.publish_image_message("top", truncated)
        sensor_pub.publish(nan_joints)
        out = proc.output()
        return ("unsupported image encoding '16UC1'" in out and "needs 9216" in out
                and "non-finite positions for ['shoulder_lift']" in out
                and "/camera/top/image_raw has an incompatible RELIABILITY QoS" in out)

    assert spin_until(ros_node, bad_inputs_reported, 20.0, period=0.1), proc.output()
    assert spin_until(ros_node, lambda: any(d.level == DiagnosticStatus.ERROR for d in probe.diagnostics), 10.0)
    assert probe.trajectories == [] and proc.alive()
    probe.images_on = True
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 2, 20.0), proc.output()
    assert len(probe.trajectories[-1][0].points) == 20


def test_inputs_stamped_ahead_of_the_clock_are_refused_and_reported(start_policy, ros_node):
    """A sender clock 100 s ahead would make its messages look fresh for 100 s after the sender stops."""
    proc, probe = start_policy(max_obs_age_s=0.5)
    joint_offset_ns = [0]
    probe.image_stamp_offset_s = -100.0
    probe.start_streams(image_hz=15.0, joint_hz=None)
    ros_node.create_timer(1 / 30, lambda: probe.sensors.publish_joints(time.time_ns() + joint_offset_ns[0]))
    assert spin_until(ros_node, lambda: any(AHEAD in d.message for d in probe.diagnostics), START_TIMEOUT), \
        proc.output()
    diag = next(d for d in probe.diagnostics if AHEAD in d.message)
    assert diag.level == DiagnosticStatus.ERROR and "/camera/" in diag.message
    assert re.search(r"stamped (99\.9|100\.0)\d* s ahead", diag.message), diag.message
    assert "max_future_stamp_s 0.1" in diag.message and AHEAD in proc.output()
    spin_until(ros_node, lambda: False, 1.0)
    assert probe.trajectories == [], "chunks from images stamped 100 s in the future"

    probe.image_stamp_offset_s = 0.0
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 2, 20.0), "no chunks with correct stamps"
    joint_offset_ns[0] = 100 * 1_000_000_000
    assert spin_until(ros_node, lambda: any(AHEAD in d.message and "joint state" in d.message
                                            for d in probe.diagnostics), 10.0), proc.output()
    spin_until(ros_node, lambda: False, 1.5)  # the last joint state taken in ages past max_obs_age_s
    before = len(probe.trajectories)
    spin_until(ros_node, lambda: False, 2.0)
    assert len(probe.trajectories) == before, "chunks built on joint states that stopped being accepted"
    assert "stale observation: joint" in proc.output() and proc.alive()


def test_frames_already_used_never_make_another_chunk(start_policy, ros_node):
    proc, probe = start_policy(max_obs_age_s=5.0)
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 3, START_TIMEOUT), proc.output()
    probe.images_on = False  # the cameras stop; joint states go on
    spin_until(ros_node, lambda: False, 1.5)  # a chunk computing when they stopped may still come
    before = len(probe.trajectories)
    spin_until(ros_node, lambda: False, 2.5)  # the last frames are still younger than max_obs_age_s
    assert len(probe.trajectories) == before, "a chunk was computed again from frames already used"
    # Both cameras, or (when one camera's frame arrived after the last chunk's capture) the other one alone.
    assert re.search(r"no new frame from camera (wrist, top|wrist|top) since the last chunk", proc.output()), \
        proc.output()
    probe.images_on = True
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= before + 2, 20.0), "no recovery"


def test_sustained_clamping_is_a_diagnostic_with_the_count(start_policy, checkpoint, ros_node, tmp_path):
    """A checkpoint whose gripper targets lie far past the limit loads (most targets are fine) but each chunk
    is clamped: the operator must hear of it, not find it in a counter."""
    bad = corrupt_checkpoint(checkpoint, tmp_path / "gripper", "gripper_beyond_limit")
    proc, probe = start_policy(checkpoint=str(bad))
    probe.start_streams(image_hz=15.0)

    def clamp_reports() -> list[DiagnosticStatus]:
        return [d for d in probe.diagnostics if "clamped to the joint limits" in d.message]

    assert spin_until(ros_node, lambda: bool(clamp_reports()), START_TIMEOUT), proc.output()
    report = clamp_reports()[0]
    assert report.level in (DiagnosticStatus.WARN, DiagnosticStatus.ERROR)
    assert "chunks in a row" in report.message and "gripper" in report.message
    assert int({kv.key: kv.value for kv in report.values}["clamped_values"]) >= 3 * 20
    assert "clamped to the joint limits" in proc.output()
    limits = JointLimits.so101()
    gripper = np.array([p.positions[5] for p in probe.trajectories[-1][0].points])
    np.testing.assert_allclose(gripper, limits.upper[5])  # what went out stayed inside the limits


@pytest.mark.parametrize("kind,named", [
    ("flipped_bytes", "model.safetensors: the model gives NaN or inf"),
    ("saturated_weights", "model.safetensors: on a neutral observation 100 % of the model's joint targets"),
    ("truncated_weights", "model.safetensors: not a readable safetensors file"),
    ("chunk_size_string", "config.json: field chunk_size must be an integer, got str '20'"),
])
def test_unusable_checkpoint_stops_the_node_with_one_line(checkpoint, node_process, tmp_path, kind, named):
    bad = corrupt_checkpoint(checkpoint, tmp_path / kind, kind)
    proc = node_process(NODE, params={"checkpoint": str(bad), "instruction": "put the cube in the box"})
    proc.proc.wait(timeout=START_TIMEOUT)
    out = proc.output()
    assert proc.proc.returncode == 2, out
    assert named in out and "Traceback" not in out and "ready:" not in out
    assert len([line for line in out.splitlines() if "FATAL" in line]) == 1, out
