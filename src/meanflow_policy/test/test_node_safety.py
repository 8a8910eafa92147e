"""The policy node over real DDS when inputs go wrong: stale images, malformed images and joint states."""
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.event_handler import PublisherEventCallbacks
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState

from so101_common import graph
from so101_common.testing import spin_until

START_TIMEOUT = 90.0


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
