"""Test helpers other packages use: a small random checkpoint with plausible SO-101 stats, saved in seconds."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from so101_common.joints import JointLimits, home_vector

from meanflow_policy.configuration import MeanFlowConfig
from meanflow_policy.modeling import MeanFlowPolicy


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads, restoring the previous count: the tiny models' small matmuls run
    several times faster on one thread than on two when the other core is busy (a shared 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def plausible_stats(joint_names: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """Stats centred on the home pose with a spread of a sixth of each joint's range (joint units)."""
    limits = JointLimits.so101(joint_names)
    mean = home_vector(joint_names).tolist()
    std = ((limits.upper - limits.lower) / 6.0).tolist()
    return {"state": {"mean": mean, "std": std}, "action": {"mean": mean, "std": std}}


def make_tiny_checkpoint(path: str | Path, seed: int = 0, objective: str = "meanflow",
                         **config_overrides: object) -> Path:
    """Save a random tiny-preset policy (weights from ``seed``) to ``path`` and return the directory."""
    config = MeanFlowConfig.tiny(objective=objective, backbone_seed=seed, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = MeanFlowPolicy(config)
        # The expert's output layers start at zero (adaLN-Zero); give them small random weights so a random
        # checkpoint produces chunks that depend on the observation, as a trained one does.
        for layer in (policy.expert.out, policy.expert.final_ada):
            torch.nn.init.normal_(layer.weight, std=0.02)
    policy.set_stats(plausible_stats(config.joint_names))
    return policy.save(Path(path))


def random_observation(config: MeanFlowConfig, seed: int = 0, size: tuple[int, int] = (48, 64),
                       instruction: str = "pick the red cube") -> dict[str, object]:
    """An observation in the policy's input format (random images of any size, home-pose state)."""
    rng = np.random.default_rng(seed)
    images = {cam: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for cam in config.camera_keys}
    state = home_vector(config.joint_names).astype(np.float32)
    return {"images": images, "state": state, "instruction": instruction}


def random_batch(config: MeanFlowConfig, batch_size: int = 4, seed: int = 0) -> dict[str, object]:
    """A training batch in the dataset format (random images and joint values around the home pose)."""
    g = torch.Generator().manual_seed(seed)
    n_cam, size, t, d = len(config.camera_keys), config.image_size, config.chunk_size, config.action_dim
    home = torch.as_tensor(home_vector(config.joint_names), dtype=torch.float32)
    actions = home + 0.3 * torch.randn(batch_size, t, d, generator=g)
    is_pad = torch.zeros(batch_size, t, dtype=torch.bool)
    is_pad[0, t // 2:] = True
    words = ("pick the red cube", "place it in the bowl", "push the blue block left", "open the gripper")
    return {
        "images": torch.randint(0, 256, (batch_size, n_cam, size, size, 3), generator=g, dtype=torch.uint8),
        "state": 0.3 * torch.randn(batch_size, config.state_dim, generator=g)
        + (home if config.state_dim == d else 0.0),
        "actions": actions,
        "action_is_pad": is_pad,
        "instruction": [words[i % len(words)] for i in range(batch_size)],
    }
