"""Scripted expert: a smooth, consistent motion planned once per episode from the objects' poses.

Minimum-jerk segments move the grasp point (Cartesian, top-down IK each control step) and the gripper; the
first segment moves in joint space from home so the wrist turns down gradually. The output is one joint
target per control step, which is exactly what the demo writer publishes and the sim executes. The same
seed always gives the same plan, and every demonstration has the same phases and timing: that regularity is
what makes ~100 demonstrations enough to learn from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_common.joints import home_vector
from so101_sim.env import SimEnv
from so101_sim.ik import IKError, TopDownIK
from so101_sim.scene import TOY_BODY
from so101_sim.tasks import Goal

GRIPPER_OPEN = 1.0
GRIPPER_CLOSED = -0.17


@dataclass(frozen=True)
class ExpertConfig:
    """Heights (m, of the grasp point = cube centre when grasped) and phase durations (s)."""

    carry_height: float = 0.065
    # At the far corner of the cube region the carry height is a few millimetres out of reach; the
    # solver then stops at the closest point, which is harmless in free space.
    ik_max_error: float = 0.008
    grasp_offset: float = 0.002
    release_clearance: float = 0.012
    t_reach: float = 1.6
    t_descend: float = 1.0
    t_close: float = 0.6
    t_lift: float = 0.8
    t_carry: float = 1.4
    t_lower: float = 0.7
    t_open: float = 0.4
    t_retreat: float = 0.6
    t_hold: float = 0.5
    # Taking over mid-episode (recovery demos): a grasp point within this horizontal distance (m) of the cube and
    # below carry height + margin aligns over the cube at its current height and goes on down, instead of going
    # back up to carry height (which would contradict the demos' own descent); within grasp_band of the grasp
    # height it keeps the gripper's current opening and goes on closing.
    takeover_radius: float = 0.02
    takeover_margin: float = 0.01
    grasp_band: float = 0.008
    t_align: float = 0.5
    # Carry at least this far above the release point (an object set on the stack is carried higher).
    carry_clearance: float = 0.022
    # Jaw opening (rad) when another object lies near the one to grasp: 6 cm between the pads.
    crowded_gripper_open: float = 0.6


def min_jerk(n: int) -> np.ndarray:
    """Progress s(t) in (0, 1] at n evenly spaced instants ending at 1 (zero velocity/acceleration ends)."""
    tau = np.arange(1, n + 1) / n
    return 10 * tau**3 - 15 * tau**4 + 6 * tau**5


class ScriptedExpert:
    """Plans the joint targets of one episode for the env's current (freshly reset) state: one pick-and-place
    per goal of the task (sorting: two in a row), each reach, descend, close, lift, carry, lower, open, retreat."""

    def __init__(self, env: SimEnv, cfg: ExpertConfig | None = None) -> None:
        self.env = env
        self.cfg = cfg or ExpertConfig()
        self.ik = TopDownIK(env.scene)
        self.gripper_index = JOINT_NAMES.index(GRIPPER_JOINT_NAME)
        # With a second object within reach of open jaws, open only as far as a cube needs.
        self.gripper_open = GRIPPER_OPEN if len(env.scene.objects) == 1 else self.cfg.crowded_gripper_open

    def _steps(self, seconds: float) -> int:
        return max(1, int(round(seconds * self.env.cfg.fps)))

    def _solve_from(self, point: np.ndarray, axis: np.ndarray, arm0: np.ndarray) -> np.ndarray:
        """IK from the arm's current joints; from home when that fails (a plan taking over from a contorted
        mid-episode pose, see so101_sim.recovery), which is where every start-state demo solves it from."""
        try:
            return self.ik.solve(point, axis, arm0, max_error=self.cfg.ik_max_error)
        except IKError:
            return self.ik.solve(point, axis, home_vector()[:self.gripper_index], max_error=self.cfg.ik_max_error)

    def _jaw_axes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The two horizontal directions the jaws may close along: world y for a cube (its faces), the toy's
        own y axis (across its torso) for the toy."""
        if name == TOY_BODY:
            y = self.env.data.xmat[self.env.scene.objects[name].body].reshape(3, 3)[:, 1].copy()
            y[2] = 0.0
            y /= np.linalg.norm(y)
        else:
            y = np.array([0.0, 1.0, 0.0])
        return y, -y

    def plan(self) -> np.ndarray:
        """Joint targets (T, 6), one per control step, in JOINT_NAMES order (radians)."""
        env, cfg = self.env, self.cfg
        data = env.data
        q_start = env.joint_positions()
        q_start[self.gripper_index] = env.commanded()[self.gripper_index]
        targets: list[np.ndarray] = []
        arm, grip = q_start[:self.gripper_index], q_start[self.gripper_index]
        for i, goal in enumerate(env.task.goals(data)):
            arm, grip = self._pick_place(goal, arm, grip, first=i == 0, targets=targets)
        for _ in range(self._steps(cfg.t_hold)):
            targets.append(targets[-1].copy())
        return np.asarray(targets)

    def _pick_place(self, goal: Goal, arm0: np.ndarray, grip0: float, first: bool,
                    targets: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Append one pick-and-place to ``targets`` from arm joints ``arm0``, gripper ``grip0``; returns the end."""
        env, cfg = self.env, self.cfg
        task = env.task
        obj = task.position(env.data, goal.obj)
        rest = task.rest_height(goal.obj)
        release_z = goal.surface_z + rest + cfg.release_clearance
        # High enough that the carried object clears what it is set down on.
        carry = max(cfg.carry_height, release_z + cfg.carry_clearance)

        above_obj = np.array([obj[0], obj[1], carry])
        grasp = np.array([obj[0], obj[1], rest + cfg.grasp_offset])
        above_place = np.array([goal.xy[0], goal.xy[1], carry])
        release = np.array([goal.xy[0], goal.xy[1], release_z])

        # Mid-episode takeover near the object: start from the current height on the descent line.
        point_now = self.ik.forward(arm0)[0]
        near = first and (np.linalg.norm(point_now[:2] - obj[:2]) <= cfg.takeover_radius
                          and point_now[2] <= carry + cfg.takeover_margin)
        height = float(np.clip(point_now[2], grasp[2], carry)) if near else carry
        start_point = np.array([obj[0], obj[1], height])
        at_grasp = near and height <= grasp[2] + cfg.grasp_band
        grip_goal = min(grip0, self.gripper_open) if at_grasp else self.gripper_open

        # Jaws close along one of two opposite directions: take the one that needs the smaller wrist roll (near
        # the object: the smaller turn from the current roll, so the jaws do not sweep through it).
        axes = self._jaw_axes(goal.obj)
        candidates = [self._solve_from(start_point, axis, arm0) for axis in axes]
        roll_now = arm0[-1] if near else 0.0
        pick = min(range(2), key=lambda i: abs(candidates[i][-1] - roll_now))
        jaw_axis = axes[pick]
        arm_start = candidates[pick]

        s = min_jerk(self._steps((cfg.t_align if near else cfg.t_reach) if first else cfg.t_carry))
        for a in s:
            targets.append(np.append((1 - a) * arm0 + a * arm_start, (1 - a) * grip0 + a * grip_goal))

        state: dict[str, Any] = {"arm": arm_start, "point": start_point, "grip": grip_goal}

        def cartesian(goal_point: np.ndarray, seconds: float) -> None:
            start = state["point"]
            for a in min_jerk(self._steps(seconds)):
                state["arm"] = self.ik.solve((1 - a) * start + a * goal_point, jaw_axis, state["arm"],
                                             max_error=cfg.ik_max_error)
                targets.append(np.append(state["arm"], state["grip"]))
            state["point"] = goal_point

        def gripper(goal_opening: float, seconds: float) -> None:
            start = state["grip"]
            for a in min_jerk(self._steps(seconds)):
                targets.append(np.append(state["arm"], (1 - a) * start + a * goal_opening))
            state["grip"] = goal_opening

        descent = (height - grasp[2]) / (carry - grasp[2])
        if descent > 0.05:
            cartesian(grasp, cfg.t_descend * descent)
        gripper(GRIPPER_CLOSED, cfg.t_close * (state["grip"] - GRIPPER_CLOSED) / (GRIPPER_OPEN - GRIPPER_CLOSED))
        cartesian(above_obj, cfg.t_lift)
        cartesian(above_place, cfg.t_carry)
        cartesian(release, cfg.t_lower)
        gripper(self.gripper_open, cfg.t_open)
        cartesian(above_place, cfg.t_retreat)
        return state["arm"], state["grip"]


class ExpertChunkPolicy:
    """The scripted expert behind the closed-loop policy interface (observation -> chunk).

    It replans whenever the env has just been reset and then serves its plan chunk by chunk, indexed by
    the env's control step: the reference that closed-loop evaluation must reproduce (~100 % success).
    """

    def __init__(self, env: SimEnv, chunk_size: int = 20, cfg: ExpertConfig | None = None) -> None:
        self.env = env
        self.chunk_size = chunk_size
        self.expert = ScriptedExpert(env, cfg)
        self._plan: np.ndarray | None = None

    def __call__(self, observation: dict) -> np.ndarray:
        k = self.env.steps
        if k == 0 or self._plan is None:
            self._plan = self.expert.plan()
        rows = np.arange(k, k + self.chunk_size).clip(max=len(self._plan) - 1)
        return self._plan[rows].astype(np.float32)
