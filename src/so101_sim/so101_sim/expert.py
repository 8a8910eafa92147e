"""Scripted expert: a smooth, consistent motion planned once per episode from the objects' poses.

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
from so101_sim.scene import CUBE_BODY, GREEN_CUBE_BODY, TOY_BODY
from so101_sim.tasks import Goal

GRIPPER_OPEN = 1.0
GRIPPER_CLOSED = -0.17
# The largest fixed-jaw gap (m) a descent may keep: in a crowded scene the open jaws leave ~19 mm beside a cube.
MAX_FIXED_JAW_CLEARANCE = 0.015
# How reasons name the objects.
OBJECT_LABELS = {CUBE_BODY: "the red cube", GREEN_CUBE_BODY: "the green cube", TOY_BODY: "the orange toy"}


class TakeoverError(RuntimeError):
    """The expert cannot plan from this state (the message names the object and what is wrong with it)."""


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
    # Consecutive moves may overlap by this long (at most a third of either; gripper moves never do): the next
    # move starts while the last one slows down, so the arm never comes to rest between reach and descent, lift
    # and carry, carry and lower (--expert-blend). 0, each move coming to rest first, is how every demo the shipped
    # checkpoint learned from was made; a fine-tune of it on overlapped demos and recovery (round 19,
    # docs/notes/multitask_training.md) dwelt less over the objects but lost more elsewhere.
    t_blend: float = 0.0
    # Taking over mid-episode (recovery demos): a grasp point within this horizontal distance (m) of the cube and
    # below carry height + margin aligns over the cube at its current height and goes on down, instead of going
    # back up to carry height (which would contradict the demos' own descent); within grasp_band of the grasp
    # height it keeps the gripper's current opening and goes on closing.
    takeover_radius: float = 0.02
    takeover_margin: float = 0.01
    grasp_band: float = 0.008
    t_align: float = 0.5
    # A takeover's re-alignment moving the joints (largest one, gripper included) this far takes t_align; a smaller
    # one proportionally less, as a lift from part-way up takes part of t_lift: a recovery episode that begins with
    # a second of near-stillness labels the state the policy stalled in "stay here", and the policy stalls there
    # for good (the state holds no velocity).
    align_full_rad: float = 0.3
    # Carry at least this far above the release point (an object set on the stack is carried higher).
    carry_clearance: float = 0.022
    # Jaw opening (rad) when another object lies near the one to grasp: 6 cm between the pads.
    crowded_gripper_open: float = 0.6
    # Gap (m) between the fixed jaw's pad and the object's face during the descent. The fixed pad does not move when
    # the jaws open, so with 0 (every demo until 2026-12-04; sim_pick_place learned from those) it slides down the
    # face: a policy a few millimetres off sets it on the object's top, and the grasp closes on nothing. With a gap
    # the descent ends that far towards the fixed jaw's side and the arm moves back while the jaws close (in the
    # first half of the close), so the object ends between the pads where it was (--fixed-jaw-clearance; the
    # multi-task policy's sorting 60 -> 88 %, docs/notes/multitask_training.md "Round 24").
    fixed_jaw_clearance: float = 0.008
    # Taking over from any state: an object lying on the table this far above its resting height (m) is not
    # lying on the table; one tilted more than this (deg; cube: every face off the table; toy: its up axis) is
    # tipped over, and the top-down grasp cannot square it.
    table_tolerance: float = 0.004
    cube_max_tilt_deg: float = 10.0
    toy_max_tilt_deg: float = 20.0
    # A cube turned less than this (deg) from the world axes is grasped along world y (the jaws square it), so
    # plans from reset states stay exactly those of the demos.
    cube_square_deg: float = 2.0

    def release_and_carry(self, goal: Goal, rest: float) -> tuple[float, float]:
        """Heights (m) of the grasp point where an object resting ``rest`` above its base is let go for ``goal``,
        and where it is carried: high enough that it clears what it is set down on."""
        release_z = goal.surface_z + rest + self.release_clearance
        return release_z, max(self.carry_height, release_z + self.carry_clearance)


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

    def _align(self, arm0: np.ndarray, grip0: float, arm1: np.ndarray, grip1: float, targets: "_Targets") -> None:
        """Append a takeover's joint-space re-alignment, its duration in proportion to how far it moves."""
        move = max(float(np.abs(arm1 - arm0).max()), abs(grip1 - grip0))
        self._joint_move(arm0, grip0, arm1, grip1, self.cfg.t_align * min(1.0, move / self.cfg.align_full_rad),
                         targets)

    def _joint_move(self, arm0: np.ndarray, grip0: float, arm1: np.ndarray, grip1: float, seconds: float,
                    targets: "_Targets") -> None:
        """Append a minimum-jerk move in joint space (the reach from home, a takeover's re-alignment)."""
        targets.move([np.append((1 - a) * arm0 + a * arm1, (1 - a) * grip0 + a * grip1)
                      for a in min_jerk(self._steps(seconds))])

    def _solve_from(self, point: np.ndarray, axis: np.ndarray, arm0: np.ndarray) -> np.ndarray:
        """IK from the arm's current joints; from home when that fails (a plan taking over from a contorted
        mid-episode pose, see so101_sim.recovery), which is where every start-state demo solves it from."""
        try:
            return self.ik.solve(point, axis, arm0, max_error=self.cfg.ik_max_error)
        except IKError:
            return self.ik.solve(point, axis, home_vector()[:self.gripper_index], max_error=self.cfg.ik_max_error)

    def _rotation(self, name: str) -> np.ndarray:
        return self.env.data.xmat[self.env.scene.objects[name].body].reshape(3, 3)

    def jaw_axes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The two horizontal directions the jaws may close along: for a cube the normal of its side faces
        nearest world y (world y itself while the cube is square to the world), the toy's own y axis (across
        its torso) for the toy."""
        rot = self._rotation(name)
        if name == TOY_BODY:
            y = rot[:, 1].copy()
        else:
            # The cube's two most horizontal axes are its side-face normals; take the one nearest world y.
            sides = np.argsort(np.abs(rot[2]))[:2]
            y = rot[:, max(sides, key=lambda i: abs(rot[1, i]))].copy()
            y *= np.sign(y[1])
            if abs(np.degrees(np.arctan2(y[0], y[1]))) < self.cfg.cube_square_deg:
                y = np.array([0.0, 1.0, 0.0])
        y[2] = 0.0
        y /= np.linalg.norm(y)
        return y, -y

    def _tilt_deg(self, name: str) -> float:
        """How far the object is tipped from lying as placed (deg): the toy's up axis from vertical, for a
        cube its most vertical axis (any face may be down)."""
        rot = self._rotation(name)
        up = rot[2, 2] if name == TOY_BODY else np.abs(rot[2]).max()
        return float(np.degrees(np.arccos(np.clip(up, -1.0, 1.0))))

    def takeover_problem(self) -> str | None:
        """Why the expert cannot finish the task from the env's current state, or None when it can.

        It can when every object is at its goal place, in the jaws, or lying upright on the table (anywhere the
        IK reaches). It cannot with an object in a box it does not belong in, held when the task does not move
        it, fallen off the table, tipped over, lying on something else, or when nothing is left to do.
        """
        task, data, cfg = self.env.task, self.env.data, self.cfg
        place = {g.obj: g.place for g in task.goals(data)}
        for name in self.env.scene.objects:
            label = OBJECT_LABELS.get(name, name)
            for box in self.env.scene.boxes:
                if task.in_box(data, name, box) and place.get(name) != box:
                    belongs = f"it belongs in the {place[name]} box" if name in place else "the task does not move it"
                    return f"{label} is in the {box} box, where it does not belong ({belongs})"
            if name not in place and task.held(data, name):
                return f"{label} is in the gripper, and the task does not move it"
        remaining = task.remaining_goals(data)
        if not remaining:
            return "nothing left to do: every object is at its place (not yet released, or still moving)"
        for goal in remaining:
            name, label = goal.obj, OBJECT_LABELS.get(goal.obj, goal.obj)
            if task.held(data, name) or task.at_goal(data, goal):
                continue
            height = task.position(data, name)[2] - task.rest_height(name)
            if height < -0.01:
                return f"{label} has fallen off the table"
            tilt = self._tilt_deg(name)
            if name == TOY_BODY and tilt > cfg.toy_max_tilt_deg:
                return f"{label} lies on its side (tilted {tilt:.0f} deg): the grasp across its torso cannot work"
            if name != TOY_BODY and tilt > cfg.cube_max_tilt_deg:
                return f"{label} is tipped over (tilted {tilt:.0f} deg)"
            if height > cfg.table_tolerance:
                return f"{label} is off the table and not in the gripper ({1000 * height:.0f} mm above resting)"
        return None

    def plan(self) -> np.ndarray:
        """Joint targets (T, 6), one per control step, in JOINT_NAMES order (radians), for what is left of the
        task (``Task.remaining_goals``): an object in the jaws is carried on from there, one on the table is
        picked where it lies. Raises TakeoverError when the state is one the expert cannot handle."""
        env, cfg = self.env, self.cfg
        data = env.data
        problem = self.takeover_problem()
        if problem is not None:
            raise TakeoverError(problem)
        q_start = env.joint_positions()
        q_start[self.gripper_index] = env.commanded()[self.gripper_index]
        targets = _Targets(int(round(cfg.t_blend * env.cfg.fps)))  # 0: no overlap (_steps is at least 1)
        arm, grip = q_start[:self.gripper_index], q_start[self.gripper_index]
        for i, goal in enumerate(env.task.remaining_goals(data)):
            if i == 0 and (env.task.held(data, goal.obj) or env.task.at_goal(data, goal)):
                arm, grip = self._carry_on(goal, arm, grip, targets)
            else:
                arm, grip = self._pick_place(goal, arm, grip, first=i == 0, targets=targets)
        targets.hold([targets.rows[-1].copy() for _ in range(self._steps(cfg.t_hold))])
        return np.asarray(targets.rows)

    def _pick_place(self, goal: Goal, arm0: np.ndarray, grip0: float, first: bool,
                    targets: "_Targets") -> tuple[np.ndarray, float]:
        """Append one pick-and-place to ``targets`` from arm joints ``arm0``, gripper ``grip0``; returns the end."""
        env, cfg = self.env, self.cfg
        task = env.task
        obj = task.position(env.data, goal.obj)
        rest = task.rest_height(goal.obj)
        release_z, carry = cfg.release_and_carry(goal, rest)

        above_obj = np.array([obj[0], obj[1], carry])
        grasp = np.array([obj[0], obj[1], rest + cfg.grasp_offset])
        # The jaws close along one of two opposite directions (chosen below); each has its own clear descent line.
        axes = self.jaw_axes(goal.obj)
        shifts = [cfg.fixed_jaw_clearance * self.ik.fixed_jaw_side * axis for axis in axes]
        above_place = np.array([goal.xy[0], goal.xy[1], carry])
        release = np.array([goal.xy[0], goal.xy[1], release_z])

        # Mid-episode takeover near the object: start from the current height on the descent line.
        point_now = self.ik.forward(arm0)[0]
        near = first and (np.linalg.norm(point_now[:2] - obj[:2]) <= cfg.takeover_radius
                          and point_now[2] <= carry + cfg.takeover_margin)
        height = float(np.clip(point_now[2], grasp[2], carry)) if near else carry
        at_grasp = near and height <= grasp[2] + cfg.grasp_band
        grip_goal = min(grip0, self.gripper_open) if at_grasp else self.gripper_open

        # Take the jaw direction that needs the smaller wrist roll (near the object: the smaller turn from the
        # current roll, so the jaws do not sweep through it).
        starts = [np.array([obj[0], obj[1], height]) + shift for shift in shifts]
        candidates = [self._solve_from(start, axis, arm0) for start, axis in zip(starts, axes)]
        roll_now = arm0[-1] if near else 0.0
        pick = min(range(2), key=lambda i: abs(candidates[i][-1] - roll_now))
        jaw_axis, shift, start_point = axes[pick], shifts[pick], starts[pick]
        arm_start = candidates[pick]

        if near:
            self._align(arm0, grip0, arm_start, grip_goal, targets)
        else:
            self._joint_move(arm0, grip0, arm_start, grip_goal, cfg.t_reach if first else cfg.t_carry, targets)

        path = _Path(self, jaw_axis, arm_start, start_point, grip_goal, targets)
        descent = (height - grasp[2]) / (carry - grasp[2])
        if descent > 0.05:
            path.cartesian(grasp + shift, cfg.t_descend * descent)
        path.gripper(GRIPPER_CLOSED, cfg.t_close * (path.grip - GRIPPER_CLOSED) / (GRIPPER_OPEN - GRIPPER_CLOSED),
                     point=path.point - shift)
        path.cartesian(above_obj, cfg.t_lift)
        path.cartesian(above_place, cfg.t_carry)
        path.cartesian(release, cfg.t_lower)
        path.gripper(self.gripper_open, cfg.t_open)
        path.cartesian(above_place, cfg.t_retreat)
        return path.arm, path.grip

    def _carry_on(self, goal: Goal, arm0: np.ndarray, grip0: float,
                  targets: "_Targets") -> tuple[np.ndarray, float]:
        """Append the rest of a pick-and-place whose object is already in the jaws (mid-episode takeover):
        point the gripper down where it is and close, lift to carry height, carry, lower, open, retreat, the
        object's centre on the demos' path (it hangs in the jaws where it was caught); over its place already
        (in the box, on the stack) it is only lowered and let go there."""
        env, cfg = self.env, self.cfg
        task = env.task
        obj = task.position(env.data, goal.obj)
        rest = task.rest_height(goal.obj)
        release_z, carry = cfg.release_and_carry(goal, rest)
        point_now, rot = self.ik.forward(arm0)
        offset = obj - point_now
        jaw_axis = rot[:, 2].copy()
        jaw_axis[2] = 0.0
        if np.linalg.norm(jaw_axis) < 0.5:
            raise TakeoverError(f"{OBJECT_LABELS.get(goal.obj, goal.obj)} is held with the jaws tilted "
                                f"{np.degrees(np.arcsin(min(1.0, abs(rot[2, 2])))):.0f} deg from horizontal")
        jaw_axis /= np.linalg.norm(jaw_axis)
        arm_start = self._solve_from(point_now, jaw_axis, arm0)
        self._align(arm0, grip0, arm_start, GRIPPER_CLOSED, targets)
        path = _Path(self, jaw_axis, arm_start, point_now, GRIPPER_CLOSED, targets)
        above_place = np.array([goal.xy[0], goal.xy[1], carry])
        if task.at_goal(env.data, goal):
            release = np.array([obj[0], obj[1], release_z])
        else:
            if obj[2] < carry:
                # From part-way up, the rest of the lift in the same share of t_lift.
                lift = (carry - obj[2]) / (carry - rest - cfg.grasp_offset)
                path.cartesian(np.array([obj[0], obj[1], carry]) - offset, cfg.t_lift * min(1.0, lift))
            path.cartesian(above_place - offset, cfg.t_carry)
            release = np.array([goal.xy[0], goal.xy[1], release_z])
        path.cartesian(release - offset, cfg.t_lower)
        path.gripper(self.gripper_open, cfg.t_open)
        path.cartesian(np.array([release[0], release[1], carry]), cfg.t_retreat)
        return path.arm, path.grip


class _Targets:
    """The plan's joint targets, one row per control step. A move appended right after another move overlaps
    its last rows (``ExpertConfig.t_blend``): the new move's displacements are added onto them, so the joints
    end where the new move ends and never stop in between."""

    def __init__(self, blend_steps: int) -> None:
        self.rows: list[np.ndarray] = []
        self.blend_steps = blend_steps
        self._last_move = 0  # rows at the end that belong to a move (0 after a gripper move or a hold)

    def move(self, rows: list[np.ndarray]) -> None:
        overlap = min(self.blend_steps, self._last_move // 3, len(rows) // 3)
        if overlap:
            start = self.rows[-1]
            for i in range(overlap):
                self.rows[len(self.rows) - overlap + i] = self.rows[len(self.rows) - overlap + i] + rows[i] - start
        self.rows.extend(rows[overlap:])
        self._last_move = len(rows) - overlap

    def hold(self, rows: list[np.ndarray]) -> None:
        """Rows that no later move may overlap (the gripper closing or opening, the final hold)."""
        self.rows.extend(rows)
        self._last_move = 0


class _Path:
    """The grasp point's minimum-jerk segments (IK each control step, jaws along ``jaw_axis``) and gripper
    moves, appended to ``targets`` one control step at a time."""

    def __init__(self, expert: ScriptedExpert, jaw_axis: np.ndarray, arm: np.ndarray, point: np.ndarray,
                 grip: float, targets: _Targets) -> None:
        self.expert = expert
        self.jaw_axis = jaw_axis
        self.arm = arm
        self.point = point
        self.grip = grip
        self.targets = targets

    def cartesian(self, goal_point: np.ndarray, seconds: float) -> None:
        start = self.point
        rows = []
        for a in min_jerk(self.expert._steps(seconds)):
            self.arm = self.expert.ik.solve((1 - a) * start + a * goal_point, self.jaw_axis, self.arm,
                                            max_error=self.expert.cfg.ik_max_error)
            rows.append(np.append(self.arm, self.grip))
        self.targets.move(rows)
        self.point = goal_point

    def gripper(self, goal_opening: float, seconds: float, point: np.ndarray | None = None) -> None:
        """Move the jaws; with ``point`` the grasp point glides there in the first half of the move."""
        start, n = self.grip, self.expert._steps(seconds)
        glide = np.zeros(0) if point is None or np.array_equal(point, self.point) else min_jerk(max(1, n // 2))
        rows = []
        for i, a in enumerate(min_jerk(n)):
            if i < len(glide):
                self.arm = self.expert.ik.solve((1 - glide[i]) * self.point + glide[i] * point, self.jaw_axis,
                                                self.arm, max_error=self.expert.cfg.ik_max_error)
            rows.append(np.append(self.arm, (1 - a) * start + a * goal_opening))
        self.targets.hold(rows)
        self.grip = goal_opening
        if point is not None:
            self.point = point


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
