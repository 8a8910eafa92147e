"""Test helpers other packages use: a small random checkpoint with plausible SO-101 stats, saved in seconds."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from so101_common.joints import JointLimits, home_vector

from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.model.policy import MeanFlowPolicy


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


# Ways a checkpoint goes bad, each made deterministically (file, what is done to it).
CORRUPTIONS: tuple[str, ...] = ("truncated_weights", "empty_weights", "flipped_bytes", "nan_weights",
                                "saturated_weights", "bad_tokenizer", "chunk_size_string", "zero_std",
                                "gripper_beyond_limit")


def corrupt_checkpoint(source: str | Path, target: str | Path, kind: str) -> Path:
    """Copy a checkpoint directory and damage it as ``kind`` (one of CORRUPTIONS) says; returns the copy.

    ``saturated_weights`` sends every joint far past its limits on any input; ``gripper_beyond_limit`` only the
    gripper (a sixth of the values: plausible enough to load, so each chunk gets clamped)."""
    import json
    import shutil
    import struct

    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    shutil.copytree(source, target)
    weights, config, stats = target / "model.safetensors", target / "config.json", target / "stats.json"
    if kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "empty_weights":
        weights.write_bytes(b"")
    elif kind == "flipped_bytes":
        raw = bytearray(weights.read_bytes())
        data_start = 8 + struct.unpack("<Q", raw[:8])[0]  # safetensors: header length, JSON header, tensor data
        rng = np.random.default_rng(0)
        for i in rng.choice(np.arange(data_start, len(raw)), 2000, replace=False):
            raw[i] ^= 0xFF
        weights.write_bytes(bytes(raw))
    elif kind in ("nan_weights", "saturated_weights"):
        tensors = load_file(str(weights))
        if kind == "nan_weights":
            tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
        else:
            tensors["expert.out.bias"] = torch.full_like(tensors["expert.out.bias"], 50.0)
        save_file(tensors, str(weights))
    elif kind == "bad_tokenizer":
        (target / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    elif kind == "chunk_size_string":
        values = json.loads(config.read_text())
        values["chunk_size"] = str(values["chunk_size"])
        config.write_text(json.dumps(values))
    elif kind == "zero_std":
        values = json.loads(stats.read_text())
        values["action"]["std"][0] = 0.0
        stats.write_text(json.dumps(values))
    elif kind == "gripper_beyond_limit":
        values = json.loads(stats.read_text())
        names = json.loads(config.read_text())["joint_names"]
        values["action"]["mean"][names.index("gripper")] += 4.0
        stats.write_text(json.dumps(values))
    else:
        raise ValueError(f"unknown corruption {kind!r}; one of {CORRUPTIONS}")
    return target
