"""Scripted demos are episode bags in the recorder's format, replayable to the executed targets."""
from __future__ import annotations

import json

import numpy as np
import pytest
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory

from so101_common.episode_bag import INDEX_FILE, read_episode_metadata
from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, JOY_TOPIC, RECORDED_TOPICS, TRAJECTORY_TOPIC
from so101_common.images import image_to_rgb, stamp_to_ns
from so101_common.joints import JointLimits
from so101_common.trajectory import TrajectoryFollower
from so101_sim import demos
from so101_sim.env import SimEnv
from so101_sim.expert import ExpertConfig, ScriptedExpert
from so101_sim.scene import SceneConfig

SIZE = 48
SEED = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "ds"
    assert demos.main(["--episodes", "2", "--out", str(out), "--seed", str(SEED), "--image-size", str(SIZE)]) == 0
    return out


def _messages(path):
    with Reader(path) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        rows = [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages()]
    return types, rows


def _plan(seed):
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    env.reset(seed)
    plan = ScriptedExpert(env).plan()
    env.close()
    return plan


def test_metadata_and_index(dataset):
    index = json.loads((dataset / INDEX_FILE).read_text())
    assert [e["name"] for e in index["episodes"]] == ["episode_0000", "episode_0001"]
    for i, name in enumerate(["episode_0000", "episode_0001"]):
        meta = read_episode_metadata(dataset / name)
        assert meta.robot == "so101_sim" and meta.task == "pick_place" and meta.seed == SEED + i
        assert meta.success is True and meta.status == "complete"
        assert meta.instruction == "grasp the red block and put it in the box"


def test_bag_has_the_recorders_topics_and_valid_messages(dataset):
    types, rows = _messages(dataset / "episode_0000")
    assert set(types) == set(RECORDED_TOPICS) - {JOY_TOPIC}
    assert types[TRAJECTORY_TOPIC] == "trajectory_msgs/msg/JointTrajectory"
    meta = read_episode_metadata(dataset / "episode_0000")
    counts = {t: 0 for t in types}
    for topic, t_ns, raw in rows:
        counts[topic] += 1
        assert meta.start_time_ns <= t_ns <= meta.stop_time_ns
        if types[topic] == "sensor_msgs/msg/Image":
            img = deserialize_message(raw, Image)
            assert img.encoding == "rgb8" and image_to_rgb(img).shape == (SIZE, SIZE, 3)
            assert stamp_to_ns(img.header.stamp) == t_ns
        elif topic == JOINT_STATES_TOPIC:
            js = deserialize_message(raw, JointState)
            assert list(js.name) == list(JOINT_NAMES) and len(js.position) == 6
            assert JointLimits.so101().contains(np.array(js.position), tol=0.05)
    assert counts == meta.message_counts
    n = counts[TRAJECTORY_TOPIC]
    assert all(counts[t] == n + 1 for t in types if t != TRAJECTORY_TOPIC)


def test_replayed_commands_are_exactly_the_executed_targets(dataset):
    _, rows = _messages(dataset / "episode_0001")
    plan = _plan(SEED + 1)
    states = [deserialize_message(raw, JointState) for topic, _, raw in rows if topic == JOINT_STATES_TOPIC]
    follower = TrajectoryFollower(JointLimits.so101(), np.array(states[0].position))
    trajs = [(t, deserialize_message(raw, JointTrajectory)) for topic, t, raw in rows if topic == TRAJECTORY_TOPIC]
    assert len(trajs) == len(plan)
    for k, (t_ns, msg) in enumerate(trajs):
        times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
        follower.set_trajectory(t_ns * 1e-9, msg.joint_names, times, np.array([p.positions for p in msg.points]),
                                start_time=stamp_to_ns(msg.header.stamp) * 1e-9)
        np.testing.assert_allclose(follower.sample(t_ns * 1e-9 + 1 / 30), plan[k], atol=1e-6)


def test_training_dataset_reads_the_demos(dataset, tmp_path):
    from meanflow_policy.data import cache, sync
    episodes, report = cache.load_episodes([dataset], sync.SyncConfig(image_size=32), tmp_path / "cache", strict=True)
    assert report.episodes == 2 and report.bad_messages == 0
    plan = _plan(SEED)
    ep = episodes[0]
    valid = np.flatnonzero(ep.action_valid)
    assert len(valid) >= len(plan) - 2
    # Action k = the commanded target one control step after observation k: the expert's plan.
    np.testing.assert_allclose(ep.action[valid[:len(plan)]], plan[valid[:len(plan)]], atol=1e-4)


def test_cli_refuses_a_non_empty_directory(dataset, capsys):
    assert demos.main(["--episodes", "1", "--out", str(dataset)]) == 2
    assert "already holds" in capsys.readouterr().err


def test_cli_rejects_zero_episodes(tmp_path, capsys):
    assert demos.main(["--episodes", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--episodes must be >= 1" in capsys.readouterr().err


def test_expert_blend_option_sets_the_overlap_of_the_demos_moves(tmp_path, capsys):
    """--expert-blend 0.3 records the overlapped plan (~20 steps shorter for pick-place), 0 the plan whose moves
    come to rest in between; a negative overlap is one parser error."""
    steps = {}
    for blend in ("0.3", "0"):
        out = tmp_path / blend
        assert demos.main(["--episodes", "1", "--out", str(out), "--seed", "2", "--image-size", "32",
                           "--expert-blend", blend]) == 0
        _, rows = _messages(out / "episode_0000")
        steps[blend] = sum(topic == TRAJECTORY_TOPIC for topic, _, _ in rows)
        assert read_episode_metadata(out / "episode_0000").success is True
    env = SimEnv(SceneConfig(image_height=32, image_width=32))
    plans = {}
    for blend in ("0.3", "0"):
        env.reset(2)
        plans[blend] = len(ScriptedExpert(env, ExpertConfig(t_blend=float(blend))).plan())
    env.close()
    assert steps == plans and steps["0"] - steps["0.3"] >= 20
    with pytest.raises(SystemExit) as exc:
        demos.main(["--episodes", "1", "--out", str(tmp_path / "bad"), "--expert-blend", "-0.1"])
    assert exc.value.code == 2 and "--expert-blend must be >= 0 seconds" in capsys.readouterr().err


def test_fixed_jaw_clearance_option_records_the_clear_descent(tmp_path, capsys):
    """--fixed-jaw-clearance 0.008 records the plan whose descent keeps the fixed pad 8 mm off the cube (the
    expert's own plan for that setting, not the default one); outside [0, 0.015] m is one parser error."""
    out = tmp_path / "clear"
    assert demos.main(["--episodes", "1", "--out", str(out), "--seed", "2", "--image-size", "32",
                       "--fixed-jaw-clearance", "0.008"]) == 0
    _, rows = _messages(out / "episode_0000")
    commands = np.array([deserialize_message(raw, JointTrajectory).points[-1].positions
                         for topic, _, raw in rows if topic == TRAJECTORY_TOPIC])
    env = SimEnv(SceneConfig(image_height=32, image_width=32))
    plans = {}
    for clearance in (0.008, 0.0):
        env.reset(2)
        plans[clearance] = ScriptedExpert(env, ExpertConfig(fixed_jaw_clearance=clearance)).plan()
    env.close()
    assert np.allclose(commands, plans[0.008], atol=1e-6) and not np.allclose(commands, plans[0.0], atol=1e-3)
    for bad in ("-0.001", "0.02"):
        with pytest.raises(SystemExit) as exc:
            demos.main(["--episodes", "1", "--out", str(tmp_path / "bad"), "--fixed-jaw-clearance", bad])
        assert exc.value.code == 2 and "--fixed-jaw-clearance must be in [0, 0.015] m" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["sorting_swapped", "stacking"])
def test_demos_of_a_task_carry_its_instruction_and_are_readable(task, tmp_path):
    out = tmp_path / task
    assert demos.main(["--episodes", "1", "--out", str(out), "--seed", "2", "--image-size", "32",
                       "--task", task]) == 0
    meta = read_episode_metadata(out / "episode_0000")
    assert meta.task == task and meta.seed == 2 and meta.success is True
    assert meta.instruction == demos.TASKS[task].instruction
    _, rows = _messages(out / "episode_0000")
    steps = sum(topic == TRAJECTORY_TOPIC for topic, _, _ in rows)
    # Sorting demonstrates two pick-and-places, stacking one.
    assert steps > 400 if task.startswith("sorting") else 200 < steps < 240
