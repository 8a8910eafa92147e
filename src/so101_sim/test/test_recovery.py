"""Recovery demos: the expert takes over from the state a policy left, and only its part is recorded."""
from __future__ import annotations

import json

import mujoco
import numpy as np
import pytest
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory

from so101_common.episode_bag import read_episode_metadata
from so101_common.handoff import smooth_chunk
from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC
from so101_common.joints import home_vector
from so101_sim import recovery
from so101_sim.dwell import Dwell, Hold, OffCentre, OffCentreWatch, Waver
from so101_sim.demos import generate
from so101_sim.env import SimEnv
from so101_sim.evaluate import evaluate
from so101_sim.expert import ExpertChunkPolicy, ExpertConfig, ScriptedExpert
from so101_sim.ik import TopDownIK
from so101_sim.scene import CUBE_BODY, GREEN_CUBE_BODY, TOY_BODY, SceneConfig
from so101_sim.rollout import GRIPPER, run_episode
from so101_sim.tasks import TASKS

SIZE = 32
PAN_OFFSET = 0.35


def _first_state_and_command_count(path) -> tuple[np.ndarray, int]:
    with Reader(path) as reader:
        first = next(raw for c, _, raw in reader.messages() if c.topic == JOINT_STATES_TOPIC)
        n_commands = sum(c.msgcount for c in reader.connections if c.topic == TRAJECTORY_TOPIC)
    return np.array(deserialize_message(bytes(first), JointState).position), n_commands


def _commanded_gripper(path) -> np.ndarray:
    """The gripper target of every trajectory command in the episode, in order."""
    with Reader(path) as reader:
        raws = [raw for c, _, raw in reader.messages() if c.topic == TRAJECTORY_TOPIC]
    return np.array([deserialize_message(bytes(r), JointTrajectory).points[0].positions[-1] for r in raws])


def hovering_policy(observation: dict) -> np.ndarray:
    """Turns the base away from home and stays there: a stand-in for a policy stuck beside the cube."""
    target = home_vector()
    target[0] += PAN_OFFSET
    return np.repeat(target[None], 20, axis=0)


def test_handover_step_is_drawn_per_seed_within_range():
    r = recovery.HandoverRange(24, 300)
    draws = [r.draw(s) for s in range(200)]
    assert draws == [r.draw(s) for s in range(200)]
    assert min(draws) >= 24 and max(draws) <= 300 and len(set(draws)) > 50
    assert recovery.HandoverRange(7, 7).draw(123) == 7
    with pytest.raises(ValueError, match="first <= last"):
        recovery.HandoverRange(50, 10)
    with pytest.raises(ValueError, match="1 <= first"):
        recovery.HandoverRange(0, 10)


def test_expert_takes_over_from_the_policys_state_and_succeeds(tmp_path):
    recorder = recovery.RecoveryRecorder(hovering_policy, recovery.HandoverRange(40, 40))
    out = tmp_path / "rec"
    results = generate(out, 1, seed=7, image_size=SIZE, record=recorder, max_tries=1, log=lambda m: None)
    assert len(results) == 1 and results[0].success and results[0].seed == 7
    assert recorder.handovers == {"episode_0000": 40}
    meta = read_episode_metadata(out / "episode_0000")
    assert meta.success is True and meta.seed == 7 and meta.status == "complete"
    first, n_commands = _first_state_and_command_count(out / "episode_0000")
    # The episode starts where the policy left the arm (base turned away), not at home.
    assert first[0] == pytest.approx(home_vector()[0] + PAN_OFFSET, abs=0.05)
    assert n_commands == results[0].steps


def test_no_recovery_once_the_policy_succeeded(tmp_path):
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    try:
        expert = ExpertChunkPolicy(env)
        recorder = recovery.RecoveryRecorder(expert, recovery.HandoverRange(300, 300))
        with pytest.raises(recovery.SeedSkipped, match="the policy succeeded"):
            recorder(env, 3, tmp_path / "episode_0000")
    finally:
        env.close()
    assert not (tmp_path / "episode_0000").exists() and recorder.handovers == {}


def _commands(path) -> np.ndarray:
    """Every trajectory command of the episode (one target per control step), in order."""
    with Reader(path) as reader:
        raws = [raw for c, _, raw in reader.messages() if c.topic == TRAJECTORY_TOPIC]
    return np.array([deserialize_message(bytes(r), JointTrajectory).points[0].positions for r in raws])


def test_rollout_mode_records_what_a_successful_policy_commanded(tmp_path):
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    try:
        recorder = recovery.RolloutRecorder(ExpertChunkPolicy(env), max_steps=360)
        demo = recorder(env, 5, tmp_path / "episode_0000")
        # The same policy closed loop from the same reset: the targets it sent, step by step.
        sent: list[np.ndarray] = []
        step = env.step
        env.step = lambda: (step(), sent.append(env.commanded()))  # type: ignore[method-assign]
        closed_loop = run_episode(env, ExpertChunkPolicy(env), 5, max_steps=360, action_steps=10)
        del env.step
    finally:
        env.close()
    assert demo.success and recorder.steps == {"episode_0000": closed_loop.steps}
    recorded = _commands(demo.path)
    assert recorded.shape == (closed_loop.steps, 6)
    np.testing.assert_allclose(recorded, np.asarray(sent[-closed_loop.steps:]), atol=1e-9)
    assert read_episode_metadata(demo.path).success is True


def test_rollout_mode_skips_a_policy_that_fails(tmp_path):
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    try:
        recorder = recovery.RolloutRecorder(hovering_policy, max_steps=30)
        with pytest.raises(recovery.SeedSkipped, match="did not succeed in 30 steps"):
            recorder(env, 3, tmp_path / "episode_0000")
        env.step()  # the env's own step is back
    finally:
        env.close()
    assert not (tmp_path / "episode_0000").exists() and recorder.steps == {}


class SweepingPolicy:
    """Turns the base a little further each row, from wherever the arm is: every chunk's rows differ, and the
    last one is kept to check which rows were committed."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def __call__(self, observation: dict) -> np.ndarray:
        rows = np.repeat(home_vector()[None], 20, axis=0)
        rows[:, 0] = observation["state"][0] + 0.01 * np.arange(1, 21)
        self.chunks.append(rows)
        return rows


def test_latency_mode_records_the_committed_rows_of_the_chunk_then_the_expert_from_where_they_end(tmp_path):
    policy = SweepingPolicy()
    recorder = recovery.LatencyRecorder(policy, recovery.HandoverRange(43, 43), 6)
    out = tmp_path / "lat"
    results = generate(out, 1, seed=7, image_size=SIZE, record=recorder, max_tries=1, log=lambda m: None)
    assert len(results) == 1 and results[0].success and recorder.handovers == {"episode_0000": 43}
    assert len(policy.chunks) == 5  # steps 0, 10, 20, 30, 40: at step 43 three rows of the fifth are executed
    commands = _commands(out / "episode_0000")
    # The episode's first rows are the rows the arm goes on with while the next chunk is computed ...
    np.testing.assert_allclose(commands[:6], policy.chunks[-1][3:9], atol=1e-9)
    first, _ = _first_state_and_command_count(out / "episode_0000")
    assert first[0] == pytest.approx(policy.chunks[-1][2, 0], abs=0.05)
    # ... and the expert's plan continues from where they leave the arm (no jump back to where it was at step 43).
    assert abs(commands[6, 0] - commands[5, 0]) < 0.02
    assert read_episode_metadata(out / "episode_0000").success is True
    with pytest.raises(ValueError, match="--latency-steps must be >= 1"):
        recovery.LatencyRecorder(policy, recovery.HandoverRange(43, 43), 0)


def test_latency_mode_with_chunk_smoothing_commits_the_rows_the_arm_runs(tmp_path):
    """With --chunk-smoothing the policy's chunks run smoothed, as in so101-eval; the committed rows recorded are
    those smoothed rows, not the chunk as the policy made it."""
    class ZigzagSweep(SweepingPolicy):
        def __call__(self, observation: dict) -> np.ndarray:
            rows = super().__call__(observation)
            rows[:, 1] += 0.02 * (-1.0) ** np.arange(20)  # the shoulder zig-zags from row to row
            return rows

    policy = ZigzagSweep()
    recorder = recovery.LatencyRecorder(policy, recovery.HandoverRange(43, 43), 6, chunk_smoothing=8)
    out = tmp_path / "lat"
    results = generate(out, 1, seed=7, image_size=SIZE, record=recorder, max_tries=1, log=lambda m: None)
    assert len(results) == 1 and results[0].success
    commands = _commands(out / "episode_0000")
    smoothed = smooth_chunk(policy.chunks[-1], 8, GRIPPER)
    assert np.abs(smoothed[3:9] - policy.chunks[-1][3:9]).max() > 0.005  # the filter changed them
    np.testing.assert_allclose(commands[:6], smoothed[3:9], atol=1e-9)


class PlannedStandIn:
    """A scripted stand-in for a policy, built on a plan made when the episode starts (the expert's, unless
    ``make_plan`` says otherwise): ``rows`` turns the next 20 control steps into the chunk."""

    def __init__(self, env: SimEnv) -> None:
        self.env = env
        self.plan = np.zeros((1, len(JOINT_NAMES)))

    def make_plan(self) -> np.ndarray:
        return ScriptedExpert(self.env).plan()

    def rows(self, steps: np.ndarray) -> np.ndarray:
        return self.plan[steps.clip(max=len(self.plan) - 1)].copy()

    def __call__(self, observation: dict) -> np.ndarray:
        if self.env.steps == 0:
            self.plan = self.make_plan()
        return self.rows(np.arange(self.env.steps + 1, self.env.steps + 21)).astype(np.float32)


class ExpertThenDrift(PlannedStandIn):
    """A policy that goes wrong mid-task: the expert's own plan for the first ``k`` control steps, then that step's
    target held, the base turning by ``pan`` rad over 1 s."""

    def __init__(self, env: SimEnv, k: int, pan: float) -> None:
        super().__init__(env)
        self.k, self.pan = k, pan

    def rows(self, steps: np.ndarray) -> np.ndarray:
        rows = super().rows(np.minimum(steps, self.k))
        rows[:, 0] += self.pan * np.clip((steps - self.k) / 30.0, 0.0, 1.0)
        return rows


def test_dwell_is_a_still_grasp_point_and_a_still_gripper_for_the_whole_window():
    dwell = Dwell(steps=5, radius=0.01, grip_rad=0.05)
    still = np.tile([0.2, 0.0, 0.06, 0.6], (5, 1))
    assert dwell.dwelling(still)
    assert not dwell.dwelling(still[:4])  # not yet long enough
    drifting = still.copy()
    drifting[:, 0] += np.linspace(0.0, 0.02, 5)
    assert not dwell.dwelling(drifting) and dwell.dwelling(np.vstack([drifting, still]))  # the latest rows count
    closing = still.copy()
    closing[:, 3] = np.linspace(0.6, 0.3, 5)
    assert not dwell.dwelling(closing)  # a grasp being closed is no dwell
    with pytest.raises(ValueError, match="steps >= 1"):
        Dwell(steps=0)


def _watched(env: SimEnv, policy, rule, seed: int, tmp_path, what: str):
    """``so101-sim-recovery``'s watch recorder for ``rule`` on ``policy`` (one episode written), and on the expert
    itself, which never shows ``what`` and leaves nothing. Returns the recorder and the episode."""
    recorder = recovery.WatchRecorder(policy, max_steps=360, rule=rule)
    demo = recorder(env, seed, tmp_path / "episode_0000")
    with pytest.raises(recovery.SeedSkipped, match=f"no {what}"):
        recovery.WatchRecorder(ExpertChunkPolicy(env), max_steps=360, rule=rule)(env, seed, tmp_path / "episode_0001")
    assert not (tmp_path / "episode_0001").exists()
    return recorder, demo


def test_dwell_mode_takes_over_where_the_policy_hovers_over_the_cube(tmp_path):
    """A policy that stops at the expert's hover point above the cube (gripper open) and stays: the expert takes
    over once it has stayed ``steps``, from that state, and succeeds; a policy that never dwells leaves nothing."""
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    try:
        hover = ExpertThenDrift(env, k=round(ExpertConfig.t_reach * env.cfg.fps) - 1, pan=0.0)  # reach ends
        recorder, demo = _watched(env, hover, Dwell(steps=30), 4, tmp_path, "dwell at a grasp")
        env.step()  # the env's own step is back
    finally:
        env.close()
    assert demo.success
    handover = recorder.handovers["episode_0000"]
    # Once the hover has lasted the window (the reach's slow last centimetre counts towards it).
    assert hover.k + 15 <= handover <= hover.k + 31
    first, _ = _first_state_and_command_count(demo.path)
    np.testing.assert_allclose(first[:5], hover.plan[hover.k][:5], atol=0.05)  # it starts at the hover


class ExpertAimingOff(PlannedStandIn):
    """The expert's plan for the toy as if it lay ``shift`` m further along its own x axis (towards its head): the
    way the stacking policy fails, descending on the right line across the toy but off its torso's centre."""

    def __init__(self, env: SimEnv, shift: float) -> None:
        super().__init__(env)
        self.shift = shift

    def make_plan(self) -> np.ndarray:
        env = self.env
        qpos = env.scene.objects[TOY_BODY].qpos
        saved = env.data.qpos[qpos:qpos + 3].copy()
        env.data.qpos[qpos:qpos + 3] += self.shift * env.data.xmat[env.scene.objects[TOY_BODY].body][[0, 3, 6]]
        mujoco.mj_forward(env.model, env.data)
        plan = super().make_plan()
        env.data.qpos[qpos:qpos + 3] = saved
        mujoco.mj_forward(env.model, env.data)
        return plan


def test_off_centre_descent_is_the_offset_along_the_jaws_faces_while_descending_with_open_jaws():
    """The expert's own descent onto the toy stays within a millimetre or two of its centre along the jaws' faces
    (its 8 mm fixed-jaw clearance is across them, and does not count); one aimed 2 cm along the toy shows 2 cm;
    before the descent and once the toy is held there is nothing to judge."""
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE), task="stacking")
    try:
        seen: dict[str, list] = {}
        for label, policy in (("expert", ExpertChunkPolicy(env)), ("off", ExpertAimingOff(env, 0.02))):
            env.reset(7)
            watch = OffCentreWatch(env)
            offsets = []
            for _ in range(150):
                chunk = policy({})
                env.set_trajectory(JOINT_NAMES, env.cfg.control_dt * np.arange(1, 21), chunk)
                env.step()
                offsets.append(watch.offset())
            seen[label] = offsets
    finally:
        env.close()
    judged = {k: [o for o in v if o is not None] for k, v in seen.items()}
    assert seen["expert"][0] is None and len(judged["expert"]) >= 5  # judged during the descent only
    assert max(judged["expert"]) < 0.003
    assert 0.015 < np.median(judged["off"]) < 0.025
    with pytest.raises(ValueError, match="offset"):
        OffCentre(offset=0.0)


def test_offcentre_mode_takes_over_during_an_off_centre_descent_and_the_expert_stacks_from_there(tmp_path):
    """A descent aimed 2 cm towards the toy's head (the expert itself fails from there every time): the expert takes
    over above the grasp height with the jaws open, re-aligns, and stacks; an aligned descent leaves nothing."""
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE), task="stacking")
    try:
        off = ExpertAimingOff(env, 0.02)
        result = run_episode(env, off, 7, max_steps=360, action_steps=10)
        recorder, demo = _watched(env, ExpertAimingOff(env, 0.02), OffCentre(), 7, tmp_path, "off-centre descent")
    finally:
        env.close()
    assert not result.success  # left alone, the off-centre grasp fails
    assert demo.success
    first, _ = _first_state_and_command_count(demo.path)
    assert first[-1] > OffCentre.grip_open  # taken over with the jaws still open
    assert 0 < recorder.handovers["episode_0000"] < 150


class ExpertThenWaver(PlannedStandIn):
    """The expert's plan to the hover over the toy (step ``k``), then held there with the wrist roll swinging 1.2
    rad back and forth: a policy that cannot decide between the two jaw directions."""

    def __init__(self, env: SimEnv, k: int) -> None:
        super().__init__(env)
        self.k = k

    def rows(self, steps: np.ndarray) -> np.ndarray:
        rows = super().rows(np.minimum(steps, self.k))
        rows[:, JOINT_NAMES.index("wrist_roll")] += 1.2 * np.sin(np.pi * np.clip(steps - self.k, 0, None) / 40.0)
        return rows


def test_waver_mode_takes_over_where_the_wrist_turns_back_over_the_toy(tmp_path):
    """The wrist swinging over the toy is recognised once it has turned back by more than 0.8 rad, and the expert
    takes over there and stacks; the expert's own run never turns back, and leaves nothing."""
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE), task="stacking")
    try:
        k = round(ExpertConfig.t_reach * env.cfg.fps)
        recorder, demo = _watched(env, ExpertThenWaver(env, k), Waver(), 7, tmp_path, "wrist turning back")
    finally:
        env.close()
    assert demo.success
    # out to +1.2 rad by k + 20, back past +0.4 some 13 steps later
    assert k + 25 <= recorder.handovers["episode_0000"] <= k + 40
    with pytest.raises(ValueError, match="swing"):
        Waver(swing=0.0)


class ExpertThenHold(PlannedStandIn):
    """The expert's plan until its target is over the box at carry height, the cube in the jaws, then held there:
    a policy that carries the cube to its place and never lets it go."""

    def make_plan(self) -> np.ndarray:
        plan = super().make_plan()
        ik, box = TopDownIK(self.env.scene), np.asarray(self.env.cfg.box_center)
        self.k = next(i for i, row in enumerate(plan) if np.linalg.norm(ik.forward(row[:-1])[0][:2] - box) < 0.01)
        return plan

    def rows(self, steps: np.ndarray) -> np.ndarray:
        return super().rows(np.minimum(steps, self.k))


def test_hold_mode_takes_over_where_the_policy_holds_the_cube_over_the_box(tmp_path):
    """The cube held over the box at carry height is recognised once it has been held there for 1.5 s; the expert
    takes over, lowers it and lets go. so101-eval counts that episode, not the expert's own (which lowers as it
    arrives), and the expert's own run leaves no recovery."""
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    try:
        holding = ExpertThenHold(env)
        recorder, demo = _watched(env, holding, Hold(), 4, tmp_path, "object held over its place")
        held = evaluate(env, ExpertThenHold(env), [4], max_steps=360, action_steps=10, log=lambda _: None)
        expert = evaluate(env, ExpertChunkPolicy(env), [4], max_steps=360, action_steps=10, log=lambda _: None)
    finally:
        env.close()
    assert demo.success
    # over the box within the carry's last steps, then held for the whole window
    assert holding.k + Hold.steps - 15 <= recorder.handovers["episode_0000"] <= holding.k + Hold.steps + 1
    # the recorded part starts with the cube still in the jaws, and ends with it released
    grip = _commanded_gripper(tmp_path / "episode_0000")
    assert grip[0] < 0.2 and grip[-1] > 0.5
    assert (held["held_over_place"], held["successes"]) == (1, 0) and held["results"][0]["score"] == 0.5
    assert (expert["held_over_place"], expert["successes"]) == (0, 1)
    assert expert["results"][0]["hold_step"] is None
    with pytest.raises(ValueError, match="hold needs"):
        Hold(steps=0)


def test_evaluation_reports_where_each_grasp_caught_the_object():
    """so101-eval's grasp watch: the expert catches the toy at its torso's centre; the descent aimed 2 cm towards
    the head catches it there (+2 cm along its length, in its own frame) and is counted off-centre."""
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE), task="stacking")
    try:
        good = evaluate(env, ExpertChunkPolicy(env), [7], max_steps=360, action_steps=10, log=lambda _: None)
        off = evaluate(env, ExpertAimingOff(env, 0.02), [7], max_steps=360, action_steps=10, log=lambda _: None)
    finally:
        env.close()
    (g,), (o,) = good["results"][0]["grasps"], off["results"][0]["grasps"]
    assert g["object"] == o["object"] == TOY_BODY and 0 < g["step"] and 0 < o["step"]
    assert g["along_faces_m"] < 0.003 and abs(g["in_object_m"][0]) < 0.003
    assert 0.015 < o["along_faces_m"] < 0.025 and 0.015 < o["in_object_m"][0] < 0.025
    assert (good["grasps"], good["grasps_off_centre"]) == (1, 0) and (off["grasps"], off["grasps_off_centre"]) == (1, 1)
    assert good["successes"] == 1 and off["successes"] == 0


def test_evaluation_counts_the_episodes_that_dwelt_at_a_grasp(tmp_path):
    """so101-eval's dwell count: the policy parked over the cube is counted (the step the 1.5 s window filled),
    the expert, which never stops there, is not; only the failed episode leaves a trace, which shows the park."""
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    try:
        hover = ExpertThenDrift(env, k=round(ExpertConfig.t_reach * env.cfg.fps) - 1, pan=0.0)
        stuck = evaluate(env, hover, [4], max_steps=120, action_steps=10, log=lambda _: None, trace_dir=tmp_path)
        expert = evaluate(env, ExpertChunkPolicy(env), [4, 5], max_steps=360, action_steps=10, log=lambda _: None,
                          trace_dir=tmp_path)
    finally:
        env.close()
    assert stuck["dwelt"] == 1 and stuck["successes"] == 0
    assert hover.k <= stuck["results"][0]["dwell_step"] <= hover.k + Dwell().steps + 1
    assert expert["dwelt"] == 0 and expert["successes"] == 2 and expert["results"][0]["dwell_step"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["seed4.csv"]
    rows = np.genfromtxt(tmp_path / "seed4.csv", delimiter=",", names=True)
    # parked: still over the last second, right above the cube (the expert's hover point, on its descent line: the
    # fixed-jaw clearance beside the centre; the grasp point, not the gripper site, which sits ~2 cm to the side)
    assert len(rows) == 120 and np.ptp(rows["z"][-30:]) < 0.002
    assert rows["cube_dxy"][-1] < ExpertConfig.fixed_jaw_clearance + 0.005
    # while it approached, each chunk's last row lay well ahead of the arm; parked, its plans go nowhere
    assert rows["plan_dxy"][:hover.k].max() > 0.02
    assert np.abs(rows["plan_dz"][-30:]).max() < 0.002 and np.abs(rows["plan_dxy"][-30:]).max() < 0.002


def _state_at_handover(env: SimEnv, name: str) -> tuple[bool, bool]:
    """(in the jaws, in a box or on the stack) for object ``name`` now."""
    task = env.task
    placed = any(task.at_goal(env.data, g) for g in task.goals(env.data) if g.obj == name)
    return task.held(env.data, name), placed


# Per task: seed, expert steps before the perturbation, base drift (rad), handover step, the object the policy has
# in the jaws at the handover (carried on from there), or the one it has already placed (skipped), or neither
# (the expert picks from the table, from the arm's drifted pose).
TAKEOVERS = {
    "pick_place": (21, 140, 0.0, 160, {"held": CUBE_BODY}),
    "stacking": (22, 140, 0.0, 160, {"held": TOY_BODY}),
    "sorting": (23, 225, 0.25, 265, {"placed": CUBE_BODY}),
    "sorting_swapped": (24, 225, 0.25, 265, {"placed": GREEN_CUBE_BODY}),
    "pick_place_red": (25, 40, 0.3, 90, {}),
    "pick_place_green": (26, 40, -0.3, 90, {}),
}


@pytest.mark.parametrize("task", sorted(TAKEOVERS))
def test_every_task_expert_takes_over_mid_episode_and_succeeds(tmp_path, task):
    assert set(TAKEOVERS) == set(TASKS)
    seed, k, pan, handover, state = TAKEOVERS[task]
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE), task=task)
    try:
        # The perturbation leaves the state it should (the rollout is deterministic: the recorder repeats it).
        run_episode(env, ExpertThenDrift(env, k, pan), seed, max_steps=handover, action_steps=10)
        for role, name in state.items():
            held, placed = _state_at_handover(env, name)
            assert (held if role == "held" else placed and not held), f"{task}: {name} not {role} at the handover"
        drift = ExpertThenDrift(env, k, pan)
        recorder = recovery.RecoveryRecorder(drift, recovery.HandoverRange(handover, handover))
        demo = recorder(env, seed, tmp_path / "episode_0000")
        score = env.score()
    finally:
        env.close()
    assert demo.success and score == 1.0, f"{task}: expert's takeover scored {score}"
    meta = read_episode_metadata(demo.path)
    assert meta.instruction == TASKS[task].instruction and meta.task == task and meta.success is True
    first, n_commands = _first_state_and_command_count(demo.path)
    assert n_commands == demo.steps and recorder.handovers == {"episode_0000": handover}
    if state:  # only what is left is planned: shorter than from a reset state (sorting: one cube, not two)
        assert demo.steps < (300 if task.startswith("sorting") else 200)
    if "held" in state:  # carried on from the jaws: no letting go until over the place (>= 2 s of closed jaws)
        assert _commanded_gripper(demo.path)[:60].max() < 0.0
    else:  # the episode starts where the drift left the arm
        assert first[0] == pytest.approx(drift.plan[k, 0] + pan, abs=0.05)


def test_cli_writes_episodes_and_provenance(tmp_path, capsys):
    from meanflow_policy import testing
    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "rec"
    rc = recovery.main(["--checkpoint", str(ckpt), "--episodes", "1", "--out", str(out), "--seed", "11",
                        "--handover-first", "5", "--handover-last", "5", "--image-size", str(SIZE)])
    assert rc == 0, capsys.readouterr()
    prov = json.loads((out / recovery.RECOVERY_FILE).read_text())
    assert prov["handover_step"] == {"episode_0000": 5} and prov["nfe"] == 1 and prov["first_seed"] == 11
    assert read_episode_metadata(out / "episode_0000").success is True
    assert "wrote 1 recovery episodes" in capsys.readouterr().out
    assert prov["mode"] == "takeover" and prov["expert_blend_s"] == ExpertConfig.t_blend
    assert prov["chunk_smoothing"] == 0
    assert prov["fixed_jaw_clearance_m"] == ExpertConfig.fixed_jaw_clearance
    # The expert's moves overlap as --expert-blend says: the same takeover, rest between moves -> a longer episode.
    lengths = {}
    for blend in (0.0, 0.3):
        again = tmp_path / f"rec_{blend}"
        assert recovery.main(["--checkpoint", str(ckpt), "--episodes", "1", "--out", str(again), "--seed", "11",
                              "--handover-first", "5", "--handover-last", "5", "--image-size", str(SIZE),
                              "--expert-blend", str(blend)]) == 0
        assert json.loads((again / recovery.RECOVERY_FILE).read_text())["expert_blend_s"] == blend
        lengths[blend] = _first_state_and_command_count(again / "episode_0000")[1]
    assert lengths[0.0] - lengths[0.3] >= 20


def test_cli_records_the_named_task_with_its_instruction(tmp_path, capsys):
    from meanflow_policy import testing
    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "rec"
    rc = recovery.main(["--checkpoint", str(ckpt), "--task", "pick_place_green", "--episodes", "1", "--out", str(out),
                        "--seed", "12", "--handover-first", "5", "--handover-last", "5", "--image-size", str(SIZE)])
    assert rc == 0, capsys.readouterr()
    assert json.loads((out / recovery.RECOVERY_FILE).read_text())["task"] == "pick_place_green"
    meta = read_episode_metadata(out / "episode_0000")
    assert meta.instruction == "grasp the green block and put it in the box" and meta.task == "pick_place_green"
    assert meta.success is True


def test_default_handover_range_scales_with_the_task():
    assert recovery.default_handover_last("pick_place") == 300
    assert recovery.default_handover_last("sorting") == 600


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recovery.main(["--checkpoint", str(tmp_path / "nope"), "--episodes", "1", "--out", str(tmp_path / "o")])
    assert "is not a directory" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert recovery.main(["--checkpoint", str(ckpt), "--episodes", "1", "--out", str(tmp_path / "o"),
                          "--handover-first", "9", "--handover-last", "3"]) == 2
    assert "first <= last" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        recovery.main(["--checkpoint", str(ckpt), "--episodes", "1", "--out", str(tmp_path / "o"),
                       "--task", "juggling"])
    assert exc.value.code == 2 and "argument --task: invalid choice: 'juggling'" in capsys.readouterr().err
    for option, mode in (("--dwell-steps", "dwell"), ("--hold-steps", "hold"), ("--latency-steps", "latency")):
        with pytest.raises(SystemExit) as exc:
            recovery.main(["--checkpoint", str(ckpt), "--episodes", "1", "--out", str(tmp_path / "o"), "--mode", mode,
                           option, "0"])
        assert exc.value.code == 2 and f"{option} must be >= 1, got 0" in capsys.readouterr().err
    for option, mode in (("--offcentre-cm", "offcentre"), ("--waver-rad", "waver")):
        with pytest.raises(SystemExit) as exc:
            recovery.main(["--checkpoint", str(ckpt), "--episodes", "1", "--out", str(tmp_path / "o"), "--mode", mode,
                           option, "-1"])
        assert exc.value.code == 2 and f"{option} must be > 0, got -1.0" in capsys.readouterr().err
