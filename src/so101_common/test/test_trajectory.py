import numpy as np
import pytest

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits, home_vector
from so101_common.trajectory import TrajectoryError, TrajectoryFollower


def make_follower() -> TrajectoryFollower:
    return TrajectoryFollower(JointLimits.so101(), home_vector())


def test_interpolates_from_position_at_receipt():
    f = make_follower()
    start = home_vector()
    goal = start + 0.2
    f.set_trajectory(now=10.0, joint_names=JOINT_NAMES, times_from_start=[1.0], positions=goal[None])
    np.testing.assert_allclose(f.sample(10.0), start)
    np.testing.assert_allclose(f.sample(10.5), (start + goal) / 2)
    np.testing.assert_allclose(f.sample(11.0), goal)
    np.testing.assert_allclose(f.sample(50.0), goal)  # holds the last point
    assert f.finished(11.0) and not f.finished(10.9)


def test_multi_point_and_replacement_starts_from_current_target():
    f = make_follower()
    pts = home_vector()[None] + np.array([[0.1], [0.2], [0.3]])
    f.set_trajectory(0.0, JOINT_NAMES, [0.1, 0.2, 0.3], pts)
    np.testing.assert_allclose(f.sample(0.15), (pts[0] + pts[1]) / 2)
    mid = f.sample(0.15)
    f.set_trajectory(0.15, JOINT_NAMES, [0.1], (home_vector() - 0.1)[None])
    np.testing.assert_allclose(f.sample(0.15), mid)  # no jump on replacement
    np.testing.assert_allclose(f.sample(0.25), home_vector() - 0.1)


def test_subset_of_joints_keeps_others_and_reorders():
    f = make_follower()
    f.set_trajectory(0.0, ["gripper", "shoulder_pan"], [0.5], np.array([[1.0, 0.3]]))
    out = f.sample(1.0)
    expected = home_vector()
    expected[JOINT_NAMES.index("gripper")] = 1.0
    expected[JOINT_NAMES.index("shoulder_pan")] = 0.3
    np.testing.assert_allclose(out, expected)


def test_clamps_to_joint_limits():
    f = make_follower()
    limits = JointLimits.so101()
    f.set_trajectory(0.0, JOINT_NAMES, [0.1], np.full((1, 6), 10.0))
    np.testing.assert_allclose(f.sample(1.0), limits.upper)
    f.set_trajectory(1.0, JOINT_NAMES, [0.1], np.full((1, 6), -10.0))
    np.testing.assert_allclose(f.sample(2.0), limits.lower)


def test_future_start_time_holds_until_start():
    f = make_follower()
    goal = home_vector() + 0.1
    f.set_trajectory(0.0, JOINT_NAMES, [1.0], goal[None], start_time=2.0)
    np.testing.assert_allclose(f.sample(1.0), home_vector() + (goal - home_vector()) * (1.0 / 3.0))
    np.testing.assert_allclose(f.sample(3.0), goal)


def test_past_points_are_skipped():
    f = make_follower()
    pts = home_vector()[None] + np.array([[0.1], [0.2]])
    f.set_trajectory(now=5.0, joint_names=JOINT_NAMES, times_from_start=[1.0, 2.0], positions=pts, start_time=3.5)
    # 1.5 s into the trajectory: halfway between the two points.
    np.testing.assert_allclose(f.sample(5.0), (pts[0] + pts[1]) / 2)


@pytest.mark.parametrize("names,times,pos,match", [
    (["elbow"], [0.1], [[0.0]], "unknown joints"),
    (["gripper", "gripper"], [0.1], [[0.0, 0.0]], "duplicate"),
    (list(JOINT_NAMES), [0.2, 0.1], np.zeros((2, 6)), "strictly increasing"),
    (list(JOINT_NAMES), [0.1], [[np.nan] * 6], "NaN"),
    (list(JOINT_NAMES), [0.1], np.zeros((1, 5)), "positions must be"),
    (list(JOINT_NAMES), [], np.zeros((0, 6)), "no points"),
])
def test_rejects_bad_trajectories_and_keeps_running(names, times, pos, match):
    f = make_follower()
    before = f.sample(0.0)
    with pytest.raises(TrajectoryError, match=match):
        f.set_trajectory(0.0, names, times, np.asarray(pos, dtype=float))
    np.testing.assert_allclose(f.sample(1.0), before)


def test_hold_stops_motion():
    f = make_follower()
    f.set_trajectory(0.0, JOINT_NAMES, [1.0], (home_vector() + 0.4)[None])
    here = f.sample(0.5)
    f.hold(0.5)
    np.testing.assert_allclose(f.sample(2.0), here)
