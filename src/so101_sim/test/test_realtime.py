"""Real-time evaluation: sim time advances while the policy computes (so101_sim.realtime, so101-eval-realtime)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from so101_sim import realtime
from so101_sim.env import SimEnv
from so101_sim.evaluate import ExpertEvalPolicy
from so101_sim.realtime import latency_steps, run_realtime_episode
from so101_sim.rollout import run_episode
from so101_sim.scene import SceneConfig


@pytest.fixture(scope="module")
def env():
    e = SimEnv(SceneConfig(image_height=32, image_width=32))
    yield e
    e.close()


@pytest.fixture(scope="module")
def expert(env):
    return ExpertEvalPolicy(env)


def test_latency_becomes_whole_control_steps():
    dt = 1 / 30
    assert [latency_steps(ms, dt) for ms in (0, 33, 100, 200, 400, 800)] == [0, 1, 3, 6, 12, 24]


@pytest.mark.parametrize("handoff", ["sync", "replace"])
def test_zero_latency_executes_what_so101_eval_executes(env, expert, handoff):
    reference = run_episode(env, expert, seed=4, max_steps=150, action_steps=10)
    final = env.joint_positions()
    ep = run_realtime_episode(env, expert, seed=4, max_steps=150, action_steps=10, handoff=handoff, latency_ms=0)
    assert ep.steps == reference.steps and ep.chunks == reference.chunks and ep.held_steps == 0
    assert (ep.success, ep.score) == (reference.success, reference.score)
    # Per-step commands vs whole-chunk interpolation differ in the last bits; the gripper's contact with the cube
    # amplifies that to ~1e-5 rad on some CPUs (seen in CI), so the joints agree to 1e-4 rad (0.006 deg).
    np.testing.assert_allclose(env.joint_positions(), final, atol=1e-4)


def test_injected_latency_is_deterministic(env, expert):
    runs = [realtime.evaluate_realtime(env, expert, [5, 6], max_steps=150, action_steps=10, handoff="blend",
                                       latency_ms=400) for _ in range(2)]
    first, second = ([{k: v for k, v in r.items() if k != "chunk_latency_ms"} for r in run["results"]]
                     for run in runs)
    assert first == second  # every figure (the measured compute time aside) is the same
    a = run_realtime_episode(env, expert, 5, 150, 10, "rtc", 400)
    b = run_realtime_episode(env, expert, 5, 150, 10, "rtc", 400)
    assert a.commanded == b.commanded and a.handoff_steps == b.handoff_steps


def test_large_latency_changes_the_executed_trajectory(env, expert):
    fast = run_realtime_episode(env, expert, 7, 150, 10, "replace", 0)
    slow = run_realtime_episode(env, expert, 7, 150, 10, "replace", 800)
    # 24 control steps per chunk: the arm has used each chunk up long before the next one arrives, and holds.
    assert slow.held_steps > 50 and fast.held_steps == 0
    assert np.max(np.abs(np.asarray(slow.commanded) - np.asarray(fast.commanded))) > 0.1


def test_sync_holds_the_arm_while_the_policy_computes(env, expert):
    ep = run_realtime_episode(env, expert, 8, 100, 10, "sync", 200)  # 6 control steps per chunk
    cmd = np.asarray(ep.commanded)
    # Observations at 0, 16, 32, ..., 96: each followed by 6 steps holding (the first at home), then 10 of motion.
    assert ep.chunks == 7 and ep.handoff_steps[:4] == [16, 22, 32, 38]
    np.testing.assert_allclose(cmd[16:23], np.repeat(cmd[16:17], 7, axis=0))
    assert np.max(np.abs(cmd[23] - cmd[22])) > 0
    assert ep.held_steps == 6 * 6 + 4  # the last wait is cut short by the end of the episode


@pytest.mark.parametrize("handoff", ["sync", "replace", "blend", "rtc"])
def test_no_commanded_jump_beyond_max_step_at_any_latency(env, expert, handoff):
    ep = run_realtime_episode(env, expert, 9, 150, 10, handoff, 800, max_step=0.12)
    assert ep.cmd_jump_max <= 0.12 + 1e-9 and ep.handoff_jump_max <= 0.12 + 1e-9


def test_rtc_halves_the_commanded_boundary_acceleration_of_replace_when_chunks_run_out(env, expert):
    replace = run_realtime_episode(env, expert, 10, 200, 10, "replace", 400)
    rtc = run_realtime_episode(env, expert, 10, 200, 10, "rtc", 400)
    assert replace.boundary_cmd_accel_max > 20.0  # the held arm is yanked into the new chunk
    assert rtc.boundary_cmd_accel_max <= 0.5 * replace.boundary_cmd_accel_max
    # Measured, less: rtc matches position, not velocity (the held arm starts at the new chunk's speed).
    assert rtc.boundary_accel_max <= 0.75 * replace.boundary_accel_max
    # replace's jerk is the hand-off's: half way between hand-offs the same arm moves more gently.
    assert replace.boundary_accel_max > 1.5 * replace.between_accel_max


def test_rtc_without_its_correction_executes_the_new_chunks_as_replace_does(env, expert):
    """--no-rtc-correction (the RTC paper's execution): with nothing committed, the chunks run as generated, so the
    episode is replace's step for step; the correction is what makes rtc differ."""
    replace = run_realtime_episode(env, expert, 10, 120, 10, "replace", 400)
    plain = run_realtime_episode(env, expert, 10, 120, 10, "rtc", 400, rtc_correct=False)
    corrected = run_realtime_episode(env, expert, 10, 120, 10, "rtc", 400)
    assert plain.commanded == replace.commanded and plain.handoff_steps == replace.handoff_steps
    assert corrected.commanded != replace.commanded


def test_between_figure_is_the_same_window_half_way_between_hand_offs():
    dt = 0.1
    steps = 40
    velocities = np.zeros((steps + 1, 6))
    commanded = np.zeros((steps + 1, 6))
    velocities[12:, 0] += 0.3  # 3 rad/s^2 in the window after the hand-off at 10
    velocities[26:, 1] += 0.5  # 5 rad/s^2 half way between the hand-offs at 20 and 30 (window 26..28)
    velocities[33:, 5] += 9.0  # the gripper is not an arm joint
    out = realtime._smoothness(commanded, velocities, [10, 20, 30], dt)
    assert out["boundary_accel_max"] == pytest.approx(3.0) and out["between_accel_max"] == pytest.approx(5.0)
    # Hand-offs closer than two windows leave no window between them that no hand-off acts in.
    assert realtime._smoothness(commanded, velocities, [20, 25], dt)["between_accel_max"] == 0.0


def test_chunk_smoothing_takes_a_policys_row_to_row_jitter_out_of_the_commands(env, expert):
    """A policy whose chunks zig-zag row to row (the expert's plan + 0.02 rad alternating on the arm joints): with
    chunk smoothing the arm is commanded the plan's path without the zig-zag, the gripper's commands untouched."""
    def jittery(obs: dict) -> np.ndarray:
        chunk = np.array(expert(obs), dtype=np.float64)
        chunk[:, :5] += 0.02 * (-1.0) ** np.arange(len(chunk))[:, None]
        return chunk

    def zigzag(ep) -> float:
        cmd = np.asarray(ep.commanded)[:, :5]
        return float(np.abs(cmd[2:] - 2 * cmd[1:-1] + cmd[:-2]).mean())

    raw = run_realtime_episode(env, jittery, 11, 120, 10, "replace", 100)
    smooth = run_realtime_episode(env, jittery, 11, 120, 10, "replace", 100, chunk_smoothing=8)
    plan = run_realtime_episode(env, expert, 11, 120, 10, "replace", 100)
    assert zigzag(raw) > 0.05 and zigzag(smooth) < 0.2 * zigzag(raw)
    np.testing.assert_allclose(np.asarray(smooth.commanded)[:, :5], np.asarray(plan.commanded)[:, :5], atol=0.02)
    assert [c[5] for c in smooth.commanded] == [c[5] for c in raw.commanded]


def test_cli_table_and_last_line(tmp_path, capsys):
    out = tmp_path / "rt"
    rc = realtime.main(["--policy", "expert", "--latencies", "0,400", "--handoffs", "replace,rtc", "--episodes", "1",
                        "--seed", "3", "--max-steps", "90", "--image-size", "32", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    last = json.loads(text.strip().splitlines()[-1])
    assert [(r["latency_ms"], r["handoff"]) for r in last["rows"]] == [(0.0, "replace"), (0.0, "rtc"),
                                                                        (400.0, "replace"), (400.0, "rtc")]
    assert all(r["policy"] == "expert" and r["episodes"] == 1 and 0 <= r["success_rate"] <= 1
               and r["boundary_accel_max"] >= 0 and r["between_accel_max"] >= 0 for r in last["rows"])
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| latency (ms) | policy | hand-off |") and all(line.startswith("|")
                                                                               for line in table[: 2 + 4])
    assert "commit " in table[-1] and "cores" in table[-1]  # where the numbers came from, under the table
    cell = json.loads((out / "expert_400.0ms_rtc.json").read_text())
    assert cell["handoff"] == "rtc" and len(cell["results"]) == 1 and cell["results"][0]["seed"] == 3
    assert cell["rtc_correction"] is True and cell["rtc_guidance"] is False
    assert all(r["rtc_correction"] is True and r["rtc_guidance"] is False and r["chunk_smoothing"] == 0
               for r in last["rows"])
    saved = json.loads((out / "rows.json").read_text())
    assert saved["rows"] == last["rows"] and saved["commit"] and saved["machine"] and saved["episodes"] == 1
    assert (out / "realtime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the rows drawn
    # Cells in two worker processes: the same rows, in the same order (injected latency is deterministic).
    rc = realtime.main(["--policy", "expert", "--latencies", "0,400", "--handoffs", "replace,rtc", "--episodes", "1",
                        "--seed", "3", "--max-steps", "90", "--image-size", "32", "--workers", "2",
                        "--out", str(tmp_path / "rt2")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == last["rows"]


@pytest.mark.parametrize("args,match", [
    (["--latencies", "fast"], "--latencies: 'fast' is neither a number of ms nor 'measured'"),
    (["--latencies", "-5"], "must be >= 0 ms"),
    (["--handoffs", "smooth"], "--handoffs: smooth given"),
    (["--policy", "shipped@0"], "NFE >= 1"),
    (["--policy", "/nonexistent/ckpt@1"], "is not a directory"),
    (["--policy", "expert", "--max-step", "0"], "--max-step must be > 0"),
    (["--policy", "expert", "--rtc-commit", "-1"], "--rtc-commit must be >= 0 rows, got -1"),
    (["--policy", "expert", "--chunk-smoothing", "-2"], "--chunk-smoothing: must be >= 0 passes, got -2"),
])
def test_cli_bad_arguments_exit_2_with_one_line(args, match, capsys):
    with pytest.raises(SystemExit) as exc:
        realtime.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_cli_with_a_checkpoint_at_its_measured_latency(tmp_path, capsys):
    from meanflow_policy import testing
    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt")
    rc = realtime.main(["--policy", f"{ckpt}@1", "--latencies", "measured", "--handoffs", "blend", "--episodes", "1",
                        "--max-steps", "30", "--image-size", "32", "--out", str(tmp_path / "rt")])
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["latency_ms"] == "measured" and row["policy"] == "meanflow_nfe1"
    cell = json.loads((tmp_path / "rt" / "meanflow_nfe1_measuredms_blend.json").read_text())
    assert cell["chunk_latency"]["count"] >= 1 and cell["chunk_latency"]["median_ms"] > 0


def test_rtc_guidance_hands_the_policy_the_rows_the_arm_executes_meanwhile(env, expert):
    """With rtc guidance every observation after the first carries the next rows of the executed sequence, weighted
    1 over the injected delay; without it (or for another hand-off) no observation does."""
    seen: list[dict] = []
    executed: list[np.ndarray] = []

    def recording(obs: dict) -> np.ndarray:
        seen.append(obs)
        return expert(obs)

    ep = run_realtime_episode(env, recording, 5, 80, 10, "rtc", 200, rtc_guidance=True)
    executed = np.asarray(ep.commanded)
    guides = [obs.get("guide") for obs in seen]
    assert guides[0] is None and all(g is not None for g in guides[1:]) and len(guides) >= 4
    for k, (target, weights) in enumerate(guides[1:], start=1):
        observed = 10 * k  # inference starts every action_steps (10) steps
        np.testing.assert_allclose(target[:6], executed[observed + 1:observed + 7], atol=1e-12)
        assert np.all(weights[:6, :5] == 1) and np.all(weights[10:] == 0)
        assert np.all(weights[:, 5] == 0)  # the gripper is the new chunk's to decide
    assert all(obs["steer"] for obs in seen[1:])  # the policy steers its draws onto the guide (rtc guidance)
    for handoff, guidance in (("rtc", False), ("replace", True)):
        seen.clear()
        run_realtime_episode(env, recording, 5, 40, 10, handoff, 200, rtc_guidance=guidance)
        assert all("guide" not in obs for obs in seen)
    # guide_plan (a policy drawing several candidates): every hand-off gets the guide; sync, where the arm stops
    # while the chunk is computed, with nothing committed.
    for handoff, committed in (("replace", 6), ("sync", 0)):
        seen.clear()
        run_realtime_episode(env, recording, 5, 40, 10, handoff, 200, guide_plan=True)
        guides = [obs.get("guide") for obs in seen]
        assert guides[0] is None and all(g is not None for g in guides[1:]) and len(guides) >= 2
        assert all(int((g[1][:, 0] == 1).sum()) == committed for g in guides[1:])
        assert not any(obs["steer"] for obs in seen[1:])  # the guide only picks among the candidates
    # --rtc-commit: at least that many rows committed, at any latency (at 0 ms the arm executes none meanwhile).
    for latency, commit, committed in ((0, 6, 6), (0, 0, 0), (200, 3, 6)):
        seen.clear()
        run_realtime_episode(env, recording, 5, 40, 10, "rtc", latency, rtc_guidance=True, rtc_commit=commit)
        guides = [obs.get("guide") for obs in seen]
        assert len(guides) >= 2 and all(int((g[1][:, 0] == 1).sum()) == committed for g in guides[1:])
