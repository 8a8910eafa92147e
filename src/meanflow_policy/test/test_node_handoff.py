"""Asynchronous chunk hand-off in the policy node: the plain core (runtime.Handoffs) and the node over DDS.

Over DDS the node runs as its own process with a tiny random checkpoint, whose chunks jump around: exactly what
the hand-off must absorb. Every published trajectory must start after its stamp (never in the past) and no
target may move more than ``max_step`` per control step from what the arm was commanded at that instant.
"""
import numpy as np
import pytest

from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.ros.probe import PolicyProbe
from meanflow_policy.ros.runtime import ChunkError, Handoffs
from so101_common.images import stamp_to_ns
from so101_common.joints import JointLimits
from so101_common.testing import spin_until

LIMITS = JointLimits.so101()
DT = 0.1
NODE = "meanflow_policy.ros.policy_node"
START_TIMEOUT = 90.0


def chunk_from(start: np.ndarray, step: float, n: int = 20) -> np.ndarray:
    return start[None, :] + step * (np.arange(n) + 1)[:, None]


def test_first_chunk_starts_from_the_measured_position_within_max_step():
    h = Handoffs(LIMITS, DT)
    here = LIMITS.middle
    chunk = chunk_from(here + 0.5, 0.01)
    out = h.plan("replace", chunk, elapsed_s=0.25, now_ns=10**9, measured=here, max_step=0.1)
    # 0.25 s after the observation: 2 rows are past, the third is due 0.05 s from now.
    assert out.delay_steps == 2
    np.testing.assert_allclose(out.plan.times_s[:3], [0.05, 0.15, 0.25])
    steps = np.diff(np.vstack([here, out.plan.positions]), axis=0)
    assert np.max(np.abs(steps)) <= 0.1 + 1e-12 and out.limited > 0
    np.testing.assert_allclose(out.plan.positions[-1], chunk[-1])  # limited, yet it gets there
    with pytest.raises(ChunkError, match="no joint state known"):
        h.plan("replace", chunk, 0.0, 10**9, measured=None, max_step=0.1)


@pytest.mark.parametrize("elapsed", [0.0, 0.1, 0.2, 0.2999, 0.35, 2.5])
def test_a_published_trajectory_never_starts_in_the_past(elapsed):
    h = Handoffs(LIMITS, DT)
    out = h.plan("rtc", chunk_from(LIMITS.middle, 0.01), elapsed, 0, LIMITS.middle, 0.25)
    assert 0 < out.plan.times_s[0] <= DT + 1e-9 and np.all(np.diff(out.plan.times_s) > 0)


def test_second_chunk_continues_the_published_trajectory():
    h = Handoffs(LIMITS, DT)
    here = LIMITS.middle
    first = h.plan("replace", chunk_from(here, 0.01), 0.0, 0, here, 0.25)
    h.remember(0, first)
    # 0.5 s later (5 steps of the first trajectory executed) a chunk from an observation 0.2 s old arrives,
    # 0.03 rad off the first plan: replace jumps onto it, rtc continues the first plan and fades over to it.
    now = 500_000_000
    new = chunk_from(here + 0.06, 0.01)  # row k is due at obs + (k + 1) dt = now - 0.2 + (k + 1) dt
    replaced = h.plan("replace", new, 0.2, now, here, 0.25)
    np.testing.assert_allclose(replaced.plan.positions, new[2:])
    rtc = h.plan("rtc", new, 0.2, now, here, 0.25)
    np.testing.assert_allclose(rtc.plan.positions[0], here + 0.06, atol=1e-9)  # the first plan at now + dt
    np.testing.assert_allclose(rtc.start, here + 0.05, atol=1e-9)  # the first plan now
    blend = h.plan("blend", new, 0.2, now, here, 0.25)
    assert np.all(blend.plan.positions[0] > here + 0.06) and np.all(blend.plan.positions[0] < new[2])
    h.reset()
    assert h.end_ns() is None


def test_rtc_guide_is_the_published_trajectory_on_the_new_chunks_time_line():
    h = Handoffs(LIMITS, DT, rtc_exempt=[5])
    assert h.guide(0, 0.2, 20, 5) is None  # nothing published: nothing to follow
    here = LIMITS.middle
    h.remember(0, h.plan("replace", chunk_from(here, 0.01), 0.0, 0, here, 0.25))
    # An observation 0.3 s after that stamp: the chunk's row k is due at 0.3 + (k + 1) dt, where the first plan
    # is at here + 0.01 (4 + k) until its end (row 19, here + 0.2), held from there.
    target, weights = h.guide(300_000_000, 0.2, 20, 5)
    expected = here[None, :] + 0.01 * np.minimum(np.arange(20) + 4, 20)[:, None]
    np.testing.assert_allclose(target, expected, atol=1e-9)
    assert np.all(weights[:2, :5] == 1) and np.all(0 < weights[2, :5]) and np.all(weights[2, :5] < 1)
    assert np.all(weights[15:] == 0) and np.all(weights[:, 5] == 0)
    # rtc_commit: at least that many rows committed, more than the latency's; fewer leave the latency's.
    _, weights = h.guide(300_000_000, 0.2, 20, 5, commit_rows=8)
    assert np.all(weights[:8, :5] == 1) and np.all(weights[8, :5] < 1)
    _, weights = h.guide(300_000_000, 0.2, 20, 5, commit_rows=1)
    assert np.all(weights[:2, :5] == 1) and np.all(weights[2, :5] < 1)


@pytest.mark.parametrize("mode, guidance, candidates, correction", [
    ("replace", False, 8, True), ("blend", False, 1, True), ("rtc", False, 1, True), ("rtc", True, 1, True),
    ("rtc", False, 8, True), ("rtc", True, 8, False)])
def test_node_hand_offs_over_dds_start_now_and_never_jump_beyond_max_step(mode, guidance, candidates, correction,
                                                                          checkpoint, node_process, ros_node):
    max_step = 0.05
    proc = node_process(NODE, params={"checkpoint": str(checkpoint), "nfe": 1, "rate_hz": 10.0,
                                      "instruction": "pick up the red cube", "handoff": mode,
                                      "rtc_guidance": guidance, "candidates": candidates, "max_step": max_step,
                                      "rtc_correction": correction})
    probe = PolicyProbe(ros_node, height=64, width=64)
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 5, START_TIMEOUT), proc.output()
    fps = MeanFlowConfig.load(checkpoint / "config.json").fps
    measured = probe.sensors.positions  # what the probe publishes as /joint_states
    previous = None  # (stamp ns, times with the start at 0, positions with the start first)
    for msg, receipt_ns in probe.trajectories[:5]:
        stamp_ns = stamp_to_ns(msg.header.stamp)
        assert 0 <= (receipt_ns - stamp_ns) / 1e9 < 1.0, "stamp is not the publish time"
        times = np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points])
        positions = np.array([p.positions for p in msg.points])
        assert 0 < times[0] <= 1 / fps + 1e-6, f"first point {times[0]} s after the stamp"
        np.testing.assert_allclose(np.diff(times), 1 / fps, atol=1e-6)
        if previous is None:
            start = measured
        else:
            t = (stamp_ns - previous[0]) / 1e9
            start = np.array([np.interp(t, previous[1], previous[2][:, j]) for j in range(6)])
        steps = np.abs(np.diff(np.vstack([start, positions]), axis=0))
        assert steps.max() <= max_step + 1e-6, f"{mode}: a step of {steps.max():.3f} rad"
        previous = (stamp_ns, np.concatenate([[0.0], times]), np.vstack([start, positions]))
    assert proc.stop() == 0


def test_unknown_handoff_stops_the_node_with_one_clear_line(checkpoint, node_process):
    proc = node_process(NODE, params={"checkpoint": str(checkpoint), "handoff": "smooth"})
    proc.proc.wait(timeout=START_TIMEOUT)
    assert proc.proc.returncode == 2, proc.output()
    assert "parameter handoff is 'smooth'; expected one of ['off', 'replace', 'blend', 'rtc']" in proc.output()
    assert "Traceback" not in proc.output()



def _jitter(msgs) -> float:
    """Mean absolute second difference over the rows of the published arm targets (rad per step^2)."""
    arm = [np.array([p.positions for p in msg.points])[:, :5] for msg, _ in msgs]
    return float(np.mean([np.abs(a[2:] - 2 * a[1:-1] + a[:-2]).mean() for a in arm]))


def test_chunk_smoothing_is_set_at_run_time_and_takes_the_jitter_out_of_published_chunks(checkpoint, node_process,
                                                                                          ros_node):
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    from so101_common import graph

    proc = node_process(NODE, params={"checkpoint": str(checkpoint), "nfe": 1, "rate_hz": 10.0,
                                      "instruction": "pick up the red cube"})
    probe = PolicyProbe(ros_node, height=64, width=64)
    probe.start_streams(image_hz=15.0)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 4, START_TIMEOUT), proc.output()
    raw = _jitter(probe.trajectories[:4])
    params = AsyncParameterClient(ros_node, graph.POLICY_NODE)
    assert params.wait_for_services(timeout_sec=10.0)
    for value, accepted in ((-1, False), (12, True)):
        future = params.set_parameters([Parameter("chunk_smoothing", value=value)])
        assert spin_until(ros_node, future.done, 30.0)
        assert future.result().results[0].successful == accepted, value
    count = len(probe.trajectories)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= count + 5, 60.0)
    smoothed = _jitter(probe.trajectories[count + 1:count + 5])  # the first may have been computed before the set
    assert raw > 0 and smoothed < 0.25 * raw, (raw, smoothed)
    assert proc.stop() == 0
