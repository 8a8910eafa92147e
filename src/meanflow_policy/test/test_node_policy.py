"""The policy node over real DDS: instruction handling, chunk contents, nfe, start-up errors.

The node runs as its own process with a tiny random checkpoint; this process publishes images and joint
states (PolicyProbe) and checks what comes back.
"""
import numpy as np
import pytest
import torch
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient

from meanflow_policy.ros.probe import PolicyProbe
from meanflow_policy.model.configuration import MeanFlowConfig, fastest_precision
from so101_common import graph
from so101_common.images import stamp_to_ns
from so101_common.instruction import MAX_INSTRUCTION_CHARS
from so101_common.joints import JointLimits
from so101_common.testing import spin_until

NODE = "meanflow_policy.ros.policy_node"
START_TIMEOUT = 90.0  # torch import + model load + warm-up on a loaded 2-core machine


def _call(node, future, timeout=30.0):
    assert spin_until(node, future.done, timeout), "service call got no answer"
    return future.result()


def test_instruction_gates_chunks_and_chunks_follow_the_contract(checkpoint, node_process, ros_node):
    proc = node_process(NODE, params={"checkpoint": str(checkpoint), "nfe": 1, "rate_hz": 10.0})
    probe = PolicyProbe(ros_node, height=72, width=96)  # not the model's size: the policy resizes
    probe.start_streams(image_hz=15.0)
    assert probe.instruction_client.wait_for_service(timeout_sec=START_TIMEOUT)
    assert spin_until(ros_node, lambda: "no instruction yet" in proc.output(), START_TIMEOUT), proc.output()
    spin_until(ros_node, lambda: False, 1.0)
    assert probe.trajectories == [], "published without an instruction"

    empty = _call(ros_node, probe.set_instruction("   "))
    assert not empty.accepted and "empty" in empty.message
    long = _call(ros_node, probe.set_instruction("x" * (MAX_INSTRUCTION_CHARS + 1)))
    assert not long.accepted and f"{MAX_INSTRUCTION_CHARS + 1} characters" in long.message
    spin_until(ros_node, lambda: False, 0.5)
    assert probe.trajectories == [], "a rejected instruction started the policy"

    ok = _call(ros_node, probe.set_instruction("  pick up the red cube "))
    assert ok.accepted and "next chunk" in ok.message
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 3 and len(probe.timings) >= 3, 30.0)

    config = MeanFlowConfig.load(checkpoint / "config.json")
    limits = JointLimits.so101()
    for msg, receipt_ns in probe.trajectories:
        assert tuple(msg.joint_names) == graph.JOINT_NAMES
        assert len(msg.points) == config.chunk_size == 20
        times = np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points])
        np.testing.assert_allclose(times, (np.arange(20) + 1) / config.fps, atol=1e-6)
        positions = np.array([p.positions for p in msg.points])
        assert positions.shape == (20, 6) and np.all(np.isfinite(positions)) and limits.contains(positions)
        assert 0 <= (receipt_ns - stamp_to_ns(msg.header.stamp)) / 1e9 < 1.0, "stamp is not the publish time"
    for timing in probe.timings:
        assert timing.nfe == 1
        assert timing.total_ms > 0 and timing.expert_ms > 0 and timing.prefix_ms > 0
        assert timing.total_ms >= timing.expert_ms
        assert 0 <= timing.obs_age_ms < 500.0
    assert "instruction set: 'pick up the red cube'" in proc.output()
    assert proc.stop() == 0, "SIGINT did not end the node cleanly"


def test_nfe_parameter_changes_expert_evaluations(checkpoint, node_process, ros_node):
    node_process(NODE, params={"checkpoint": str(checkpoint), "nfe": 1, "rate_hz": 10.0,
                               "instruction": "stack the blocks"})
    probe = PolicyProbe(ros_node, height=64, width=64)
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: len(probe.timings) >= 6, START_TIMEOUT)
    one = [t.expert_ms for t in probe.timings if t.nfe == 1]
    assert len(one) == len(probe.timings)

    params = AsyncParameterClient(ros_node, graph.POLICY_NODE)
    assert params.wait_for_services(timeout_sec=10.0)
    refused = _call(ros_node, params.set_parameters([Parameter("nfe", value=0)]))
    assert not refused.results[0].successful, "nfe 0 accepted"
    done = _call(ros_node, params.set_parameters([Parameter("nfe", value=8)]))
    assert done.results[0].successful, done.results[0].reason
    assert spin_until(ros_node, lambda: sum(t.nfe == 8 for t in probe.timings) >= 6, 60.0)
    eight = [t.expert_ms for t in probe.timings if t.nfe == 8]
    assert {t.nfe for t in probe.timings} == {1, 8}
    # Eight expert evaluations cost several times one (theory: 8x; margin for a busy machine).
    assert np.median(eight) > 2.5 * np.median(one), (one, eight)


@pytest.mark.parametrize("params,message", [
    ({}, "parameter checkpoint is required"),
    ({"checkpoint": "/nonexistent/ckpt"}, "cannot load checkpoint '/nonexistent/ckpt'"),
    ({"checkpoint": "/tmp", "device": "tpu"}, "parameter device is 'tpu'; expected one of"),
    ({"checkpoint": "/tmp", "nfe": 0}, "parameter nfe (default 1): Invalid parameter value (0)"),
])
def test_bad_configuration_stops_with_a_clear_error(node_process, params, message):
    proc = node_process(NODE, params=params, discovery=False)
    proc.proc.wait(timeout=60)
    assert proc.proc.returncode == 2, proc.output()
    assert message in proc.output()


def test_int8_backbone_at_a_smaller_image_size_publishes_chunks_and_bad_values_are_refused(checkpoint, node_process,
                                                                                           ros_node):
    """backbone_precision and image_size (the tiny checkpoint is trained at 64 px: 32 px reads a quarter of its
    patches) apply at configure and are logged; a value the model cannot take stops the node with one line."""
    proc = node_process(NODE, params={"checkpoint": str(checkpoint), "rate_hz": 10.0, "backbone_precision": "int8",
                                      "image_size": 32, "instruction": "put the cube in the box"})
    probe = PolicyProbe(ros_node, height=48, width=64)
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 3, START_TIMEOUT), proc.output()
    assert "in int8 at 32 px" in proc.output()
    assert proc.stop() == 0
    for params, message in (({"backbone_precision": "int4"},
                              "parameter backbone_precision: backbone precision must be one of"),
                             ({"image_size": 40}, "parameter image_size: image size 40 px cannot be read by this "
                              "backbone (trained at 64 px): use one of [16, 32, 48, 64]")):
        bad = node_process(NODE, params={"checkpoint": str(checkpoint), **params}, discovery=False)
        bad.proc.wait(timeout=60)
        assert bad.proc.returncode == 2, bad.output()
        assert message in bad.output()


def test_auto_backbone_runs_in_the_fastest_precision_for_this_cpu(checkpoint, node_process, ros_node):
    expected = fastest_precision("cpu", torch.cpu.get_capabilities())
    proc = node_process(NODE, params={"checkpoint": str(checkpoint), "rate_hz": 10.0, "backbone_precision": "auto",
                                      "instruction": "put the cube in the box"})
    probe = PolicyProbe(ros_node, height=48, width=64)
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 3, START_TIMEOUT), proc.output()
    assert f"in {expected} at 64 px," in proc.output()
    assert proc.stop() == 0
