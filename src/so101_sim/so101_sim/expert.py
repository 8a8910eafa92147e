"""Scripted pick-place expert: a smooth, consistent motion planned once per episode from the cube's pose.

Minimum-jerk segments move the grasp point (Cartesian, top-down IK each control step) and the gripper; the
first segment moves in joint space from home so the wrist turns down gradually. The output is one joint
target per control step, which is exactly what the demo writer publishes and the sim executes. The same
seed always gives the same plan, and every demonstration has the same phases and timing: that regularity is
what makes ~100 demonstrations enough to learn from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_common.joints import home_vector
from so101_sim.env import SimEnv
from so101_sim.ik import IKError, TopDownIK
from so101_sim.tasks import PickPlaceTask

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


def min_jerk(n: int) -> np.ndarray:
    """Progress s(t) in (0, 1] at n evenly spaced instants ending at 1 (zero velocity/acceleration ends)."""
    tau = np.arange(1, n + 1) / n
    return 10 * tau**3 - 15 * tau**4 + 6 * tau**5


class ScriptedExpert:
    """Plans the joint targets of one pick-place episode for the env's current (freshly reset) state."""

    def __init__(self, env: SimEnv, cfg: ExpertConfig | None = None) -> None:
        if not isinstance(env.task, PickPlaceTask):
            raise ValueError(f"the scripted expert solves pick_place, not {env.task.name!r}")
        self.env = env
        self.cfg = cfg or ExpertConfig()
        self.ik = TopDownIK(env.scene)
        self.gripper_index = JOINT_NAMES.index(GRIPPER_JOINT_NAME)

    def _steps(self, seconds: float) -> int:
        return max(1, int(round(seconds * self.env.cfg.fps)))

    def _solve_from(self, point: np.ndarray, axis: tuple[int, int, int], arm0: np.ndarray) -> np.ndarray:
        """IK from the arm's current joints; from home when that fails (a plan taking over from a contorted
        mid-episode pose, see so101_sim.recovery), which is where every start-state demo solves it from."""
        try:
            return self.ik.solve(point, axis, arm0, max_error=self.cfg.ik_max_error)
        except IKError:
            return self.ik.solve(point, axis, home_vector()[:self.gripper_index], max_error=self.cfg.ik_max_error)

    def plan(self) -> np.ndarray:
        """Joint targets (T, 6), one per control step, in JOINT_NAMES order (radians)."""
        env, cfg = self.env, self.cfg
        data = env.data
        cube = env.task.cube_position(data)
        box = data.xpos[env.scene.box_body].copy()
        half = env.cfg.cube_half_size
        q_start = env.joint_positions()
        q_start[self.gripper_index] = env.commanded()[self.gripper_index]
        arm0 = q_start[:self.gripper_index]

        above_cube = np.array([cube[0], cube[1], cfg.carry_height])
        grasp = np.array([cube[0], cube[1], half + cfg.grasp_offset])
        above_box = np.array([box[0], box[1], cfg.carry_height])
        release = np.array([box[0], box[1], env.cfg.box_wall_thickness + half + cfg.release_clearance])

        # Mid-episode takeover near the cube: start from the current height on the descent line.
        point_now = self.ik.forward(arm0)[0]
        near = (np.linalg.norm(point_now[:2] - cube[:2]) <= cfg.takeover_radius
                and point_now[2] <= cfg.carry_height + cfg.takeover_margin)
        height = float(np.clip(point_now[2], grasp[2], cfg.carry_height)) if near else cfg.carry_height
        start_point = np.array([cube[0], cube[1], height])
        at_grasp = near and height <= grasp[2] + cfg.grasp_band
        grip_goal = min(q_start[self.gripper_index], GRIPPER_OPEN) if at_grasp else GRIPPER_OPEN

        # Jaws close along +y or -y: take the one that needs the smaller wrist roll (near the cube: the smaller
        # turn from the current roll, so the jaws do not sweep through the cube).
        candidates = [self._solve_from(start_point, axis, arm0) for axis in ((0, 1, 0), (0, -1, 0))]
        roll_now = arm0[-1] if near else 0.0
        pick = min(range(2), key=lambda i: abs(candidates[i][-1] - roll_now))
        jaw_axis = np.array([(0, 1, 0), (0, -1, 0)][pick], dtype=np.float64)
        arm_start = candidates[pick]

        targets: list[np.ndarray] = []
        s = min_jerk(self._steps(cfg.t_align if near else cfg.t_reach))
        for a in s:
            arm = (1 - a) * arm0 + a * arm_start
            grip = (1 - a) * q_start[self.gripper_index] + a * grip_goal
            targets.append(np.append(arm, grip))

        state = {"arm": arm_start, "point": start_point, "grip": grip_goal}

        def cartesian(goal: np.ndarray, seconds: float) -> None:
            start = state["point"]
            for a in min_jerk(self._steps(seconds)):
                state["arm"] = self.ik.solve((1 - a) * start + a * goal, jaw_axis, state["arm"],
                                             max_error=cfg.ik_max_error)
                targets.append(np.append(state["arm"], state["grip"]))
            state["point"] = goal

        def gripper(goal: float, seconds: float) -> None:
            start = state["grip"]
            for a in min_jerk(self._steps(seconds)):
                targets.append(np.append(state["arm"], (1 - a) * start + a * goal))
            state["grip"] = goal

        descent = (height - grasp[2]) / (cfg.carry_height - grasp[2])
        if descent > 0.05:
            cartesian(grasp, cfg.t_descend * descent)
        gripper(GRIPPER_CLOSED, cfg.t_close * (state["grip"] - GRIPPER_CLOSED) / (GRIPPER_OPEN - GRIPPER_CLOSED))
        cartesian(above_cube, cfg.t_lift)
        cartesian(above_box, cfg.t_carry)
        cartesian(release, cfg.t_lower)
        gripper(GRIPPER_OPEN, cfg.t_open)
        cartesian(above_box, cfg.t_retreat)
        for _ in range(self._steps(cfg.t_hold)):
            targets.append(targets[-1].copy())
        return np.asarray(targets)


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
