"""Tasks: how an episode starts (randomisation) and when it has succeeded, judged from sim state only.

A registry keyed by name lets further tasks (stacking, sorting) plug into the same env, expert interface,
demo writer and evaluator.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import mujoco
import numpy as np

from so101_sim.scene import Scene


class Task(ABC):
    """One task on the shared scene."""

    name: str = ""
    instruction: str = ""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene

    @abstractmethod
    def randomize(self, data: mujoco.MjData, rng: np.random.Generator) -> None:
        """Place the objects for a new episode (the arm is already at home)."""

    @abstractmethod
    def success(self, data: mujoco.MjData) -> bool:
        """Whether the task is achieved in this state."""


class PickPlaceTask(Task):
    """Grasp the red cube (random position in a 10x10 cm region) and put it in the box."""

    name = "pick_place"
    instruction = "grasp the red block and put it in the box"
    # The cube counts as "resting" below this linear speed (m/s).
    max_rest_speed = 0.02

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
        cfg = self.scene.cfg
        rel = self.cube_position(data) - data.xpos[self.scene.box_body]
        inside = bool(np.all(np.abs(rel[:2]) <= cfg.box_inner_half - cfg.cube_half_size * 0.5))
        low = bool(rel[2] <= cfg.box_wall_thickness + cfg.box_wall_height)
        return inside and low

    def gripper_touches_cube(self, data: mujoco.MjData) -> bool:
        cube, gripper = self.scene.cube_geom, self.scene.gripper_geoms
        for i in range(data.ncon):
            c = data.contact[i]
            if (c.geom1 == cube and c.geom2 in gripper) or (c.geom2 == cube and c.geom1 in gripper):
                return True
        return False

    def success(self, data: mujoco.MjData) -> bool:
        dof = self.scene.cube_dof
        speed = float(np.linalg.norm(data.qvel[dof:dof + 3]))
        return self.cube_in_box(data) and speed < self.max_rest_speed and not self.gripper_touches_cube(data)


TASKS: dict[str, Callable[[Scene], Task]] = {PickPlaceTask.name: PickPlaceTask}


def make_task(name: str, scene: Scene) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name](scene)
