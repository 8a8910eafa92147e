"""The simulated SO-101: physics at its own rate, control at the dataset rate, trajectories followed like
joint_trajectory_controller (so101_common.trajectory.TrajectoryFollower, shared with the hardware driver).

Plain Python (no rclpy): the demo generator, the evaluator and the sim node all drive this class.
"""
from __future__ import annotations

from collections.abc import Sequence

import mujoco
import numpy as np

from so101_common.graph import CAMERA_NAMES, JOINT_NAMES
from so101_common.joints import JointLimits, home_vector
from so101_common.trajectory import TrajectoryFollower
from so101_sim.scene import Scene, SceneConfig
from so101_sim.tasks import Task, make_task, task_class

# Control steps simulated after a reset so the cube and the arm are at rest when the episode starts.
SETTLE_STEPS = 5


class SimEnv:
    """Scene + task + trajectory follower + renderer. Time is simulated seconds since the last reset."""

    def __init__(self, cfg: SceneConfig | None = None, task: str = "pick_place") -> None:
        self.scene = Scene(cfg, task_class(task).layout)
        self.cfg = self.scene.cfg
        self.model = self.scene.model
        self.data = mujoco.MjData(self.model)
        self.task: Task = make_task(task, self.scene)
        self.limits = JointLimits.so101(JOINT_NAMES)
        self.follower = TrajectoryFollower(self.limits, home_vector())
        self._renderer: mujoco.Renderer | None = None
        self.seed: int | None = None
        self.steps = 0
        self.reset(0)

    @property
    def time(self) -> float:
        return float(self.data.time)

    def reset(self, seed: int) -> None:
        """Arm at home, objects randomised by the task from ``seed`` (same seed, same episode)."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        mujoco.mj_resetData(self.model, self.data)
        home = home_vector()
        self.data.qpos[self.scene.joint_qpos] = home
        self.data.ctrl[self.scene.actuator] = home
        self.task.randomize(self.data, np.random.default_rng(self.seed))
        mujoco.mj_forward(self.model, self.data)
        self.follower = TrajectoryFollower(self.limits, home)
        for _ in range(SETTLE_STEPS):
            self.step()
        self.data.time = 0.0
        self.follower.hold(0.0, home)
        self.steps = 0
        self.task.reset_episode(self.data)

    def set_trajectory(self, joint_names: Sequence[str], times_from_start: Sequence[float] | np.ndarray,
                       positions: np.ndarray, start_time: float | None = None) -> None:
        """Replace the running trajectory (raises so101_common.trajectory.TrajectoryError on bad input)."""
        self.follower.set_trajectory(self.time, joint_names, times_from_start, positions, start_time)

    def command(self, target: np.ndarray) -> None:
        """Move to ``target`` (all joints) over exactly one control step: what one expert step publishes."""
        self.set_trajectory(JOINT_NAMES, [self.cfg.control_dt], np.asarray(target, dtype=np.float64)[None, :])

    def hold(self, target: np.ndarray) -> None:
        """Stop any trajectory and hold ``target`` (all joints, clamped to the limits) from now on."""
        self.follower.hold(self.time, np.asarray(target, dtype=np.float64))

    def step(self) -> None:
        """Advance one control period; the actuator targets follow the trajectory at every physics step."""
        for _ in range(self.cfg.physics_substeps):
            self.data.ctrl[self.scene.actuator] = self.follower.sample(self.data.time + self.model.opt.timestep)
            mujoco.mj_step(self.model, self.data)
        self.steps += 1
        self.task.observe(self.data)

    def joint_positions(self) -> np.ndarray:
        return self.data.qpos[self.scene.joint_qpos].copy()

    def joint_velocities(self) -> np.ndarray:
        return self.data.qvel[self.scene.joint_dof].copy()

    def commanded(self) -> np.ndarray:
        """The follower's target now (what a controller would send to the servos)."""
        return self.follower.sample(self.time)

    def success(self) -> bool:
        return self.task.success(self.data)

    def score(self) -> float:
        """The task's partial credit for the episode so far."""
        return self.task.score(self.data)

    def instruction_followed(self) -> bool | None:
        return self.task.instruction_followed(self.data)

    def render(self, cameras: Sequence[str] = CAMERA_NAMES) -> dict[str, np.ndarray]:
        """RGB uint8 (H, W, 3) images of the named cameras at the configured size."""
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.cfg.image_height, self.cfg.image_width)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        images = {}
        for name in cameras:
            if name not in self.scene.cameras:
                raise ValueError(f"unknown camera {name!r}; the scene has {sorted(self.scene.cameras)}")
            self._renderer.update_scene(self.data, camera=self.scene.cameras[name])
            images[name] = self._renderer.render().copy()
        return images

    def observation(self, instruction: str | None = None) -> dict:
        """The policy's observation (see meanflow_policy): images, float32 joint state, instruction."""
        return {"images": self.render(), "state": self.joint_positions().astype(np.float32),
                "instruction": self.task.instruction if instruction is None else instruction}

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
