"""The policy node over real DDS under operator control: enable/disable with a hold; latency compensation."""
import numpy as np
import pytest
from std_srvs.srv import SetBool

from meanflow_policy.model.configuration import MeanFlowConfig
from so101_common import graph
from so101_common.testing import spin_until, wait_until_answering

START_TIMEOUT = 90.0


def _call(node, future, timeout=30.0):
    assert spin_until(node, future.done, timeout), "service call got no answer"
    return future.result()


def _times(msg) -> np.ndarray:
    return np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points])


def test_enable_and_disable_with_hold(checkpoint, start_policy, ros_node):
    fps = MeanFlowConfig.load(checkpoint / "config.json").fps
    proc, probe = start_policy(start_enabled=False)
    probe.start_streams(image_hz=15.0)
    # (disabling a disabled policy answers "already disabled" and changes nothing)
    assert wait_until_answering(ros_node, probe.enable_client, SetBool.Request(data=False), START_TIMEOUT)
    assert spin_until(ros_node, lambda: "ready:" in proc.output(), START_TIMEOUT), proc.output()
    spin_until(ros_node, lambda: False, 1.0)
    assert probe.trajectories == [], "acted while disabled"

    on = _call(ros_node, probe.enable(True))
    assert on.success and on.message == "enabled"
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 2, 30.0)
    probe.sensors.positions = probe.sensors.positions + np.array([0.1, -0.2, 0.05, 0.0, 0.3, 0.2])
    spin_until(ros_node, lambda: False, 0.3)  # the node sees the new joint positions

    off = _call(ros_node, probe.enable(False))
    assert off.success and "holding at the current position" in off.message
    spin_until(ros_node, lambda: False, 1.0)  # a chunk in flight at disable time must not follow the hold
    hold = probe.trajectories[-1][0]
    assert len(hold.points) == 1 and tuple(hold.joint_names) == graph.JOINT_NAMES
    np.testing.assert_allclose(hold.points[0].positions, probe.sensors.positions, atol=1e-9)
    assert _times(hold)[0] == pytest.approx(1 / fps, abs=1e-6)
    count = len(probe.trajectories)
    assert _call(ros_node, probe.enable(False)).message == "already disabled"
    spin_until(ros_node, lambda: False, 0.5)
    assert len(probe.trajectories) == count, "chunks after disable"

    assert _call(ros_node, probe.enable(True)).success
    assert spin_until(ros_node, lambda: len(probe.trajectories) > count, 30.0)
    assert len(probe.trajectories[-1][0].points) == 20


def test_latency_compensation_drops_points_already_due(checkpoint, start_policy, ros_node):
    fps = MeanFlowConfig.load(checkpoint / "config.json").fps
    proc, probe = start_policy(latency_compensation=True, max_obs_age_s=1.0)
    probe.image_stamp_offset_s = 0.2  # the camera's frames are 0.2 s old on arrival
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 3, START_TIMEOUT), proc.output()
    for msg, _ in probe.trajectories:
        times = _times(msg)
        # points due within 0.2 s of the image are past; the rest stay on the image's time line
        assert 1 <= len(times) <= 20 - int(0.2 * fps)
        assert 0 < times[0] <= 1 / fps + 1e-6 and np.all(np.diff(times) > 0)
        np.testing.assert_allclose(np.diff(times), 1 / fps, atol=1e-6)
        assert times[-1] <= 20 / fps - 0.2 + 1e-6
