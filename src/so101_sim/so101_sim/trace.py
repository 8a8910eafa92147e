"""A failed episode, step by step, as a CSV a person can plot or read: where the grasp point was, what the gripper
did, and where each object was relative to it (``so101-eval --trace-failures``).

The failure anatomy in docs/notes/multitask_training.md (hovers over a cube, descents that stop short, wandering
between the cubes) was read from such logs; the dwell count says how often, a trace says how.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from so101_common.graph import GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_sim.env import SimEnv
from so101_sim.ik import TopDownIK

_GRIPPER = JOINT_NAMES.index(GRIPPER_JOINT_NAME)


@dataclass
class EpisodeTrace:
    """Call it after every control step of one episode; :meth:`write` saves the rows. Lengths in m, angles in rad.

    x, y, z is the grasp point: the point the expert's IK controls (the pads' midpoint at the jaw angle that holds a
    cube, from the arm joints; so101_sim.dwell uses the same), not the gripper site or the open pads (~2 cm aside).
    Per object: ``dxy`` its horizontal distance from the grasp point, ``dz`` the grasp point's height above its
    centre, ``jaws`` whether it is between the pads, ``box`` whether it lies in a box. ``plan_dxy`` and ``plan_dz``:
    where the running plan (the last row of the chunk being executed) takes the grasp point from here, horizontally
    and up (+) or down (-): a hover whose every chunk plans a descent it never reaches shows a negative ``plan_dz``
    while ``z`` stays put."""

    env: SimEnv
    ik: TopDownIK | None = None  # the env's grasp-point kinematics (built here when not given; ~60 ms)
    rows: list[list[float | int]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._ik = self.ik or TopDownIK(self.env.scene)

    def header(self) -> list[str]:
        columns = ["step", "time_s", "x", "y", "z", "gripper", "plan_dxy", "plan_dz"]
        for name in self.env.scene.objects:
            columns += [f"{name}_dxy", f"{name}_dz", f"{name}_jaws", f"{name}_box"]
        return columns

    def __call__(self) -> None:
        env, task, data = self.env, self.env.task, self.env.data
        point = self._ik.forward(env.joint_positions()[:_GRIPPER])[0]
        planned = self._ik.forward(env.follower.goal[:_GRIPPER])[0] - point
        row: list[float | int] = [env.steps, round(env.steps * env.cfg.control_dt, 4),
                                  *(round(float(v), 4) for v in point),
                                  round(float(env.joint_positions()[_GRIPPER]), 3),
                                  round(float((planned[:2] ** 2).sum() ** 0.5), 4), round(float(planned[2]), 4)]
        for name in env.scene.objects:
            obj = task.position(data, name)
            row += [round(float(((point[:2] - obj[:2]) ** 2).sum() ** 0.5), 4), round(float(point[2] - obj[2]), 4),
                    int(task.in_jaws(data, name)), int(task.in_any_box(data, name))]
        self.rows.append(row)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.header())
            writer.writerows(self.rows)
        return path
