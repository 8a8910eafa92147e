"""The policy node's plain-Python core: observation assembly, staleness, chunk post-processing (no rclpy)."""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from meanflow_policy.ros.runtime import (
    ChunkError,
    ChunkStats,
    ClampMonitor,
    FutureStamp,
    ObservationNotReady,
    ObservationStale,
    ObservationStore,
    chunk_to_plan,
    hold_plan,
)
from so101_common.stamps import NS_PER_S
from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits

LIMITS = JointLimits.so101()
CAMS = ("wrist", "top")
NOW = 1_000 * NS_PER_S


def _image(value: int = 0) -> np.ndarray:
    return np.full((4, 5, 3), value, dtype=np.uint8)


def _full_store(stamp_ns: int = NOW, received_ns: int | None = None, **store_args) -> ObservationStore:
    """Every input stamped ``stamp_ns`` and received at ``received_ns`` (default: the stamp)."""
    received_ns = stamp_ns if received_ns is None else received_ns
    store = ObservationStore(CAMS, JOINT_NAMES, **store_args)
    for cam in CAMS:
        store.put_image(cam, _image(), stamp_ns, received_ns)
    store.put_joint_state(list(JOINT_NAMES), np.arange(6) * 0.1, stamp_ns, received_ns)
    return store


def test_core_does_not_import_rclpy():
    code = "import sys, meanflow_policy.ros.runtime; print('rclpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_joint_states_merged_by_name_in_contract_order():
    store = ObservationStore(CAMS, JOINT_NAMES)
    assert store.current_positions() is None
    reversed_names = list(reversed(JOINT_NAMES))
    ignored = store.put_joint_state(reversed_names[:3] + ["extra_joint"], [5.0, 4.0, 3.0, 9.0], NOW, NOW)
    assert ignored == ["extra_joint"]
    assert store.missing() == ["camera:wrist", "camera:top", *JOINT_NAMES[:3]]
    store.put_joint_state(list(JOINT_NAMES[:3]), [0.0, 1.0, 2.0], NOW, NOW)
    np.testing.assert_allclose(store.current_positions(), [0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("names,positions,match", [
    (["shoulder_pan"], [np.nan], "non-finite positions for \\['shoulder_pan'\\]"),
    (["gripper", "elbow_flex"], [0.1, np.inf], "non-finite positions for \\['elbow_flex'\\]"),
    (["gripper", "elbow_flex"], [0.1], "2 names but 1 positions"),
])
def test_bad_joint_states_are_refused_and_not_stored(names, positions, match):
    store = _full_store()
    before = store.current_positions()
    with pytest.raises(ValueError, match=match):
        store.put_joint_state(names, positions, NOW, NOW)
    np.testing.assert_array_equal(store.current_positions(), before)


def test_bad_images_refused():
    store = ObservationStore(CAMS, JOINT_NAMES)
    with pytest.raises(ValueError, match="unknown camera 'side'"):
        store.put_image("side", _image(), NOW, NOW)
    with pytest.raises(ValueError, match="camera 'wrist'.*uint8"):
        store.put_image("wrist", np.zeros((4, 5, 3), np.float32), NOW, NOW)
    with pytest.raises(ValueError, match="camera 'top'"):
        store.put_image("top", np.zeros((4, 5), np.uint8), NOW, NOW)


def test_take_names_missing_inputs():
    store = ObservationStore(CAMS, JOINT_NAMES)
    store.put_image("wrist", _image(), NOW, NOW)
    store.put_joint_state(["shoulder_pan"], [0.0], NOW, NOW)
    with pytest.raises(ObservationNotReady, match="camera:top, shoulder_lift, elbow_flex") as err:
        store.take(NOW, 0.5, "pick")
    assert err.value.reason == "missing"


def test_take_builds_policy_input_with_stamps():
    store = _full_store(NOW - NS_PER_S // 10)
    store.put_image("top", _image(7), NOW - NS_PER_S // 20, NOW)
    obs = store.take(NOW, 0.5, "pick the cube")
    assert obs.oldest_stamp_ns == NOW - NS_PER_S // 10
    assert obs.newest_image_stamp_ns == NOW - NS_PER_S // 20
    inp = obs.as_policy_input()
    assert set(inp["images"]) == set(CAMS) and inp["images"]["top"][0, 0, 0] == 7
    assert inp["state"].dtype == np.float32 and inp["state"].shape == (6,)
    np.testing.assert_allclose(inp["state"], np.arange(6) * 0.1, rtol=1e-6)
    assert inp["instruction"] == "pick the cube"


def test_stale_inputs_named_with_age():
    store = _full_store(NOW)
    store.put_image("top", _image(), NOW - 2 * NS_PER_S, NOW)
    with pytest.raises(ObservationStale, match=r"camera top image is 2\.000 s old \(max_obs_age_s 0\.5\)"):
        store.take(NOW, 0.5, "x")
    store.put_image("top", _image(), NOW, NOW)
    store.put_joint_state(["wrist_roll"], [0.0], NOW - NS_PER_S, NOW)
    with pytest.raises(ObservationStale, match=r"joint wrist_roll is 1\.000 s old"):
        store.take(NOW, 0.5, "x")
    # A stamp a little ahead of the receiver's clock (another process) is fresh, not negative-aged.
    store.put_joint_state(["wrist_roll"], [0.0], NOW + NS_PER_S // 100, NOW)
    assert store.take(NOW, 0.5, "x").state.shape == (6,)


@pytest.mark.parametrize("put", [
    lambda store, stamp: store.put_image("wrist", _image(9), stamp, NOW),
    lambda store, stamp: store.put_joint_state(["elbow_flex"], [1.5], stamp, NOW),
], ids=["image", "joint_state"])
def test_stamps_ahead_of_the_clock_beyond_tolerance_are_refused(put):
    store = _full_store(NOW)
    with pytest.raises(FutureStamp, match=r"stamped 100\.000 s ahead of this node's clock \(max_future_stamp_s 0\.1\)"):
        put(store, NOW + 100 * NS_PER_S)
    obs = store.take(NOW, 0.5, "x")  # the refused input did not replace the one before
    assert obs.images["wrist"][0, 0, 0] == 0 and obs.state[2] == pytest.approx(0.2)
    put(store, NOW + NS_PER_S // 20)  # within the tolerance: accepted
    store.max_future_stamp_s = 200.0  # the node's parameter changed
    put(store, NOW + 100 * NS_PER_S)


def test_staleness_also_judged_by_receive_time():
    """A sender clock 100 s ahead (tolerated here) must not keep a stopped stream fresh."""
    store = _full_store(NOW + 100 * NS_PER_S, received_ns=NOW, max_future_stamp_s=200.0)
    assert store.take(NOW + NS_PER_S // 5, 0.5, "x").state.shape == (6,)
    with pytest.raises(ObservationStale, match=r"camera wrist image was received 1\.000 s ago \(its stamp says "
                                               r"0\.000 s old\).*joint shoulder_pan was received 1\.000 s ago"):
        store.take(NOW + NS_PER_S, 0.5, "x")


def test_take_never_reuses_frames_of_an_earlier_observation():
    store = _full_store(NOW)
    store.take(NOW, 10.0, "x")
    with pytest.raises(ObservationNotReady, match="no new frame from camera wrist, top since the last chunk") as err:
        store.take(NOW + NS_PER_S, 10.0, "x")
    assert err.value.reason == "used"
    store.put_image("top", _image(3), NOW + NS_PER_S, NOW + NS_PER_S)
    with pytest.raises(ObservationNotReady, match="no new frame from camera wrist since"):
        store.take(NOW + NS_PER_S, 10.0, "x")
    store.put_image("wrist", _image(4), NOW + NS_PER_S, NOW + NS_PER_S)
    obs = store.take(NOW + NS_PER_S, 10.0, "x")
    assert obs.images["wrist"][0, 0, 0] == 4 and obs.images["top"][0, 0, 0] == 3


def test_wait_for_new_images_needs_a_new_frame_from_every_camera():
    store = _full_store()
    assert store.wait_for_new_images(0.0)
    store.take(NOW, 0.5, "x")
    assert not store.wait_for_new_images(0.01)
    store.put_image("wrist", _image(), NOW, NOW)
    assert not store.wait_for_new_images(0.01)

    def later() -> None:
        time.sleep(0.05)
        store.put_image("top", _image(), NOW, NOW)

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    assert store.wait_for_new_images(5.0)
    assert time.monotonic() - t0 < 2.0


def test_wait_for_new_images_cancelled():
    store = _full_store()
    store.take(NOW, 0.5, "x")
    cancel = threading.Event()

    def stop() -> None:
        time.sleep(0.05)
        cancel.set()
        store.notify()

    threading.Thread(target=stop).start()
    t0 = time.monotonic()
    assert not store.wait_for_new_images(10.0, cancel)
    assert time.monotonic() - t0 < 5.0


def test_plan_without_compensation_is_the_whole_chunk():
    chunk = np.tile(LIMITS.middle, (20, 1)).astype(np.float32)
    plan = chunk_to_plan(chunk, LIMITS, dt_s=1 / 30, elapsed_s=0.2, compensate_latency=False)
    np.testing.assert_allclose(plan.times_s, (np.arange(20) + 1) / 30)
    assert plan.positions.shape == (20, 6) and plan.dropped == 0 and plan.clamped == 0


def test_plan_clamps_to_joint_limits():
    chunk = np.zeros((20, 6), np.float32)
    chunk[3, 0] = 10.0
    chunk[5, 5] = -10.0
    plan = chunk_to_plan(chunk, LIMITS, dt_s=0.05)
    assert plan.clamped == 2 and plan.clamped_by_joint == {"shoulder_pan": 1, "gripper": 1}
    assert plan.positions[3, 0] == pytest.approx(LIMITS.upper[0])
    assert plan.positions[5, 5] == pytest.approx(LIMITS.lower[5])
    assert LIMITS.contains(plan.positions)


def test_plan_with_compensation_drops_past_points_and_shifts_times():
    chunk = np.tile(np.arange(20, dtype=np.float32)[:, None] * 0.01, (1, 6))
    plan = chunk_to_plan(chunk, LIMITS, dt_s=0.1, elapsed_s=0.25, compensate_latency=True)
    # points due at 0.1 and 0.2 s after the observation are past at 0.25 s; 0.3 s is 0.05 s ahead.
    assert plan.dropped == 2 and len(plan.times_s) == 18
    np.testing.assert_allclose(plan.times_s[:2], [0.05, 0.15])
    np.testing.assert_allclose(plan.positions[0], chunk[2])
    assert np.all(np.diff(plan.times_s) > 0) and plan.times_s[0] > 0


def test_plan_with_compensation_exact_boundary_drops_due_point():
    chunk = np.zeros((4, 6), np.float32)
    plan = chunk_to_plan(chunk, LIMITS, dt_s=0.1, elapsed_s=0.1, compensate_latency=True)
    assert plan.dropped == 1 and plan.times_s[0] == pytest.approx(0.1)


def test_plan_latency_beyond_horizon_is_an_error():
    with pytest.raises(ChunkError, match="exceeds the chunk horizon"):
        chunk_to_plan(np.zeros((20, 6)), LIMITS, dt_s=1 / 30, elapsed_s=0.7, compensate_latency=True)


@pytest.mark.parametrize("chunk,match", [
    (np.zeros((20, 5)), r"chunk must be \(steps, 6\)"),
    (np.zeros((0, 6)), r"chunk must be \(steps, 6\)"),
    (np.zeros(6), r"chunk must be \(steps, 6\)"),
])
def test_plan_rejects_bad_shapes(chunk, match):
    with pytest.raises(ChunkError, match=match):
        chunk_to_plan(chunk, LIMITS, dt_s=0.1)


def test_plan_rejects_non_finite_naming_joints():
    chunk = np.zeros((20, 6), np.float32)
    chunk[4, 1] = np.nan
    chunk[7, 5] = np.inf
    with pytest.raises(ChunkError, match=r"NaN or inf for joints \['gripper', 'shoulder_lift'\]"):
        chunk_to_plan(chunk, LIMITS, dt_s=0.1)


def test_hold_plan_is_one_clamped_point():
    plan = hold_plan(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 9.0]), LIMITS, dt_s=0.05)
    assert plan.positions.shape == (1, 6) and plan.times_s.tolist() == [0.05]
    assert plan.positions[0, 5] == pytest.approx(LIMITS.upper[5])
    np.testing.assert_allclose(plan.positions[0, :5], [0.1, 0.2, 0.3, 0.4, 0.5])


def test_stats_summary_resets_period_but_keeps_totals():
    stats = ChunkStats()
    stats.add_chunk(total_ms=10.0, expert_ms=4.0, obs_age_ms=20.0)
    stats.add_chunk(total_ms=30.0, expert_ms=6.0, obs_age_ms=40.0)
    stats.count("stale_observations")
    text = stats.summary()
    assert "2 chunks" in text and "total ms median 20.0 max 30.0" in text and "expert ms median 5.0" in text
    assert "stale_observations 1" in text
    assert stats.summary().startswith("0 chunks")
    assert stats.totals_snapshot() == {"chunks": 2, "stale_observations": 1}


def _plan(clamped_gripper: int, clamped_pan: int = 0):
    chunk = np.tile(LIMITS.middle, (20, 1))
    chunk[:clamped_gripper, 5] = 9.0
    chunk[:clamped_pan, 0] = -9.0
    return chunk_to_plan(chunk, LIMITS, dt_s=0.05)


def test_sustained_clamping_is_reported_with_counts():
    monitor = ClampMonitor(sustained_chunks=3, error_fraction=0.25)
    assert monitor.observe(_plan(20), 120) is None and monitor.observe(_plan(20), 120) is None
    assert monitor.observe(_plan(0), 120) is None  # a clean chunk ends the run
    assert monitor.observe(_plan(20), 120) is None and monitor.observe(_plan(20), 120) is None
    report = monitor.observe(_plan(20, 2), 120)
    assert report is not None and not report.error
    assert ("clamped to the joint limits in 3 chunks in a row: 62 of 360 values (17 %; gripper 60, "
            "shoulder_pan 2)") in report.message
    report = monitor.observe(_plan(20), 120)
    assert not report.error and "in 4 chunks in a row: 82 of 480 values" in report.message
    heavy = ClampMonitor(sustained_chunks=3, error_fraction=0.25)
    reports = [heavy.observe(_plan(20, 20), 120) for _ in range(3)]
    assert reports[:2] == [None, None] and reports[2].error and "120 of 360 values (33 %" in reports[2].message
