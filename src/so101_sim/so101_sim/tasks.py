"""Tasks: how an episode starts (randomisation), what it scores and when it has succeeded, from sim state only.

The paper's three tasks (pick-place, stacking, sorting) and variants in which only the instruction decides what
to do (sorting with the boxes swapped, pick-place of the red or the green block beside the other one). Each
task names its scene (a Layout), scores partial credit (grasps, placements), and tracks the episode's history:
SimEnv calls ``reset_episode`` after a reset and ``observe`` after every control step, since a grasp ("lifted
off the table in the gripper at some point") and a stable placement are facts about the past, not the present.
An object resting in a box or on the stack counts as grasped too: it cannot get there without being carried.
Each task also says which objects go where (``goals``) so the scripted expert can plan it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import mujoco
import numpy as np

from so101_common import phrasings
from so101_sim.scene import (
    CUBE_BODY,
    GREEN_CUBE_BODY,
    PICK_PLACE_LAYOUT,
    STACK_BODY,
    TABLE_GEOM,
    TOY_BODY,
    TOY_TORSO_HALF,
    Layout,
    Scene,
    SceneConfig,
    stack_top_height,
)

# An object counts as lifted when its centre is this far above its resting height (m).
LIFT_HEIGHT = 0.01
# An object counts as moved by the policy when grasped or pushed this far from its start (m).
MOVED_DISTANCE = 0.02


@dataclass(frozen=True)
class Goal:
    """Carry ``obj`` (a body name) to ``xy`` and set it down on a surface ``surface_z`` high; ``place`` names
    where that is (a box of the layout, or "stack"), so a state can be checked against the goal."""

    obj: str
    xy: np.ndarray
    surface_z: float
    place: str = ""


class Task(ABC):
    """One task on its scene. ``instruction`` is fixed per task (reproducible from the task name alone)."""

    name: str = ""
    instruction: str = ""
    layout: Layout = PICK_PLACE_LAYOUT
    # The cube counts as "resting" below this linear speed (m/s).
    max_rest_speed = 0.02
    # Default episode length for closed-loop evaluation (control steps at 30 Hz).
    max_steps = 360

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.grasped: set[str] = set()
        self.start_xy: dict[str, np.ndarray] = {}

    @abstractmethod
    def randomize(self, data: mujoco.MjData, rng: np.random.Generator) -> None:
        """Place the objects for a new episode (the arm is already at home)."""

    @abstractmethod
    def score(self, data: mujoco.MjData) -> float:
        """Partial credit in [0, 1] for this state and the episode so far."""

    @abstractmethod
    def goals(self, data: mujoco.MjData) -> list[Goal]:
        """The pick-and-place moves that solve the task, in order (what the scripted expert does)."""

    def success(self, data: mujoco.MjData) -> bool:
        """Full score."""
        return self.score(data) >= 1.0 - 1e-9

    def at_goal(self, data: mujoco.MjData, goal: Goal) -> bool:
        """The goal's object is where the goal puts it (in its box), released or not."""
        return self.in_box(data, goal.obj, goal.place)

    def remaining_goals(self, data: mujoco.MjData) -> list[Goal]:
        """``goals`` less those already achieved (object at its place, out of the jaws), the one whose object is
        in the jaws first: what is left for an expert taking over mid-episode. From a reset state: ``goals``."""
        left = [g for g in self.goals(data) if not self.at_goal(data, g) or self.in_jaws(data, g.obj)]
        return sorted(left, key=lambda g: not self.in_jaws(data, g.obj))

    def instruction_followed(self, data: mujoco.MjData) -> bool | None:
        """Whether the policy did what the instruction (not the scene) decides; None where nothing is decided."""
        return None

    # -- episode history ----------------------------------------------------------------------------------
    def reset_episode(self, data: mujoco.MjData) -> None:
        """Forget the last episode; the objects' current places are their starts."""
        self.grasped = set()
        self.start_xy = {name: data.xpos[o.body][:2].copy() for name, o in self.scene.objects.items()}

    def observe(self, data: mujoco.MjData) -> None:
        """Called after every control step: remember grasps."""
        for name in self.scene.objects:
            if name not in self.grasped and self.held(data, name):
                self.grasped.add(name)

    # -- state queries ------------------------------------------------------------------------------------
    def rest_height(self, name: str) -> float:
        """Height of the object's centre when it lies on the table."""
        return TOY_TORSO_HALF[2] if name == TOY_BODY else self.scene.cfg.cube_half_size

    def position(self, data: mujoco.MjData, name: str) -> np.ndarray:
        return data.xpos[self.scene.objects[name].body].copy()

    def _contacts(self, data: mujoco.MjData, geoms: frozenset[int]) -> set[int]:
        """The geoms touching any of ``geoms``."""
        other: set[int] = set()
        for i in range(data.ncon):
            c = data.contact[i]
            if c.geom1 in geoms:
                other.add(int(c.geom2))
            if c.geom2 in geoms:
                other.add(int(c.geom1))
        return other

    def in_jaws(self, data: mujoco.MjData, name: str) -> bool:
        """Touched by both jaws (wherever it is)."""
        touching = self._contacts(data, self.scene.objects[name].geoms)
        return bool(touching & self.scene.moving_jaw_geoms) and bool(touching & self.scene.fixed_jaw_geoms)

    def held(self, data: mujoco.MjData, name: str) -> bool:
        """Lifted off the table and touched by both jaws."""
        if self.position(data, name)[2] < self.rest_height(name) + LIFT_HEIGHT:
            return False
        return self.in_jaws(data, name)

    def released_at_rest(self, data: mujoco.MjData, name: str) -> bool:
        """Slower than ``max_rest_speed`` and touched by no gripper geom."""
        obj = self.scene.objects[name]
        speed = float(np.linalg.norm(data.qvel[obj.dof:obj.dof + 3]))
        return speed < self.max_rest_speed and not self._contacts(data, obj.geoms) & self.scene.gripper_geoms

    def in_box(self, data: mujoco.MjData, name: str, which: str) -> bool:
        """Object centre within the box's inner walls (less half a cube) and below the wall tops."""
        cfg = self.scene.cfg
        rel = self.position(data, name) - data.xpos[self.scene.boxes[which]]
        inside = bool(np.all(np.abs(rel[:2]) <= cfg.box_inner_half - cfg.cube_half_size * 0.5))
        return inside and bool(rel[2] <= cfg.box_wall_thickness + cfg.box_wall_height)

    def in_any_box(self, data: mujoco.MjData, name: str) -> bool:
        return any(self.in_box(data, name, which) for which in self.scene.boxes)

    def moved(self, data: mujoco.MjData, name: str) -> bool:
        """Grasped during the episode, or pushed from where it started."""
        start = self.start_xy.get(name)
        pushed = start is not None and float(np.linalg.norm(self.position(data, name)[:2] - start)) > MOVED_DISTANCE
        return name in self.grasped or pushed

    def _box_goal(self, name: str, which: str) -> Goal:
        cfg = self.scene.cfg
        xy = {"target": cfg.box_center, "left": cfg.left_box_center, "right": cfg.right_box_center}[which]
        return Goal(name, np.asarray(xy, dtype=np.float64), cfg.box_wall_thickness, which)


def _uniform_in_region(rng: np.random.Generator, cfg: SceneConfig, center: tuple[float, float]) -> np.ndarray:
    c = np.asarray(center)
    half = np.asarray(cfg.cube_region_size) / 2.0
    return rng.uniform(c - half, c + half)


def _two_apart(rng: np.random.Generator, cfg: SceneConfig, center: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Two points in the 10 x 10 cm region at least ``min_object_distance`` apart (rejection sampling)."""
    while True:
        a, b = _uniform_in_region(rng, cfg, center), _uniform_in_region(rng, cfg, center)
        if np.linalg.norm(a - b) >= cfg.min_object_distance:
            return a, b


def _set_free_pose(data: mujoco.MjData, scene: Scene, name: str, xyz: tuple[float, float, float],
                   yaw: float = 0.0) -> None:
    obj = scene.objects[name]
    data.qpos[obj.qpos:obj.qpos + 3] = xyz
    data.qpos[obj.qpos + 3:obj.qpos + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
    data.qvel[obj.dof:obj.dof + 6] = 0.0


class PickPlaceTask(Task):
    """Grasp the red cube (random position in a 10x10 cm region) and put it in the box: 0.5 grasp + 0.5 placed."""

    name = "pick_place"
    instruction = phrasings.PICK_PLACE_RED

    def randomize(self, data: mujoco.MjData, rng: np.random.Generator) -> None:
        cfg = self.scene.cfg
        center = np.asarray(cfg.cube_region_center)
        half = np.asarray(cfg.cube_region_size) / 2.0
        xy = rng.uniform(center - half, center + half)
        adr = self.scene.cube_qpos
        data.qpos[adr:adr + 3] = (xy[0], xy[1], cfg.cube_half_size)
        data.qpos[adr + 3:adr + 7] = (1.0, 0.0, 0.0, 0.0)
        dof = self.scene.cube_dof
        data.qvel[dof:dof + 6] = 0.0

    def cube_position(self, data: mujoco.MjData) -> np.ndarray:
        return data.xpos[self.scene.cube_body].copy()

    def cube_in_box(self, data: mujoco.MjData) -> bool:
        """Cube centre within the box's inner walls (less half a cube) and below the wall tops."""
        return self.in_box(data, CUBE_BODY, "target")

    def gripper_touches_cube(self, data: mujoco.MjData) -> bool:
        return bool(self._contacts(data, self.scene.objects[CUBE_BODY].geoms) & self.scene.gripper_geoms)

    def placed(self, data: mujoco.MjData) -> bool:
        """In the box, at rest, released."""
        return self.cube_in_box(data) and self.released_at_rest(data, CUBE_BODY)

    def score(self, data: mujoco.MjData) -> float:
        placed = self.placed(data)
        return 0.5 * (placed or CUBE_BODY in self.grasped) + 0.5 * placed

    def success(self, data: mujoco.MjData) -> bool:
        return self.placed(data)

    def goals(self, data: mujoco.MjData) -> list[Goal]:
        return [self._box_goal(CUBE_BODY, "target")]


class PickPlaceChoiceTask(Task):
    """A red and a green cube in the pick-place region (same places for both variants at one seed), one box; the
    instruction names the cube to put in the box. The other cube in the box scores 0 for placement."""

    target_colour = "red"
    layout = Layout(cubes=("red", "green"), boxes=("target",))

    @property
    def target(self) -> str:
        return CUBE_BODY if self.target_colour == "red" else GREEN_CUBE_BODY

    @property
    def other(self) -> str:
        return GREEN_CUBE_BODY if self.target_colour == "red" else CUBE_BODY

    def randomize(self, data: mujoco.MjData, rng: np.random.Generator) -> None:
        cfg = self.scene.cfg
        red, green = _two_apart(rng, cfg, cfg.cube_region_center)
        _set_free_pose(data, self.scene, CUBE_BODY, (red[0], red[1], cfg.cube_half_size))
        _set_free_pose(data, self.scene, GREEN_CUBE_BODY, (green[0], green[1], cfg.cube_half_size))

    def score(self, data: mujoco.MjData) -> float:
        placed = (self.in_box(data, self.target, "target") and self.released_at_rest(data, self.target)
                  and not self.in_box(data, self.other, "target"))
        grasped = self.target in self.grasped or self.in_box(data, self.target, "target")
        return 0.5 * grasped + 0.5 * placed

    def instruction_followed(self, data: mujoco.MjData) -> bool:
        return self.moved(data, self.target) and not self.moved(data, self.other)

    def goals(self, data: mujoco.MjData) -> list[Goal]:
        return [self._box_goal(self.target, "target")]


class PickPlaceRedTask(PickPlaceChoiceTask):
    name = "pick_place_red"
    instruction = phrasings.PICK_PLACE_RED
    target_colour = "red"


class PickPlaceGreenTask(PickPlaceChoiceTask):
    name = "pick_place_green"
    instruction = phrasings.PICK_PLACE_GREEN
    target_colour = "green"


class SortingTask(Task):
    """Two cubes in one region (non-overlapping), a box on each side: 0.25 per grasp + 0.25 per cube in its box."""

    name = "sorting"
    instruction = phrasings.SORTING
    layout = Layout(cubes=("red", "green"), boxes=("left", "right"), top_camera_xy=(0.34, 0.0),
                    top_camera_look_at=(0.21, 0.0))
    # Two pick-and-places: the expert needs 423 steps.
    max_steps = 720
    # Which box each cube belongs in, in the order the instruction names them.
    assignment: tuple[tuple[str, str], ...] = ((CUBE_BODY, "left"), (GREEN_CUBE_BODY, "right"))

    def randomize(self, data: mujoco.MjData, rng: np.random.Generator) -> None:
        cfg = self.scene.cfg
        red, green = _two_apart(rng, cfg, cfg.sort_region_center)
        _set_free_pose(data, self.scene, CUBE_BODY, (red[0], red[1], cfg.cube_half_size))
        _set_free_pose(data, self.scene, GREEN_CUBE_BODY, (green[0], green[1], cfg.cube_half_size))

    def matched(self, data: mujoco.MjData, name: str, which: str) -> bool:
        return self.in_box(data, name, which) and self.released_at_rest(data, name)

    def score(self, data: mujoco.MjData) -> float:
        total = 0.0
        for name, which in self.assignment:
            total += 0.25 * (name in self.grasped or self.in_any_box(data, name))
            total += 0.25 * self.matched(data, name, which)
        return total

    def instruction_followed(self, data: mujoco.MjData) -> bool:
        """No cube in the other's box, and at least one in its own."""
        boxes = dict(self.assignment)
        wrong = any(self.in_box(data, name, other) for name in boxes for other in self.scene.boxes
                    if other != boxes[name])
        return not wrong and any(self.in_box(data, name, which) for name, which in boxes.items())

    def goals(self, data: mujoco.MjData) -> list[Goal]:
        return [self._box_goal(name, which) for name, which in self.assignment]


class SortingSwappedTask(SortingTask):
    name = "sorting_swapped"
    instruction = phrasings.SORTING_SWAPPED
    assignment = ((GREEN_CUBE_BODY, "left"), (CUBE_BODY, "right"))


class StackingTask(Task):
    """The orange toy (random position and yaw in the 10x10 cm region) onto a fixed stack of two blocks:
    0.5 grasp + 0.5 resting on top of the stack, released, for ``stable_seconds``."""

    name = "stacking"
    instruction = phrasings.STACKING
    layout = Layout(cubes=(), boxes=(), toy=True, stack=True)
    stable_seconds = 0.5

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene)
        m = scene.model
        self.stack_top_geom = m.geom(f"{STACK_BODY}_top").id
        self.table_geom = m.geom(TABLE_GEOM).id
        self.on_stack_since: float | None = None

    def randomize(self, data: mujoco.MjData, rng: np.random.Generator) -> None:
        cfg = self.scene.cfg
        xy = _uniform_in_region(rng, cfg, cfg.cube_region_center)
        yaw = rng.uniform(-np.pi, np.pi)
        _set_free_pose(data, self.scene, TOY_BODY, (xy[0], xy[1], TOY_TORSO_HALF[2]), yaw)

    def over_stack(self, data: mujoco.MjData) -> bool:
        """Touching the top block and not the table, centre of mass over the top block (released or not)."""
        cfg = self.scene.cfg
        obj = self.scene.objects[TOY_BODY]
        touching = self._contacts(data, obj.geoms)
        com = data.xipos[obj.body]
        over = bool(np.all(np.abs(com[:2] - np.asarray(cfg.stack_center)) <= np.asarray(cfg.stack_top_half[:2])))
        above = bool(com[2] > stack_top_height(cfg))
        return self.stack_top_geom in touching and self.table_geom not in touching and over and above

    def on_stack(self, data: mujoco.MjData) -> bool:
        """Over the stack (``over_stack``), released, at rest."""
        return self.over_stack(data) and self.released_at_rest(data, TOY_BODY)

    def at_goal(self, data: mujoco.MjData, goal: Goal) -> bool:
        return self.over_stack(data)

    def reset_episode(self, data: mujoco.MjData) -> None:
        super().reset_episode(data)
        self.on_stack_since = None

    def observe(self, data: mujoco.MjData) -> None:
        super().observe(data)
        if not self.on_stack(data):
            self.on_stack_since = None
        elif self.on_stack_since is None:
            self.on_stack_since = float(data.time)

    def stacked(self, data: mujoco.MjData) -> bool:
        """On the stack now and since at least ``stable_seconds`` (tracked by ``observe``)."""
        return (self.on_stack_since is not None and self.on_stack(data)
                and float(data.time) - self.on_stack_since >= self.stable_seconds - 1e-9)

    def score(self, data: mujoco.MjData) -> float:
        stacked = self.stacked(data)
        return 0.5 * (stacked or TOY_BODY in self.grasped) + 0.5 * stacked

    def goals(self, data: mujoco.MjData) -> list[Goal]:
        cfg = self.scene.cfg
        return [Goal(TOY_BODY, np.asarray(cfg.stack_center, dtype=np.float64), stack_top_height(cfg), "stack")]


TASKS: dict[str, type[Task]] = {t.name: t for t in (PickPlaceTask, StackingTask, SortingTask, SortingSwappedTask,
                                                    PickPlaceRedTask, PickPlaceGreenTask)}
# The paper's three tasks (Table V): the mean score of make eval-sim is over these.
PAPER_TASKS = ("pick_place", "stacking", "sorting")
# Tasks whose instruction alone decides what to do in a scene another task shares (instruction_followed applies).
LANGUAGE_DECIDED = ("sorting", "sorting_swapped", "pick_place_red", "pick_place_green")


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]


def make_task(name: str, scene: Scene) -> Task:
    cls = task_class(name)
    if scene.layout != cls.layout:
        raise ValueError(f"task {name!r} needs the scene layout {cls.layout}, the scene has {scene.layout}")
    return cls(scene)
