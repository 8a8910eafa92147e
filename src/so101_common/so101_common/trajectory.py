"""Trajectory following like ros2_controllers' joint_trajectory_controller, without ROS.

Shared by the hardware driver's standalone mode and the simulator: a JointTrajectory (times relative to its
start, positions per joint) is interpolated linearly from the position at receipt; a new trajectory replaces
the running one; after the last point the last point is held. Joints the message does not name keep their
current target. Every target is clamped to the joint limits.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from so101_common.joints import JointLimits


class TrajectoryError(ValueError):
    """A trajectory that cannot be executed (unknown joints, bad shapes, non-increasing times, NaN)."""


class TrajectoryFollower:
    def __init__(self, limits: JointLimits, initial: np.ndarray) -> None:
        self.limits = limits
        self.names = limits.names
        self._index = {n: i for i, n in enumerate(self.names)}
        start = limits.clamp(initial)
        self._times = np.array([0.0])
        self._points = start[None, :].copy()
        self._t0 = 0.0

    def set_trajectory(
        self,
        now: float,
        joint_names: Sequence[str],
        times_from_start: Sequence[float] | np.ndarray,
        positions: np.ndarray,
        start_time: float | None = None,
    ) -> None:
        """Replace the running trajectory. ``start_time`` None or 0 means "start now" (as a zero header stamp)."""
        names = list(joint_names)
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise TrajectoryError(f"unknown joints {unknown}; this arm has {list(self.names)}")
        if len(set(names)) != len(names):
            raise TrajectoryError(f"duplicate joint names in {names}")
        positions = np.asarray(positions, dtype=np.float64)
        times = np.asarray(times_from_start, dtype=np.float64)
        if positions.ndim != 2 or positions.shape != (len(times), len(names)):
            raise TrajectoryError(
                f"positions must be (points={len(times)}, joints={len(names)}), got {positions.shape}")
        if len(times) == 0:
            raise TrajectoryError("trajectory has no points")
        if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(times))):
            raise TrajectoryError("trajectory contains NaN or inf")
        if np.any(times < 0) or np.any(np.diff(times) <= 0):
            raise TrajectoryError(f"time_from_start must be >= 0 and strictly increasing, got {times.tolist()}")
        t0 = now if not start_time else float(start_time)
        current = self.sample(now)
        full = np.repeat(current[None, :], len(times), axis=0)
        cols = [self._index[n] for n in names]
        full[:, cols] = positions
        full = self.limits.clamp(full)
        # Prefix the position at receipt so motion starts from where the arm is commanded now.
        self._times = np.concatenate([[now - t0], times])
        self._points = np.concatenate([current[None, :], full], axis=0)
        self._t0 = t0
        if self._times[1] <= self._times[0]:
            # The first point is already due: jump straight into the part of the trajectory still ahead.
            self._times[0] = self._times[1] - 1e-9

    def hold(self, now: float, position: np.ndarray | None = None) -> None:
        """Stop: hold ``position`` (default: the current target)."""
        target = self.sample(now) if position is None else self.limits.clamp(position)
        self._times = np.array([0.0])
        self._points = target[None, :].copy()
        self._t0 = now

    def sample(self, now: float) -> np.ndarray:
        """Target position at time ``now`` (same clock as ``set_trajectory``)."""
        t = now - self._t0
        times = self._times
        if t <= times[0]:
            return self._points[0].copy()
        if t >= times[-1]:
            return self._points[-1].copy()
        k = int(np.searchsorted(times, t, side="right")) - 1
        alpha = (t - times[k]) / (times[k + 1] - times[k])
        return (1.0 - alpha) * self._points[k] + alpha * self._points[k + 1]

    def finished(self, now: float) -> bool:
        return now - self._t0 >= self._times[-1]

    @property
    def goal(self) -> np.ndarray:
        return self._points[-1].copy()
