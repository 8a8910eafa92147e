"""The chunk hand-off core shared by the policy node and the sim's real-time evaluation."""
import numpy as np
import pytest

from so101_common.handoff import (DEFAULT_AVERAGE, DEFAULT_CANDIDATES, CommandStream, HandoffError, hand_off,
                                  limit_steps, resolve_average, rtc_guide, smooth_chunk)

J = 6


def ramp(start: float, n: int, step: float = 0.01) -> np.ndarray:
    """n rows, every joint at start + (k + 1) * step: row k is the target of step k + 1."""
    return np.repeat((start + step * np.arange(1, n + 1))[:, None], J, axis=1)


def test_replace_skips_the_rows_already_elapsed():
    old = ramp(0.0, 20)
    new = ramp(0.05, 20)
    out = hand_off("replace", old, reached=10, new=new, delay=3)
    np.testing.assert_allclose(out.commands, new[3:])
    assert out.skipped == 3 and out.overlap == 0 and out.limited == 0 and not out.stale


def test_replace_with_every_row_in_the_past_targets_the_last_row():
    old = ramp(0.0, 20)
    new = ramp(0.0, 20)
    out = hand_off("replace", old, reached=20, new=new, delay=24)
    assert out.stale and out.skipped == 20
    np.testing.assert_allclose(out.commands, new[-1:])


def test_blend_weights_ramp_from_old_to_new_over_the_overlap():
    old = np.full((20, J), 0.0)
    new = np.full((20, J), 0.1)
    out = hand_off("blend", old, reached=14, new=new, delay=2, max_step=1.0)
    # 6 old rows left, 18 new rows ahead: overlap 6 with new-chunk weights 1/7 .. 6/7, then the new chunk.
    assert out.overlap == 6 and len(out.commands) == 18
    np.testing.assert_allclose(out.commands[:6, 0], 0.1 * np.arange(1, 7) / 7)
    np.testing.assert_allclose(out.commands[6:], new[8:])


def test_blend_without_old_rows_left_is_replace():
    old = np.full((20, J), 0.0)
    new = ramp(0.0, 20)
    blended = hand_off("blend", old, reached=20, new=new, delay=4, max_step=1.0)
    replaced = hand_off("replace", old, reached=20, new=new, delay=4, max_step=1.0)
    assert blended.overlap == 0
    np.testing.assert_allclose(blended.commands, replaced.commands)


def test_rtc_continues_the_old_plan_and_returns_to_the_new_chunk():
    old = ramp(0.0, 20)
    new = ramp(0.04, 20)  # same velocity (0.01 per step), the next target 0.05 rad behind the old plan's
    out = hand_off("rtc", old, reached=12, new=new, delay=3, rtc_horizon=8)
    np.testing.assert_allclose(out.commands[0], old[12])  # no jump: exactly the old plan's next target
    np.testing.assert_allclose(out.commands[8:], new[11:])  # past the horizon: the new chunk itself
    steps = np.diff(np.concatenate([old[11:12, 0], out.commands[:, 0]]))
    # The offset fades out with a minimum-jerk profile: the first step is the old plan's, no step departs from the
    # new chunk's velocity by more than the profile's peak rate (1.875 / horizon) times the offset.
    assert steps[0] == pytest.approx(0.01)
    assert np.all(np.abs(steps - 0.01) <= 0.05 * 1.875 / 8 + 1e-12)
    assert out.overlap == 8


def test_rtc_runs_the_committed_rows_still_ahead_as_planned_then_fades_into_the_new_chunk():
    old = ramp(0.0, 20)
    new = ramp(0.04, 20)  # where the new chunk takes over (its row 6), 0.06 rad behind the old plan (row 16)
    # 6 rows committed, 2 of them past: the next 4 run exactly as the old plan, then the fade starts there.
    out = hand_off("rtc", old, reached=12, new=new, delay=2, rtc_horizon=8, committed=6)
    np.testing.assert_allclose(out.commands[:4], old[12:16])
    np.testing.assert_allclose(out.commands[4], old[16])  # the old plan's target where the new chunk takes over
    np.testing.assert_allclose(out.commands[12:], new[14:])  # past the horizon: the new chunk itself
    assert np.all(np.abs(np.diff(out.commands[:, 0]) - 0.01) <= 0.06 * 1.875 / 8 + 1e-12)
    # Committed rows all past (the latency's): the same as without them.
    np.testing.assert_allclose(hand_off("rtc", old, 12, new, 6, rtc_horizon=8, committed=6).commands,
                               hand_off("rtc", old, 12, new, 6, rtc_horizon=8).commands)
    # Committed beyond the old plan's end: its last row is held meanwhile.
    held = hand_off("rtc", old, reached=18, new=new, delay=0, rtc_horizon=8, committed=4)
    np.testing.assert_allclose(held.commands[:4], old[[18, 19, 19, 19]])
    with pytest.raises(HandoffError, match="committed must be >= 0"):
        hand_off("rtc", old, 12, new, 2, committed=-1)


def test_rtc_without_the_correction_runs_the_committed_rows_then_the_chunk_as_generated():
    """The RTC paper's execution (a guided chunk already continues the plan): nothing is faded in; without
    committed rows that is replace, and the max_step limit still holds."""
    old = ramp(0.0, 20)
    new = ramp(0.04, 20)
    out = hand_off("rtc", old, reached=12, new=new, delay=2, committed=6, rtc_correct=False)
    np.testing.assert_allclose(out.commands[:4], old[12:16])
    np.testing.assert_allclose(out.commands[4:], new[6:])
    assert out.overlap == 0
    np.testing.assert_allclose(hand_off("rtc", old, 12, new, 2, rtc_correct=False).commands,
                               hand_off("replace", old, 12, new, 2).commands)
    far = hand_off("rtc", old, 12, new + 1.0, 2, committed=6, max_step=0.05, rtc_correct=False)
    assert np.abs(np.diff(np.vstack([old[11], far.commands]), axis=0)).max() <= 0.05 + 1e-12
    assert far.limited > 0


def test_rtc_fades_a_large_offset_over_more_steps():
    old = np.zeros((20, J))
    new = np.full((20, J), 1.0)  # the arm held at 0 while the new chunk stands 1 rad away
    out = hand_off("rtc", old, reached=20, new=new, delay=2, max_step=0.25, rtc_horizon=4)
    # Peak acceleration of the fade 5.77 * 1 / h^2 <= 0.25 / 8 per step^2: h = 14 steps instead of 4.
    assert out.overlap == 14 and out.limited == 0
    path = np.concatenate([old[-1:, 0], out.commands[:, 0]])
    assert np.max(np.abs(np.diff(path, 2))) <= 0.25 / 8 * 1.02  # discrete steps of a continuous bound
    np.testing.assert_allclose(out.commands[14:], new[-1:].repeat(len(out.commands) - 14, axis=0))
    small = hand_off("rtc", old, reached=20, new=np.full((20, J), 0.02), delay=2, max_step=0.25, rtc_horizon=4)
    assert small.overlap == 4


def test_rtc_leaves_exempt_joints_to_switch_like_replace():
    old = ramp(0.0, 20)
    new = ramp(0.04, 20)
    out = hand_off("rtc", old, reached=12, new=new, delay=3, rtc_exempt=[5])
    replaced = hand_off("replace", old, reached=12, new=new, delay=3)
    np.testing.assert_allclose(out.commands[:, 5], replaced.commands[:, 5])  # the gripper follows the new chunk
    np.testing.assert_allclose(out.commands[0, :5], old[12, :5])  # the arm continues the old plan


def test_rtc_after_the_old_sequence_ran_out_starts_from_the_held_position():
    old = ramp(0.0, 20)
    new = ramp(0.1, 20)
    out = hand_off("rtc", old, reached=20, new=new, delay=5)
    np.testing.assert_allclose(out.commands[0], old[-1])


@pytest.mark.parametrize("mode", ["replace", "blend", "rtc"])
def test_a_chunk_entirely_in_the_past_still_brings_the_arm_to_its_last_row(mode):
    old = np.zeros((20, J))
    new = ramp(0.0, 20, step=0.05)  # ends 1.0 rad away
    out = hand_off(mode, old, reached=20, new=new, delay=24, max_step=0.25)
    assert out.stale
    np.testing.assert_allclose(out.commands[-1], new[-1])
    assert np.max(np.abs(np.diff(np.vstack([old[-1:], out.commands]), axis=0))) <= 0.25 + 1e-12


@pytest.mark.parametrize("mode", ["replace", "blend", "rtc"])
def test_no_command_jumps_more_than_max_step_at_a_hand_off(mode):
    old = np.zeros((20, J))
    new = np.full((20, J), 1.0)  # a chunk 1 rad away from what the arm was commanded
    out = hand_off(mode, old, reached=20, new=new, delay=2, max_step=0.15)
    prev = np.vstack([old[-1:], out.commands])
    assert np.max(np.abs(np.diff(prev, axis=0))) <= 0.15 + 1e-12
    if mode != "rtc":  # rtc starts on the old plan and fades slowly enough: nothing to limit
        assert out.limited > 0
        np.testing.assert_allclose(out.commands[0], 0.15)


def test_limit_steps_counts_limited_values_and_still_reaches_the_last_row():
    rows, limited = limit_steps(np.array([[0.5, 0.0], [0.5, 0.05]]), np.zeros(2), 0.2)
    np.testing.assert_allclose(rows, [[0.2, 0.0], [0.4, 0.05], [0.5, 0.05]])
    assert limited == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="smooth"), "unknown hand-off mode 'smooth'"),
    (dict(new=np.zeros((20, 5))), "5 joints"),
    (dict(new=np.full((20, J), np.nan)), "new chunk contains NaN"),
    (dict(delay=-1), "delay must be >= 0"),
    (dict(max_step=0.0), "max_step must be > 0"),
])
def test_bad_inputs_are_named(kwargs, match):
    args = dict(mode="replace", current=np.zeros((20, J)), reached=5, new=np.zeros((20, J)), delay=1)
    args.update(kwargs)
    with pytest.raises(HandoffError, match=match):
        hand_off(**args)


def test_command_stream_holds_at_the_end_and_executes_a_hand_off():
    stream = CommandStream(np.zeros(J))
    assert stream.remaining == 0
    np.testing.assert_allclose(stream.advance(), 0.0)  # nothing to execute: hold
    stream.take_over("replace", ramp(0.0, 5), delay=2)
    assert stream.remaining == 3
    got = [stream.advance()[0] for _ in range(5)]
    np.testing.assert_allclose(got, [0.03, 0.04, 0.05, 0.05, 0.05])
    stream.take_over("replace", ramp(0.0, 5), delay=0)
    stream.advance()
    stream.truncate()  # synchronous inference: stop where the arm is
    assert stream.remaining == 0
    np.testing.assert_allclose(stream.advance(), 0.01)


def test_rtc_guide_asks_for_the_rows_executed_while_the_chunk_is_computed():
    seq = np.arange(30, dtype=float)[:, None] * np.ones((1, 6))
    target, weights = rtc_guide(seq, reached=12, delay=6, chunk_size=20, execute=10, exempt=[5])
    # Row k is the target of the step chunk row k is for; past the sequence's end the arm holds its last row.
    assert np.array_equal(target[:, 0], np.r_[12:30, 29, 29])
    rows = weights[:, 0]
    assert np.array_equal(rows[:6], np.ones(6)) and np.all(rows[10:] == 0)
    assert np.all(np.diff(rows[5:11]) < 0) and 0 < rows[9] < rows[6] < 1
    assert np.all(weights[:, :5] == rows[:, None]) and np.all(weights[:, 5] == 0)  # the exempt gripper: free
    # A delay past the free rows: only the committed ones count. A used-up sequence: its held row.
    _, w = rtc_guide(seq, 12, delay=15, chunk_size=20, execute=10)
    assert np.array_equal(w[:, 0], np.r_[np.ones(15), np.zeros(5)])
    held, _ = rtc_guide(seq[:1], 1, 6, 20, 10)
    assert np.array_equal(held, np.zeros((20, 6)))
    with pytest.raises(HandoffError, match="rtc_guide needs"):
        rtc_guide(seq, 0, 6, 20, 0)


def test_resolve_average_defaults_within_the_candidates_and_refuses_a_count_outside_them():
    assert resolve_average(None, DEFAULT_CANDIDATES) == DEFAULT_AVERAGE
    assert resolve_average(None, 1) == 1  # one candidate: a plain draw, whatever the default
    assert resolve_average(3, 8) == 3
    for average, candidates in ((9, 8), (0, 4)):
        with pytest.raises(ValueError, match=r"average must be within 1..candidates"):
            resolve_average(average, candidates)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        resolve_average(None, 0)


def _second_differences(x: np.ndarray) -> np.ndarray:
    return x[2:] - 2 * x[1:-1] + x[:-2]


def test_chunk_smoothing_removes_row_to_row_jitter_and_keeps_a_constant_velocity():
    rng = np.random.default_rng(0)
    path = ramp(0.1, 20, step=0.02)
    jitter = 0.01 * rng.standard_normal(path.shape)
    out = smooth_chunk(path + jitter, passes=10, exempt=(5,))
    # A straight line in time is a fixed point, ends included (point reflection keeps position and slope there).
    np.testing.assert_allclose(smooth_chunk(path, passes=10), path, atol=1e-12)
    # The jitter's acceleration falls by far more than half on every smoothed joint, the path stays near.
    before = np.abs(_second_differences(jitter[:, :5])).mean(axis=0)
    after = np.abs(_second_differences(out[:, :5] - path[:, :5])).mean(axis=0)
    assert np.all(after < 0.2 * before)
    assert np.abs(out[:, :5] - path[:, :5]).max() < 0.03
    # The exempt gripper column is returned bit for bit; no passes is the chunk itself.
    np.testing.assert_array_equal(out[:, 5], (path + jitter)[:, 5])
    np.testing.assert_array_equal(smooth_chunk(path + jitter, passes=0), path + jitter)


def test_chunk_smoothing_refuses_negative_passes_and_a_flat_array():
    with pytest.raises(ValueError, match="passes"):
        smooth_chunk(ramp(0.0, 20), passes=-1)
    with pytest.raises(ValueError, match="steps, joints"):
        smooth_chunk(np.zeros(20), passes=2)
