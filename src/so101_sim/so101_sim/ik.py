"""Top-down inverse kinematics for the SO-101 with MuJoCo Jacobians (damped least squares).

The controlled point is the middle between the two fingertip pads; the gripper points straight down and
its jaws close along a chosen horizontal direction. Near the table the five arm joints meet all of these
(the arm is planar, so "down" costs one constraint, not two); higher up the wrist runs out of travel, and
the orientation, solved in the null space of the position task, gives way first.
"""
from __future__ import annotations

import mujoco
import numpy as np

from so101_common.graph import ARM_JOINT_NAMES
from so101_common.joints import JointLimits
from so101_sim.scene import Scene

DOWN = np.array([0.0, 0.0, -1.0])


class IKError(RuntimeError):
    """The target pose is out of reach (the solver did not converge)."""


class TopDownIK:
    """Solves arm joint positions that put the grasp point at a target with the gripper pointing down.

    The grasp point is the pads' midpoint at ``grasp_jaw_angle`` (about where the jaws meet a 3 cm cube).
    """

    def __init__(self, scene: Scene, grasp_jaw_angle: float = 0.3, orientation_weight: float = 0.5,
                 damping: float = 1e-4) -> None:
        self.scene = scene
        self.model = scene.model
        self.data = mujoco.MjData(self.model)
        self.arm_dofs = scene.joint_dof[:len(ARM_JOINT_NAMES)]
        self.arm_qpos = scene.joint_qpos[:len(ARM_JOINT_NAMES)]
        self.limits = JointLimits.so101(ARM_JOINT_NAMES)
        self.orientation_weight = orientation_weight
        self.damping = damping
        self.body = self.model.site_bodyid[scene.site]
        self.point_in_site = self._pad_midpoint_in_site(grasp_jaw_angle)

    def _pad_midpoint_in_site(self, jaw_angle: float) -> np.ndarray:
        self.data.qpos[self.scene.joint_qpos[-1]] = jaw_angle
        mujoco.mj_kinematics(self.model, self.data)
        mid = np.mean([self.data.geom_xpos[g] for g in self.scene.pad_geoms], axis=0)
        rot = self.data.site_xmat[self.scene.site].reshape(3, 3)
        return rot.T @ (mid - self.data.site_xpos[self.scene.site])

    def forward(self, q_arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grasp point (3,) and site rotation (3, 3) for arm joint positions ``q_arm``."""
        self.data.qpos[self.arm_qpos] = q_arm
        mujoco.mj_kinematics(self.model, self.data)
        rot = self.data.site_xmat[self.scene.site].reshape(3, 3).copy()
        return self.data.site_xpos[self.scene.site] + rot @ self.point_in_site, rot

    def solve(self, target: np.ndarray, jaw_axis: np.ndarray, q_init: np.ndarray, iterations: int = 200,
              tol: float = 2e-4, max_error: float = 1e-3) -> np.ndarray:
        """Arm joints (5,) putting the grasp point at ``target``, pointing down as far as the joints allow.

        Position is the primary task; the orientation (approach axis down, jaws closing along ``jaw_axis``)
        is solved in the position task's null space, so where the wrist runs out of travel (high above
        the table) the gripper tilts instead of missing the point. Raises IKError if the best solution
        found still misses ``target`` by more than ``max_error`` metres.
        """
        target = np.asarray(target, dtype=np.float64)
        jaw_axis = np.asarray(jaw_axis, dtype=np.float64) / np.linalg.norm(jaw_axis)
        q = self.limits.clamp(np.asarray(q_init, dtype=np.float64))
        jacp = np.zeros((3, self.model.nv))
        jacr = np.zeros((3, self.model.nv))
        eye = np.eye(len(q))
        pos_norm = np.inf
        for _ in range(iterations):
            point, rot = self.forward(q)
            # Site axes: x runs out along the jaws (should point down), z from fixed to moving jaw.
            rot_err = np.cross(rot[:, 0], DOWN) + np.cross(rot[:, 2], jaw_axis)
            pos_err = target - point
            pos_norm = float(np.linalg.norm(pos_err))
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jac(self.model, self.data, jacp, jacr, point, self.body)
            free = np.ones(len(q))
            for _ in range(len(q)):
                dq = self._step(jacp[:, self.arm_dofs] * free, jacr[:, self.arm_dofs] * free, pos_err, rot_err, eye)
                # Joints at a limit that the step pushes further out are taken out of the problem.
                blocked = ((q <= self.limits.lower + 1e-9) & (dq < 0)) | ((q >= self.limits.upper - 1e-9) & (dq > 0))
                if not np.any(blocked & (free > 0)):
                    break
                free[blocked] = 0.0
            if pos_norm < tol and np.linalg.norm(dq) < 1e-4:
                return q
            q = self.limits.clamp(q + dq)
        if pos_norm < max_error:
            return q
        raise IKError(f"top-down IK did not reach {target.round(3).tolist()} (position error {pos_norm:.4f} m)")

    def _step(self, jp: np.ndarray, jr: np.ndarray, pos_err: np.ndarray, rot_err: np.ndarray,
              eye: np.ndarray) -> np.ndarray:
        """Damped least squares on position, orientation in its null space."""
        jp_pinv = jp.T @ np.linalg.inv(jp @ jp.T + self.damping * np.eye(3))
        null = eye - jp_pinv @ jp
        jr_null = jr @ null
        dq_rot = null @ jr_null.T @ np.linalg.solve(jr_null @ jr_null.T + self.damping * np.eye(3), rot_err)
        return jp_pinv @ pos_err + self.orientation_weight * dq_rot
