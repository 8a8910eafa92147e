"""so101_sim evaluates checkpoints through the so101_sim.policies plugin, found in the install space.

meanflow_policy registers ``meanflow``: the shipped checkpoint resolves to its installed share directory, loads,
and returns a finite chunk for a real sim observation; an unknown plugin name is one clear line.
"""
from pathlib import Path

import numpy as np
import pytest
from ament_index_python.packages import get_package_share_directory

from so101_sim.env import SimEnv
from so101_sim.policy_plugins import (PolicyPluginError, default_checkpoint, load_checkpoint_policy, node_module,
                                      resolve_checkpoint)
from so101_sim.scene import SceneConfig

import meanflow_policy  # noqa: F401  (test_depend: provides the meanflow plugin; a missing one must fail, not skip)


def test_shipped_checkpoint_is_found_in_the_policy_share_directory():
    checkpoint = default_checkpoint()
    share = Path(get_package_share_directory("meanflow_policy"))
    assert checkpoint.parent.parent == share and (checkpoint / "model.safetensors").is_file()
    assert node_module() == "meanflow_policy.ros.policy_node"
    assert resolve_checkpoint(None) == resolve_checkpoint(Path("shipped")) == checkpoint
    assert checkpoint.name == "sim_multitask" and load_checkpoint_policy(checkpoint).policy.config.instruction_film
    pick_place = resolve_checkpoint(Path("shipped:sim_pick_place"))
    assert pick_place == share / "checkpoints" / "sim_pick_place" and (pick_place / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="no shipped checkpoint 'sim_nothing'; meanflow_policy ships sim_multitask"):
        resolve_checkpoint(Path("shipped:sim_nothing"))
    assert resolve_checkpoint(Path("runs/mine")) == Path("runs/mine")


def test_plugin_policy_acts_on_a_sim_observation():
    policy = load_checkpoint_policy(default_checkpoint())
    env = SimEnv(SceneConfig(image_height=64, image_width=64))
    try:
        env.reset(seed=3)
        observation = env.observation()
        policy.reseed(3)
        chunk = policy(observation)
    finally:
        env.close()
    assert chunk.shape == (policy.chunk_size, 6) and np.isfinite(chunk).all()
    assert policy.last_latency_ms() > 0


def test_unknown_plugin_is_one_line_naming_the_group_and_what_is_installed():
    with pytest.raises(PolicyPluginError) as info:
        default_checkpoint("no_such_policy")
    message = str(info.value)
    assert "\n" not in message and "so101_sim.policies" in message and "meanflow" in message
