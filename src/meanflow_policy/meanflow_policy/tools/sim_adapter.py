"""The MeanFlow checkpoint as a so101_sim policy plugin (entry point ``so101_sim.policies``: ``meanflow``).

It lives with the policy so that so101_sim's tools (so101-eval --checkpoint, recovery, the closed-loop demo) can
evaluate a MeanFlow checkpoint without so101_sim importing meanflow_policy: the sim defines the protocol, this
module meets it, and the shipped checkpoint is found in this package's installed share directory only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ament_index_python.packages import get_package_share_directory

from meanflow_policy.model.policy import MeanFlowPolicy
from so101_common.graph import CAMERA_NAMES, JOINT_NAMES

PACKAGE = "meanflow_policy"
# The sim checkpoints this package ships, the default first: the multi-task policy (every task, the instruction
# says which), then the single-task pick-place one (the ablations' backbone, the real-time table's policy), its
# fine-tune for real-time chunking, and the multi-task one distilled onto the pretrained SmolLM2 (docs/language.md).
SHIPPED_CHECKPOINTS = ("sim_multitask", "sim_pick_place", "sim_pick_place_rtc", "sim_multitask_smollm2")
NODE_MODULE = "meanflow_policy.ros.policy_node"


def default_checkpoint(name: str | None = None) -> Path:
    """The shipped sim checkpoint ``name`` (None: the multi-task one), installed as package data
    (share/meanflow_policy/checkpoints/...)."""
    name = SHIPPED_CHECKPOINTS[0] if name is None else name
    if name not in SHIPPED_CHECKPOINTS:
        raise ValueError(f"no shipped checkpoint {name!r}; {PACKAGE} ships {', '.join(SHIPPED_CHECKPOINTS)}")
    return Path(get_package_share_directory(PACKAGE)) / "checkpoints" / name


class SimCheckpointPolicy:
    """A checkpoint as an observation -> chunk callable with a settable NFE and seeded noise."""

    def __init__(self, checkpoint: Path, device: str = "cpu") -> None:
        self.policy = MeanFlowPolicy.load(checkpoint, device=device)
        cfg = self.policy.config
        if tuple(cfg.joint_names) != tuple(JOINT_NAMES) or int(cfg.action_dim) != len(JOINT_NAMES):
            raise ValueError(f"checkpoint {checkpoint} acts on joints {list(cfg.joint_names)} "
                             f"(action_dim {cfg.action_dim}); the sim arm has {list(JOINT_NAMES)}")
        unknown = [c for c in cfg.camera_keys if c not in CAMERA_NAMES]
        if unknown:
            raise ValueError(f"checkpoint {checkpoint} wants cameras {unknown}; the sim has {list(CAMERA_NAMES)}")
        self.nfe = 1
        self.candidates = 1
        self.average = 1
        self.generator = torch.Generator().manual_seed(0)

    @property
    def input_size(self) -> int:
        """The camera size (px) the policy reads: 0 for its trained size."""
        size = self.policy.image_size
        return 0 if size == self.policy.config.image_size else size

    @input_size.setter
    def input_size(self, size: int) -> None:
        if size != self.input_size:
            self.policy.set_image_size(size)

    @property
    def chunk_size(self) -> int:
        return int(self.policy.config.chunk_size)

    def reseed(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, observation: dict) -> np.ndarray:
        """The chunk for ``observation``; its optional ``guide`` (target rows, weights: the plan being executed)
        picks the mean of the ``average`` closest of ``candidates`` draws, or with one candidate steers the draw;
        with ``steer`` true every draw is steered first (rtc guidance)."""
        return self.policy.sample(observation, nfe=self.nfe, generator=self.generator,
                                  guide=observation.get("guide"), candidates=self.candidates,
                                  average=self.average, steer=bool(observation.get("steer", False)))

    def last_latency_ms(self) -> float | None:
        return self.policy.last_timing.get("total_ms")


def load(checkpoint: Path, device: str = "cpu") -> SimCheckpointPolicy:
    """The plugin's loader (so101_sim.policy_plugins.load_checkpoint_policy calls it)."""
    return SimCheckpointPolicy(checkpoint, device)
