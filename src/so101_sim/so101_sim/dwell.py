"""Grasps and places going wrong, recognised step by step: a policy stuck at a grasp, descending off-centre onto
it, or holding an object over its place.

The multi-task policy's typical failure: each chunk plans a slow start that the next one postpones again, so the
arm stays over the object until the episode times out. ``so101-eval`` reports how many episodes had such a dwell,
and ``so101-sim-recovery --mode dwell`` hands over to the expert where one is recognised.

Stacking's typical failure is another: the jaws come down ~2 cm towards the toy's head from its torso's centre
(where every demo grasps it), the toy tilts in the jaws and wedges in them or falls beside the stack; the scripted
expert itself fails every time from 1.5 cm off (docs/notes/multitask_training.md). ``so101-sim-recovery --mode
offcentre`` hands over while such a descent can still be corrected (``OffCentre``). Where the toy lies so that both jaw
directions need a wrist roll near +-90 deg, the demos flip between the two and the policy's wrist swings between
them over the toy; ``--mode waver`` hands over there (``Waver``). Sorting's typical failure: the second cube
carried over its box at carry height and held there, never lowered nor let go (``Hold``, ``--mode hold``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_sim.env import SimEnv
from so101_sim.expert import ExpertConfig, ScriptedExpert
from so101_sim.ik import TopDownIK

_GRIPPER = JOINT_NAMES.index(GRIPPER_JOINT_NAME)


# The measured gripper at or above this (rad): the jaws are open (the expert opens to 0.6 in crowded scenes, 1.0 else).
OPEN_JAWS_RAD = 0.4


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
class _Watch:
    """A per-step watch of one episode that keeps the control step at which it first fired (None while never)."""

    env: SimEnv
    first_step: int | None = field(default=None, init=False)

    def _fired(self, now: bool) -> bool:
        if now and self.first_step is None:
            self.first_step = self.env.steps
        return now


@dataclass
class DwellWatch(_Watch):
    """Call it after every control step of one episode: whether the policy dwells now (``Dwell``); keeps the
    control step at which the first dwell was recognised (None while there was none)."""

    dwell: Dwell = field(default_factory=Dwell)
    ik: TopDownIK | None = None  # the env's grasp-point kinematics (built here when not given; ~60 ms)

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
        return self._fired(self.dwell.dwelling(np.asarray(self._window)))


def along_faces(expert: ScriptedExpert, name: str, point: np.ndarray) -> float:
    """How far (m) ``point`` is from object ``name``'s centre, horizontally, along the faces of the jaws that close on
    it (across the direction they close in: for the toy, along its length)."""
    d = point[:2] - expert.env.task.position(expert.env.data, name)[:2]
    axis = expert.jaw_axes(name)[0][:2]
    return float(np.linalg.norm(d - (d @ axis) * axis))


@dataclass(frozen=True)
class OffCentre:
    """A descent onto the next object that will grasp it off-centre: nothing held, the jaws open (gripper at least
    ``grip_open`` rad), the grasp point within ``reach`` m of the object horizontally, at least ``descent`` m below
    the expert's carry height for it and still ``clearance`` m above its grasp height, and more than ``offset`` m
    from the object's centre along the jaws' faces (across the direction they close in: the expert keeps its
    fixed-jaw clearance along that one, and open jaws forgive it)."""

    # The expert succeeds from 0.5 cm along the toy and fails every time from 1.5 cm (docs/notes/multitask_training.md).
    offset: float = 0.008
    descent: float = 0.01
    clearance: float = 0.008
    reach: float = Dwell.reach
    grip_open: float = OPEN_JAWS_RAD

    def __post_init__(self) -> None:
        if min(self.offset, self.descent, self.clearance, self.reach) <= 0:
            raise ValueError(f"off-centre needs offset, descent, clearance and reach > 0; got {self}")


@dataclass
class OffCentreWatch(_Watch):
    """Call it after every control step of one episode: whether the policy is descending off-centre now
    (``OffCentre``); keeps the control step at which it was first seen (None while never)."""

    off_centre: OffCentre = field(default_factory=OffCentre)
    expert: ScriptedExpert | None = None  # its IK, jaw axes and carry heights (built here when not given; ~60 ms)

    def __post_init__(self) -> None:
        self._expert = self.expert or ScriptedExpert(self.env)

    def offset(self) -> float | None:
        """How far (m) the grasp point is from the next object's centre along the jaws' faces, while it descends
        onto it with open jaws and nothing held (None otherwise)."""
        env, rule, expert = self.env, self.off_centre, self._expert
        task, data = env.task, env.data
        goals = task.remaining_goals(data)
        joints = env.joint_positions()
        if (not goals or joints[_GRIPPER] < rule.grip_open
                or any(task.in_jaws(data, name) for name in env.scene.objects)):
            return None
        name = goals[0].obj
        obj, rest = task.position(data, name), task.rest_height(name)
        _, carry = expert.cfg.release_and_carry(goals[0], rest)
        point = expert.ik.forward(joints[:_GRIPPER])[0]
        if not rest + expert.cfg.grasp_offset + rule.clearance <= point[2] <= carry - rule.descent:
            return None
        if float(np.linalg.norm(point[:2] - obj[:2])) > rule.reach:
            return None
        return along_faces(expert, name, point)

    def __call__(self) -> bool:
        offset = self.offset()
        return self._fired(offset is not None and offset > self.off_centre.offset)


_ROLL = JOINT_NAMES.index("wrist_roll")


@dataclass(frozen=True)
class Waver:
    """A wrist that cannot decide: over the next object (``Dwell.near_grasp``: within 4 cm, below carry height + 1
    cm, nothing held) with the jaws open (gripper at least ``grip_open`` rad), the wrist roll has turned back by more
    than ``swing`` rad from the furthest it went the other way since the arm came there."""

    swing: float = 0.8
    grip_open: float = OPEN_JAWS_RAD

    def __post_init__(self) -> None:
        if self.swing <= 0:
            raise ValueError(f"waver needs swing > 0; got {self}")


@dataclass
class WaverWatch(_Watch):
    """Call it after every control step of one episode: whether the wrist has turned back over the object now
    (``Waver``); keeps the control step at which that was first seen (None while never)."""

    waver: Waver = field(default_factory=Waver)
    ik: TopDownIK | None = None  # the env's grasp-point kinematics (built here when not given; ~60 ms)

    def __post_init__(self) -> None:
        self._ik = self.ik or TopDownIK(self.env.scene)
        self._rolls: list[float] = []

    def __call__(self) -> bool:
        joints = self.env.joint_positions()
        point = self._ik.forward(joints[:_GRIPPER])[0]
        if joints[_GRIPPER] < self.waver.grip_open or not Dwell().near_grasp(self.env, point):
            self._rolls.clear()
            return False
        roll = float(joints[_ROLL])
        self._rolls.append(roll)
        back = max(max(self._rolls) - roll, roll - min(self._rolls))
        # Turned back: the furthest point either way lies between the start of the stay and now.
        return self._fired(back > self.waver.swing and abs(roll - self._rolls[0]) < back)


@dataclass(frozen=True)
class Hold:
    """A policy that carries an object to its place and does not let it go: for ``steps`` control steps the object
    has been held (lifted, both jaws on it), the grasp point within ``reach`` m (horizontally) of the place's centre
    and at most ``drop`` m below the expert's carry height for it (not lowering it)."""

    # 1.5 s: the expert starts lowering as it arrives (its carry blends into t_lower); round 31 of the multi-task
    # policy paused 25-66 steps over a box before lowering when it succeeded, and where it failed sorting it hovered
    # at carry height over the right-hand box until the episode ended (docs/notes/multitask_training.md, round 32).
    steps: int = 45
    reach: float = 0.04
    drop: float = 0.01

    def __post_init__(self) -> None:
        if self.steps < 1 or self.reach <= 0 or self.drop < 0:
            raise ValueError(f"hold needs steps >= 1, reach > 0, drop >= 0; got {self}")


@dataclass
class HoldWatch(_Watch):
    """Call it after every control step of one episode: whether the policy holds an object over its place now
    without lowering it (``Hold``); keeps the control step at which that was first seen (None while never)."""

    hold: Hold = field(default_factory=Hold)
    ik: TopDownIK | None = None  # the env's grasp-point kinematics (built here when not given; ~60 ms)

    def __post_init__(self) -> None:
        self._ik = self.ik or TopDownIK(self.env.scene)
        self._steps_over = 0

    def over_place(self) -> bool:
        """Whether the grasp point is over the place of the object it holds, at or near carry height."""
        env, rule = self.env, self.hold
        task, data = env.task, env.data
        goal = next((g for g in task.remaining_goals(data) if task.held(data, g.obj)), None)
        if goal is None:
            return False
        point = self._ik.forward(env.joint_positions()[:_GRIPPER])[0]
        _, carry = ExpertConfig().release_and_carry(goal, task.rest_height(goal.obj))
        return (float(np.linalg.norm(point[:2] - goal.xy)) <= rule.reach
                and float(point[2]) >= carry - rule.drop)

    def __call__(self) -> bool:
        self._steps_over = self._steps_over + 1 if self.over_place() else 0
        return self._fired(self._steps_over >= self.hold.steps)


# The commanded gripper below this (rad) with an object between the pads: the jaws are closing on it.
GRASP_CLOSING_RAD = 0.3


@dataclass
class GraspWatch:
    """Call it after every control step of one episode: where each object was caught, the first time it is between
    the jaws while they close. Per grasp (``grasps``): the object, the control step, the grasp point in the object's
    own frame (m; for the toy x runs from tail to head) and its distance from the centre along the jaws' faces
    (``along_faces``). Stacking's failures are grasps ~2 cm towards the toy's head
    (docs/notes/multitask_training.md)."""

    env: SimEnv
    expert: ScriptedExpert | None = None  # its IK and jaw axes (built here when not given; ~60 ms)
    grasps: list[dict] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._expert = self.expert or ScriptedExpert(self.env)

    def __call__(self) -> None:
        env = self.env
        if env.commanded()[_GRIPPER] >= GRASP_CLOSING_RAD:
            return
        caught = {g["object"] for g in self.grasps}
        for name, obj in env.scene.objects.items():
            if name in caught or not env.task.in_jaws(env.data, name):
                continue
            point = self._expert.ik.forward(env.joint_positions()[:_GRIPPER])[0]
            rot = env.data.xmat[obj.body].reshape(3, 3)
            local = rot.T @ (point - env.data.xpos[obj.body])
            self.grasps.append({"object": name, "step": env.steps, "in_object_m": [round(float(v), 4) for v in local],
                                "along_faces_m": round(along_faces(self._expert, name, point), 4)})
