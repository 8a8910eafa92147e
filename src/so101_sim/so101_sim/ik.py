"""Top-down inverse kinematics of the simulated SO-101: so101_common.kinematics on the project's URDF.

The controlled point is the middle between the two fingertip pads; the gripper points straight down and
its jaws close along a chosen horizontal direction. Near the table the five arm joints meet all of these
(the arm is planar, so "down" costs one constraint, not two); higher up the wrist runs out of travel, and
the orientation, solved in the null space of the position task, gives way first.

Only what the URDF does not know comes from the MuJoCo scene, once: where the pads meet and how the scene's
gripper site is oriented, both expressed in the URDF's gripper frame (the scene's arm is the same official
model, base at the world origin: a test checks that the two agree).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import mujoco
import numpy as np

from so101_common.graph import ARM_JOINT_NAMES
from so101_common.joints import JointLimits
from so101_common.kinematics import EE_FRAME, ArmChain, GraspTool, IKError, solve_top_down
from so101_sim.scene import FIXED_JAW_PAD, JAW_PAD_GEOMS, Scene

__all__ = ["IKError", "TopDownIK", "urdf_path"]


def urdf_path() -> Path:
    """The project's URDF, installed by so101_description."""
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("so101_description")) / "urdf" / "so101.urdf.xacro"


@lru_cache(maxsize=1)
def _arm_chain() -> ArmChain:
    """The URDF chain to the gripper frame, read once per process (a xacro expansion takes ~0.1 s)."""
    return ArmChain.from_file(urdf_path(), EE_FRAME)


class TopDownIK:
    """Solves arm joint positions that put the grasp point at a target with the gripper pointing down.

    The grasp point is the pads' midpoint at ``grasp_jaw_angle`` (about where the jaws meet a 3 cm cube).
    ``fixed_jaw_side`` (+1 or -1) says along which sign of the jaw axis the fixed jaw's pad lies from it: that pad
    does not move when the jaws open, so at the grasp point it touches the cube's face however wide they are.
    """

    def __init__(self, scene: Scene, grasp_jaw_angle: float = 0.3, orientation_weight: float = 0.5,
                 damping: float = 1e-4) -> None:
        self.chain = _arm_chain()
        if self.chain.joint_names != ARM_JOINT_NAMES:
            raise ValueError(f"the URDF chain to {EE_FRAME} moves {self.chain.joint_names}, not {ARM_JOINT_NAMES}")
        self.limits = JointLimits.so101(ARM_JOINT_NAMES)
        self.orientation_weight = orientation_weight
        self.damping = damping
        self.tool, self.site_in_tool, self.fixed_jaw_side = self._tool_from_scene(scene, grasp_jaw_angle)

    def _tool_from_scene(self, scene: Scene, jaw_angle: float) -> tuple[GraspTool, np.ndarray, float]:
        """Pad midpoint and gripper-site axes in the URDF gripper frame (arm at zero, jaws at ``jaw_angle``), and
        the side of the jaw axis the fixed jaw's pad is on."""
        data = mujoco.MjData(scene.model)
        data.qpos[scene.joint_qpos[-1]] = jaw_angle
        mujoco.mj_kinematics(scene.model, data)
        pads = [data.geom_xpos[g] for g in scene.pad_geoms]
        mid = np.mean(pads, axis=0)
        pos, rot = self.chain.fk(data.qpos[scene.joint_qpos[:len(ARM_JOINT_NAMES)]])
        site_in_tool = rot.T @ data.site_xmat[scene.site].reshape(3, 3)
        jaw = data.site_xmat[scene.site].reshape(3, 3)[:, 2]
        fixed_side = float(np.sign(np.dot(pads[JAW_PAD_GEOMS.index(FIXED_JAW_PAD)] - mid, jaw)))
        tool = GraspTool(point=rot.T @ (mid - pos), approach=site_in_tool[:, 0], jaw=site_in_tool[:, 2])
        return tool, site_in_tool, fixed_side

    def forward(self, q_arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grasp point (3,) and gripper-site rotation (3, 3) for arm joint positions ``q_arm``."""
        pos, rot = self.chain.fk(q_arm)
        return pos + rot @ self.tool.point, rot @ self.site_in_tool

    def solve(self, target: np.ndarray, jaw_axis: np.ndarray, q_init: np.ndarray, iterations: int = 200,
              tol: float = 2e-4, max_error: float = 1e-3) -> np.ndarray:
        """Arm joints (5,) putting the grasp point at ``target``, pointing down as far as the joints allow
        (so101_common.kinematics.solve_top_down); raises IKError when it misses by more than ``max_error`` m."""
        return solve_top_down(self.chain, self.tool, np.asarray(target, dtype=np.float64),
                              np.asarray(jaw_axis, dtype=np.float64), q_init, self.limits, iterations=iterations,
                              tol=tol, max_error=max_error, orientation_weight=self.orientation_weight,
                              damping=self.damping)
