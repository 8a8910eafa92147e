"""A policy stuck at a grasp (hovering over the object, or creeping around it) recognised step by step.

The multi-task policy's typical failure: each chunk plans a slow start that the next one postpones again, so the
arm stays over the object until the episode times out. ``so101-eval`` reports how many episodes had such a dwell,
and ``so101-sim-recovery --mode dwell`` hands over to the expert where one is recognised.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_sim.env import SimEnv
from so101_sim.expert import ExpertConfig
from so101_sim.ik import TopDownIK

_GRIPPER = JOINT_NAMES.index(GRIPPER_JOINT_NAME)


@dataclass(frozen=True)
class Dwell:
    """A policy stuck at a grasp: for ``steps`` control steps the grasp point (the point the expert's IK controls,
    from the arm joints) stayed within ``radius`` m of where it was and the gripper within ``grip_rad`` (open, not
    closing: a grasp being closed is no dwell), within ``reach`` m (horizontally) of the object the task needs next
    and at most ``margin`` m above the expert's carry height for it (higher over the stack), nothing in the jaws."""

    # 1.5 s: the multi-task policy of 2026-12-03 paused ~0.7 s over a cube before descending even when it succeeded.
    steps: int = 45
    radius: float = 0.01
    grip_rad: float = 0.05
    reach: float = 0.04
    margin: float = 0.01

    def __post_init__(self) -> None:
        if self.steps < 1 or min(self.radius, self.reach, self.grip_rad) <= 0 or self.margin < 0:
            raise ValueError(f"dwell needs steps >= 1, radius and reach > 0, margin >= 0; got {self}")

    def dwelling(self, window: np.ndarray) -> bool:
        """Whether ``window`` (rows: grasp point x, y, z in m, gripper in rad; the latest last) is a dwell."""
        if len(window) < self.steps:
            return False
        recent = window[-self.steps:]
        return bool(np.linalg.norm(recent[:, :3] - recent[0, :3], axis=1).max() <= self.radius
                    and np.ptp(recent[:, 3]) <= self.grip_rad)

    def near_grasp(self, env: SimEnv, point: np.ndarray) -> bool:
        """Whether the grasp point ``point`` is where a grasp of the next object begins, nothing held."""
        task, data = env.task, env.data
        goals = task.remaining_goals(data)
        if not goals or any(task.in_jaws(data, name) for name in env.scene.objects):
            return False
        obj = task.position(data, goals[0].obj)
        _, carry = ExpertConfig().release_and_carry(goals[0], task.rest_height(goals[0].obj))
        return (float(np.linalg.norm(point[:2] - obj[:2])) <= self.reach
                and float(point[2]) <= carry + self.margin)


@dataclass
class DwellWatch:
    """Call it after every control step of one episode: whether the policy dwells now (``Dwell``); keeps the
    control step at which the first dwell was recognised (None while there was none)."""

    env: SimEnv
    dwell: Dwell = field(default_factory=Dwell)
    ik: TopDownIK | None = None  # the env's grasp-point kinematics (built here when not given; ~60 ms)
    first_step: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._window: deque[np.ndarray] = deque(maxlen=self.dwell.steps)
        self._ik = self.ik or TopDownIK(self.env.scene)

    def __call__(self) -> bool:
        env = self.env
        joints = env.joint_positions()
        point = self._ik.forward(joints[:_GRIPPER])[0]
        if not self.dwell.near_grasp(env, point):
            self._window.clear()
            return False
        self._window.append(np.append(point, joints[_GRIPPER]))
        dwelling = self.dwell.dwelling(np.asarray(self._window))
        if dwelling and self.first_step is None:
            self.first_step = env.steps
        return dwelling
