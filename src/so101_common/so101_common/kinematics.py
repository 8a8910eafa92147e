"""SO-101 forward and inverse kinematics from the URDF's numbers, in plain numpy: the one place both the teleop's
Cartesian jog and the simulator's scripted expert get them from.

The chain (joint origins, axes) is read from the URDF text the caller passes (the project's
``urdf/so101.urdf.xacro``, installed by so101_description; callers find it there, so this package depends on no
description package). Joint limits are ``so101_common.joints`` (a test checks the URDF agrees).

Two solvers, both damped least squares on the chain's geometric Jacobian, for the two jobs:
- ``ArmKinematics.ik_step``: one Cartesian jog step of the end-effector *position* with the first four joints;
  joints whose step would leave their range are stopped at the limit and the others solve for the rest.
- ``solve_top_down``: a full solve of a grasp point with the gripper pointing down and the jaws along a given
  axis (orientation in the position task's null space); joints at a limit that the step pushes further out
  are taken out of the problem.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits

BASE_LINK = "base_link"
EE_FRAME = "gripper_frame_link"
# Joints the Cartesian position jog moves.
IK_JOINTS: tuple[str, ...] = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex")
DOWN = np.array([0.0, 0.0, -1.0])
_MOVABLE = ("revolute", "continuous")


class KinematicsError(ValueError):
    """A URDF that does not describe the SO-101 joints, or a frame that is not in it."""


class IKError(RuntimeError):
    """The target is out of reach (the solver did not converge)."""


def load_urdf_xml(path: str | Path) -> str:
    """URDF text from a .urdf file or a .xacro (expanded with hardware:=mock, no ros2_control block)."""
    path = Path(path)
    if not path.is_file():
        raise KinematicsError(f"URDF {path} does not exist")
    if path.suffix == ".xacro":
        import xacro
        return xacro.process_file(str(path), mappings={"hardware": "mock", "ros2_control": "false"}).toxml()
    return path.read_text()


def _link(joint: ET.Element, tag: str) -> str:
    """The link a URDF joint's <parent> or <child> names; a joint without one is a broken URDF."""
    element = joint.find(tag)
    name = element.get("link") if element is not None else None
    if not name:
        raise KinematicsError(f"URDF joint {joint.get('name')!r} has no <{tag} link=...>")
    return name


def _floats(text: str | None, default: str) -> np.ndarray:
    return np.array([float(v) for v in (text or default).split()], dtype=np.float64)


def _rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """URDF fixed-axis roll-pitch-yaw: R = Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    return np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                     [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                     [-sp, cp * sr, cp * cr]])


def _skew(axis: np.ndarray) -> np.ndarray:
    """The cross-product matrix of ``axis``: _skew(a) @ v == a x v."""
    return np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.cross of (..., 3) arrays, the same products and differences in the same order (so the same bits), without
    np.cross's per-call overhead: it was a third of every IK iteration."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    return np.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], axis=-1)


@dataclass(frozen=True)
class ChainJoint:
    """One joint between the base and the tip: its fixed origin in the parent link, and its axis if it moves."""

    name: str
    xyz: np.ndarray
    rot: np.ndarray
    axis: np.ndarray | None


class ArmChain:
    """The serial chain of a URDF from ``base`` to ``tip``: forward kinematics and the geometric Jacobian.

    ``q`` always holds the chain's movable joints in base-to-tip order (``joint_names``).
    """

    def __init__(self, urdf_xml: str, tip: str = EE_FRAME, base: str = BASE_LINK) -> None:
        root = ET.fromstring(urdf_xml)
        links = {link.get("name") for link in root.findall("link")}
        for frame in (base, tip):
            if frame not in links:
                raise KinematicsError(f"URDF has no frame {frame!r}")
        by_child = {_link(j, "child"): j for j in root.findall("joint")}
        self.urdf_joint_names = tuple(j.get("name", "") for j in root.findall("joint") if j.get("type") in _MOVABLE)
        chain: list[ChainJoint] = []
        link = tip
        while link != base:
            joint = by_child.get(link)
            if joint is None:
                raise KinematicsError(f"URDF frame {tip!r} is not below {base!r}")
            origin = joint.find("origin")
            axis = joint.find("axis")
            moving = joint.get("type") in _MOVABLE
            unit = _floats(axis.get("xyz") if axis is not None else None, "1 0 0")
            chain.append(ChainJoint(
                name=joint.get("name", ""),
                xyz=_floats(origin.get("xyz") if origin is not None else None, "0 0 0"),
                rot=_rpy(*_floats(origin.get("rpy") if origin is not None else None, "0 0 0")),
                axis=unit / np.linalg.norm(unit) if moving else None))
            link = _link(joint, "parent")
        self.joints = tuple(reversed(chain))
        self.joint_names = tuple(j.name for j in self.joints if j.axis is not None)
        self._eye = np.eye(3)
        self._skews = [(k, k @ k) for k in (_skew(j.axis) for j in self.joints if j.axis is not None)]
        self.tip = tip

    @classmethod
    def from_file(cls, path: str | Path, tip: str = EE_FRAME) -> "ArmChain":
        return cls(load_urdf_xml(path), tip)

    def _walk(self, q: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tip position and rotation, and each movable joint's world axis and origin (rows)."""
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (len(self.joint_names),):
            raise ValueError(f"expected {len(self.joint_names)} joint positions {self.joint_names}, got shape "
                             f"{q.shape}")
        pos, rot = np.zeros(3), np.eye(3)
        axes, origins = [], []
        i = 0
        for joint in self.joints:
            pos = pos + rot @ joint.xyz
            rot = rot @ joint.rot
            if joint.axis is not None:
                axes.append(rot @ joint.axis)
                origins.append(pos)
                # Rodrigues: I + sin(q) K + (1 - cos(q)) K^2, K and K^2 computed once per joint
                skew, skew2 = self._skews[i]
                rot = rot @ (self._eye + np.sin(q[i]) * skew + (1.0 - np.cos(q[i])) * skew2)
                i += 1
        return pos, rot, np.array(axes), np.array(origins)

    def fk(self, q: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tip frame position (3,) and rotation (3, 3) in the base frame."""
        pos, rot, _, _ = self._walk(q)
        return pos, rot

    def jacobian(self, q: Sequence[float] | np.ndarray,
                 point_in_tip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(point, tip rotation, linear (3, n), angular (3, n)) Jacobians of a point fixed in the tip frame."""
        pos, rot, axes, origins = self._walk(q)
        point = pos if point_in_tip is None else pos + rot @ point_in_tip
        return point, rot, _cross(axes, point - origins).T, axes.T


class ArmKinematics:
    """FK and the Cartesian jog step for the joints of ``so101_common.graph.JOINT_NAMES`` (always in that order)."""

    def __init__(self, urdf_xml: str, ee_frame: str = EE_FRAME, limits: JointLimits | None = None) -> None:
        self.chain = ArmChain(urdf_xml, ee_frame)
        missing = [n for n in JOINT_NAMES if n not in self.chain.urdf_joint_names]
        if missing:
            raise KinematicsError(f"URDF has no joints {missing}; it has {list(self.chain.urdf_joint_names)}")
        stray = [n for n in self.chain.joint_names if n not in JOINT_NAMES]
        if stray:
            raise KinematicsError(f"URDF joints {stray} move {ee_frame!r} but are not SO-101 joints")
        self.limits = limits or JointLimits.so101()
        self.ee_frame = ee_frame
        self._chain_columns = np.array([JOINT_NAMES.index(n) for n in self.chain.joint_names])
        self.ik_columns = np.array([JOINT_NAMES.index(n) for n in IK_JOINTS])

    @classmethod
    def from_file(cls, path: str | Path, ee_frame: str = EE_FRAME) -> "ArmKinematics":
        return cls(load_urdf_xml(path), ee_frame)

    def _chain_q(self, q: Sequence[float] | np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (len(JOINT_NAMES),):
            raise ValueError(f"expected {len(JOINT_NAMES)} joint positions {JOINT_NAMES}, got shape {q.shape}")
        return q[self._chain_columns]

    def fk(self, q: Sequence[float] | np.ndarray) -> np.ndarray:
        """End-effector position (m) in the base frame."""
        return self.chain.fk(self._chain_q(q))[0]

    def position_jacobian(self, q: Sequence[float] | np.ndarray) -> np.ndarray:
        """(3, 6) d(ee position)/dq in the base frame, columns in JOINT_NAMES order."""
        jac = np.zeros((3, len(JOINT_NAMES)))
        jac[:, self._chain_columns] = self.chain.jacobian(self._chain_q(q))[2]
        return jac

    def ik_step(self, q: Sequence[float] | np.ndarray, dx: Sequence[float] | np.ndarray,
                damping: float = 0.02) -> np.ndarray:
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


@dataclass(frozen=True)
class GraspTool:
    """The controlled point and the gripper's axes, all in the chain's tip frame.

    ``approach`` runs out along the jaws (it should point down); ``jaw`` runs from the fixed to the moving jaw.
    """

    point: np.ndarray
    approach: np.ndarray
    jaw: np.ndarray


# solve_top_down stops once no joint moves more than this in an iteration (the result then differs from a full run of
# iterations by a few times this at most).
STALL_STEP_RAD = 1e-9


def solve_top_down(chain: ArmChain, tool: GraspTool, target: np.ndarray, jaw_axis: np.ndarray,
                   q_init: np.ndarray, limits: JointLimits, iterations: int = 200, tol: float = 2e-4,
                   max_error: float = 1e-3, orientation_weight: float = 0.5, damping: float = 1e-4) -> np.ndarray:
    """Chain joints putting ``tool.point`` at ``target``, pointing down as far as the joints allow.

    Position is the primary task; the orientation (approach axis down, jaws closing along ``jaw_axis``) is solved
    in the position task's null space, so where the wrist runs out of travel (high above the table) the gripper
    tilts instead of missing the point. Raises IKError if the best solution found still misses ``target`` by more
    than ``max_error`` metres.
    """
    target = np.asarray(target, dtype=np.float64)
    jaw_axis = np.asarray(jaw_axis, dtype=np.float64) / np.linalg.norm(jaw_axis)
    q = limits.clamp(np.asarray(q_init, dtype=np.float64))
    eye = np.eye(len(q))
    pos_norm = np.inf
    for _ in range(iterations):
        point, rot, jacp, jacr = chain.jacobian(q, tool.point)
        rot_err = _cross(rot @ tool.approach, DOWN) + _cross(rot @ tool.jaw, jaw_axis)
        pos_err = target - point
        pos_norm = float(np.linalg.norm(pos_err))
        free = np.ones(len(q))
        for _ in range(len(q)):
            dq = _top_down_step(jacp * free, jacr * free, pos_err, rot_err, eye, orientation_weight, damping)
            # Joints at a limit that the step pushes further out are taken out of the problem.
            blocked = ((q <= limits.lower + 1e-9) & (dq < 0)) | ((q >= limits.upper - 1e-9) & (dq > 0))
            if not np.any(blocked & (free > 0)):
                break
            free[blocked] = 0.0
        if pos_norm < tol and np.linalg.norm(dq) < 1e-4:
            return q
        q_next = limits.clamp(q + dq)
        # Stalled against a limit (the step goes all into it; above ~40 % of the stacking expert's solves): further
        # iterations only shrink a geometric tail far below a servo count (0.0015 rad), so stop.
        if float(np.abs(q_next - q).max()) < STALL_STEP_RAD:
            q = q_next
            break
        q = q_next
    if pos_norm < max_error:
        return q
    raise IKError(f"top-down IK did not reach {target.round(3).tolist()} (position error {pos_norm:.4f} m)")


def _top_down_step(jp: np.ndarray, jr: np.ndarray, pos_err: np.ndarray, rot_err: np.ndarray, eye: np.ndarray,
                   orientation_weight: float, damping: float) -> np.ndarray:
    """Damped least squares on position, orientation in its null space."""
    jp_pinv = jp.T @ np.linalg.inv(jp @ jp.T + damping * np.eye(3))
    null = eye - jp_pinv @ jp
    jr_null = jr @ null
    dq_rot = null @ jr_null.T @ np.linalg.solve(jr_null @ jr_null.T + damping * np.eye(3), rot_err)
    return jp_pinv @ pos_err + orientation_weight * dq_rot
