"""Recovery demos: the expert takes over from the state a policy left, and only its part is recorded."""
from __future__ import annotations

import json

import numpy as np
import pytest
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import JointState

from so101_common.episode_bag import read_episode_metadata
from so101_common.graph import JOINT_STATES_TOPIC, TRAJECTORY_TOPIC
from so101_common.joints import home_vector
from so101_sim import recovery
from so101_sim.demos import generate
from so101_sim.env import SimEnv
from so101_sim.expert import ExpertChunkPolicy
from so101_sim.scene import SceneConfig

SIZE = 32
PAN_OFFSET = 0.35


def _first_state_and_command_count(path) -> tuple[np.ndarray, int]:
    with Reader(path) as reader:
        first = next(raw for c, _, raw in reader.messages() if c.topic == JOINT_STATES_TOPIC)
        n_commands = sum(c.msgcount for c in reader.connections if c.topic == TRAJECTORY_TOPIC)
    return np.array(deserialize_message(bytes(first), JointState).position), n_commands


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


@pytest.mark.parametrize("handover,reason", [(300, "the policy succeeded"), (130, "off the table")])
def test_no_recovery_once_the_cube_is_picked_or_placed(tmp_path, handover, reason):
    env = SimEnv(SceneConfig(image_height=SIZE, image_width=SIZE))
    try:
        expert = ExpertChunkPolicy(env)
        recorder = recovery.RecoveryRecorder(expert, recovery.HandoverRange(handover, handover))
        with pytest.raises(recovery.SeedSkipped, match=reason):
            recorder(env, 3, tmp_path / "episode_0000")
    finally:
        env.close()
    assert not (tmp_path / "episode_0000").exists() and recorder.handovers == {}


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


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recovery.main(["--checkpoint", str(tmp_path / "nope"), "--episodes", "1", "--out", str(tmp_path / "o")])
    assert "is not a directory" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert recovery.main(["--checkpoint", str(ckpt), "--episodes", "1", "--out", str(tmp_path / "o"),
                          "--handover-first", "9", "--handover-last", "3"]) == 2
    assert "first <= last" in capsys.readouterr().err
