"""Joint limits of the SO-101 (radians, REP 103), one source of truth for driver, sim, teleop and policy."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from so101_common.graph import JOINT_NAMES

# Limits of the SO-101 "new calibration" URDF (radians).
_LIMITS: dict[str, tuple[float, float]] = {
    "shoulder_pan": (-1.91986, 1.91986),
    "shoulder_lift": (-1.74533, 1.74533),
    "elbow_flex": (-1.69, 1.69),
    "wrist_flex": (-1.65806, 1.65806),
    "wrist_roll": (-2.74385, 2.84121),
    "gripper": (-0.174533, 1.74533),
}


@dataclass(frozen=True)
class JointLimits:
    """Lower/upper position limits for a list of joints, in that list's order."""

    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray

    @classmethod
    def so101(cls, names: tuple[str, ...] = JOINT_NAMES) -> "JointLimits":
        unknown = [n for n in names if n not in _LIMITS]
        if unknown:
            raise ValueError(f"no limits known for joints {unknown}; known: {list(_LIMITS)}")
        lower = np.array([_LIMITS[n][0] for n in names], dtype=np.float64)
        upper = np.array([_LIMITS[n][1] for n in names], dtype=np.float64)
        return cls(tuple(names), lower, upper)

    def clamp(self, positions: np.ndarray) -> np.ndarray:
        """Clip positions (..., J) into the limits; NaN is rejected, never passed through."""
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape[-1] != len(self.names):
            raise ValueError(f"expected {len(self.names)} joint values, got shape {positions.shape}")
        if not np.all(np.isfinite(positions)):
            raise ValueError("joint positions contain NaN or inf")
        return np.clip(positions, self.lower, self.upper)

    def contains(self, positions: np.ndarray, tol: float = 1e-9) -> bool:
        positions = np.asarray(positions, dtype=np.float64)
        return bool(np.all(positions >= self.lower - tol) and np.all(positions <= self.upper + tol))

    @property
    def middle(self) -> np.ndarray:
        return (self.lower + self.upper) / 2.0


# The "home" pose the teleop and the sim reset to (arm folded above the table, gripper closed).
HOME_POSITION: dict[str, float] = {
    "shoulder_pan": 0.0,
    "shoulder_lift": -1.0,
    "elbow_flex": 1.0,
    "wrist_flex": 0.6,
    "wrist_roll": 0.0,
    "gripper": 0.0,
}


def home_vector(names: tuple[str, ...] = JOINT_NAMES) -> np.ndarray:
    return np.array([HOME_POSITION[n] for n in names], dtype=np.float64)


def joint_vector(names: Sequence[str], positions: Sequence[float]) -> np.ndarray:
    """A JointState's positions in JOINT_NAMES order (it may list joints in any order, or more of them); a missing
    joint or a non-finite value is a ValueError naming it."""
    lookup = dict(zip(names, positions))
    missing = [n for n in JOINT_NAMES if n not in lookup]
    if missing:
        raise ValueError(f"joint state lacks joints {missing}")
    values = np.array([lookup[n] for n in JOINT_NAMES], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("joint state contains NaN or inf")
    return values
