"""Forward kinematics and damped-least-squares IK of the SO-101 on the project's URDF, with Pinocchio.

The 5-DoF arm cannot reach arbitrary 6-D poses, so the Cartesian jog controls the end-effector *position*
with the first four joints (wrist roll stays under direct control). Joints that sit at a limit and would be
pushed further are taken out of the Jacobian and the step is solved again, so a jog slides along the limit
instead of stalling or leaving the range.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pinocchio as pin

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits

EE_FRAME = "gripper_frame_link"
# Joints the Cartesian position jog moves (indices into JOINT_NAMES).
IK_JOINTS: tuple[str, ...] = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex")
URDF_RELATIVE = Path("urdf") / "so101.urdf.xacro"


class KinematicsError(ValueError):
    """A URDF that does not describe the SO-101 joints, or a frame that is not in it."""


def default_urdf_path() -> Path:
    """The project's URDF, installed by so101_description (found in its share directory, never in the source)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        return Path(get_package_share_directory("so101_description")) / URDF_RELATIVE
    except PackageNotFoundError:
        raise KinematicsError("package so101_description is not installed (source the install space or set "
                              "urdf_path)") from None


def load_urdf_xml(path: str | Path) -> str:
    """URDF text from a .urdf file or a .xacro (expanded with hardware:=mock, no ros2_control block)."""
    path = Path(path)
    if not path.is_file():
        raise KinematicsError(f"URDF {path} does not exist")
    if path.suffix == ".xacro":
        import xacro
        return xacro.process_file(str(path), mappings={"hardware": "mock", "ros2_control": "false"}).toxml()
    return path.read_text()


class ArmKinematics:
    """FK/IK for the joints of ``so101_common.graph.JOINT_NAMES`` (positions always in that order)."""

    def __init__(self, urdf_xml: str, ee_frame: str = EE_FRAME, limits: JointLimits | None = None) -> None:
        self.model = pin.buildModelFromXML(urdf_xml)
        self.data = self.model.createData()
        self.limits = limits or JointLimits.so101()
        missing = [n for n in JOINT_NAMES if not self.model.existJointName(n)]
        if missing:
            raise KinematicsError(f"URDF has no joints {missing}; it has {list(self.model.names)[1:]}")
        if not self.model.existFrame(ee_frame):
            raise KinematicsError(f"URDF has no frame {ee_frame!r}")
        self.ee_frame = ee_frame
        self._frame_id = self.model.getFrameId(ee_frame)
        self._q_index = np.array([self.model.joints[self.model.getJointId(n)].idx_q for n in JOINT_NAMES])
        self._v_index = np.array([self.model.joints[self.model.getJointId(n)].idx_v for n in JOINT_NAMES])
        self.ik_columns = np.array([JOINT_NAMES.index(n) for n in IK_JOINTS])

    @classmethod
    def from_file(cls, path: str | Path, ee_frame: str = EE_FRAME) -> "ArmKinematics":
        return cls(load_urdf_xml(path), ee_frame)

    def _full_q(self, q: Sequence[float]) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (len(JOINT_NAMES),):
            raise ValueError(f"expected {len(JOINT_NAMES)} joint positions {JOINT_NAMES}, got shape {q.shape}")
        full = pin.neutral(self.model)
        full[self._q_index] = q
        return full

    def fk(self, q: Sequence[float]) -> np.ndarray:
        """End-effector position (m) in the base frame."""
        pin.framesForwardKinematics(self.model, self.data, self._full_q(q))
        return self.data.oMf[self._frame_id].translation.copy()

    def position_jacobian(self, q: Sequence[float]) -> np.ndarray:
        """(3, 6) d(ee position)/dq in the base frame, columns in JOINT_NAMES order."""
        full = self._full_q(q)
        jac = pin.computeFrameJacobian(self.model, self.data, full, self._frame_id, pin.LOCAL_WORLD_ALIGNED)
        return jac[:3, self._v_index]

    def ik_step(self, q: Sequence[float], dx: Sequence[float], damping: float = 0.02) -> np.ndarray:
        """Joint positions after moving the end effector by ``dx`` (m): one damped-least-squares step.

        Joints outside IK_JOINTS keep their value; the result always lies inside the joint limits.
        """
        q = self.limits.clamp(np.asarray(q, dtype=np.float64))
        dx = np.asarray(dx, dtype=np.float64)
        if dx.shape != (3,) or not np.all(np.isfinite(dx)):
            raise ValueError(f"dx must be 3 finite numbers (m), got {dx}")
        jac = self.position_jacobian(q)[:, self.ik_columns]
        cols = self.ik_columns
        free = np.ones(len(cols), dtype=bool)
        delta = np.zeros(len(cols))
        for _ in range(len(cols)):
            # Joints stopped at a limit keep their (clamped) motion; the free ones solve for the rest of dx.
            residual = dx - jac[:, ~free] @ delta[~free]
            j = jac * free
            delta[free] = (j.T @ np.linalg.solve(j @ j.T + damping**2 * np.eye(3), residual))[free]
            candidate = q.copy()
            candidate[cols] += delta
            clamped = self.limits.clamp(candidate)
            blocked = np.abs(clamped[cols] - candidate[cols]) > 1e-12
            delta = clamped[cols] - q[cols]
            if not np.any(blocked & free):
                break
            free &= ~blocked
        result = q.copy()
        result[cols] += delta
        return self.limits.clamp(result)
