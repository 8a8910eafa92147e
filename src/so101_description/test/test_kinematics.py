"""so101_common.kinematics on the installed URDF: the chain is the URDF's (checked against Pinocchio, an independent
URDF implementation), the jog step and the top-down solver reach what FK says is reachable, errors name the problem.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pinocchio as pin
import pytest
from ament_index_python.packages import get_package_share_directory

from so101_common.graph import ARM_JOINT_NAMES, JOINT_NAMES
from so101_common.joints import JointLimits, home_vector
from so101_common import kinematics
from so101_common.kinematics import (DOWN, EE_FRAME, ArmChain, ArmKinematics, GraspTool, IKError, KinematicsError,
                                     load_urdf_xml, solve_top_down)

ARM_LIMITS = JointLimits.so101(ARM_JOINT_NAMES)
# The URDF gripper frame's z runs out along the jaws, -x from the fixed to the moving jaw.
TOOL = GraspTool(point=np.zeros(3), approach=np.array([0.0, 0.0, 1.0]), jaw=np.array([-1.0, 0.0, 0.0]))


def installed_xacro() -> Path:
    return Path(get_package_share_directory("so101_description")) / "urdf" / "so101.urdf.xacro"


@pytest.fixture(scope="module")
def urdf_xml() -> str:
    return load_urdf_xml(installed_xacro())


@pytest.fixture(scope="module")
def kin(urdf_xml: str) -> ArmKinematics:
    return ArmKinematics(urdf_xml)


def _pinocchio_fk(urdf_xml: str, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = pin.buildModelFromXML(urdf_xml)
    data = model.createData()
    full = pin.neutral(model)
    for name, value in zip(ARM_JOINT_NAMES, q):
        full[model.joints[model.getJointId(name)].idx_q] = value
    pin.framesForwardKinematics(model, data, full)
    frame = data.oMf[model.getFrameId(EE_FRAME)]
    return frame.translation.copy(), frame.rotation.copy()


def test_fk_of_the_zero_pose_and_random_poses_match_the_urdf(urdf_xml: str) -> None:
    chain = ArmChain(urdf_xml)
    assert chain.joint_names == ARM_JOINT_NAMES
    pos, rot = chain.fk(np.zeros(5))
    ref_pos, ref_rot = _pinocchio_fk(urdf_xml, np.zeros(5))
    np.testing.assert_allclose(pos, ref_pos, atol=1e-12)
    np.testing.assert_allclose(rot, ref_rot, atol=1e-12)
    # The zero pose is the arm stretched out forward: gripper frame 0.39 m ahead, 0.23 m up, approach axis forward.
    np.testing.assert_allclose(pos, [0.3914, 0.0, 0.2265], atol=1e-4)
    np.testing.assert_allclose(rot @ TOOL.approach, [1.0, 0.0, 0.0], atol=1e-9)
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = rng.uniform(ARM_LIMITS.lower, ARM_LIMITS.upper)
        pos, rot = chain.fk(q)
        ref_pos, ref_rot = _pinocchio_fk(urdf_xml, q)
        np.testing.assert_allclose(pos, ref_pos, atol=1e-12)
        np.testing.assert_allclose(rot, ref_rot, atol=1e-12)


def test_jacobian_matches_finite_differences(kin: ArmKinematics) -> None:
    rng = np.random.default_rng(0)
    limits = JointLimits.so101()
    for _ in range(5):
        q = rng.uniform(limits.lower * 0.6, limits.upper * 0.6)
        jac = kin.position_jacobian(q)
        eps = 1e-6
        num = np.stack([(kin.fk(q + eps * np.eye(6)[i]) - kin.fk(q)) / eps for i in range(6)], axis=1)
        assert np.allclose(jac, num, atol=1e-5)
    assert np.allclose(jac[:, JOINT_NAMES.index("gripper")], 0.0)
    point = np.array([0.01, -0.02, 0.03])
    q = rng.uniform(ARM_LIMITS.lower * 0.6, ARM_LIMITS.upper * 0.6)
    _, _, jacp, jacr = kin.chain.jacobian(q, point)

    def pose(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, rot = kin.chain.fk(q)
        return pos + rot @ point, rot

    for i in range(5):
        (p1, r1), (p0, r0) = pose(q + eps * np.eye(5)[i]), pose(q)
        np.testing.assert_allclose((p1 - p0) / eps, jacp[:, i], atol=1e-5)
        spin = (r1 @ r0.T - np.eye(3)) / eps  # skew matrix of the angular velocity
        np.testing.assert_allclose([spin[2, 1], spin[0, 2], spin[1, 0]], jacr[:, i], atol=1e-5)


def test_jog_round_trip_reaches_random_reachable_positions(kin: ArmKinematics) -> None:
    """Random joint positions -> FK target -> jog steps from home -> FK of the result is the target."""
    rng = np.random.default_rng(2)
    limits = JointLimits.so101()
    for _ in range(10):
        q_true = home_vector()
        cols = kin.ik_columns
        q_true[cols] = rng.uniform(limits.lower[cols] * 0.7, limits.upper[cols] * 0.7)
        target = kin.fk(q_true)
        q = home_vector()
        for _ in range(400):
            err = target - kin.fk(q)
            if np.linalg.norm(err) < 1e-5:
                break
            q = kin.ik_step(q, err * min(1.0, 0.01 / np.linalg.norm(err)), damping=0.005)
        np.testing.assert_allclose(kin.fk(q), target, atol=1e-4)
        assert limits.contains(q)


def test_top_down_round_trip_reaches_random_points_above_the_table(urdf_xml: str) -> None:
    """Random points within reach (0.15-0.26 m out, +-0.5 rad, 1.5-6 cm up) -> top-down IK -> FK: the point, with
    the gripper pointing down and the jaws across the reach."""
    chain = ArmChain(urdf_xml)
    rng = np.random.default_rng(3)
    q0 = home_vector()[:5]
    for _ in range(10):
        reach, angle = rng.uniform(0.15, 0.26), rng.uniform(-0.5, 0.5)
        target = np.array([reach * np.cos(angle), reach * np.sin(angle), rng.uniform(0.015, 0.06)])
        jaw = np.array([-np.sin(angle), np.cos(angle), 0.0])
        q = solve_top_down(chain, TOOL, target, jaw, q0, ARM_LIMITS)
        pos, rot = chain.fk(q)
        np.testing.assert_allclose(pos, target, atol=1e-3)
        assert rot @ TOOL.approach @ DOWN > 0.99
        assert abs(rot @ TOOL.jaw @ jaw) > 0.99
        assert ARM_LIMITS.contains(q)
    with pytest.raises(IKError, match=r"did not reach \[0.8, 0.0, 0.015\]"):
        solve_top_down(chain, TOOL, np.array([0.8, 0.0, 0.015]), np.array([0.0, 1.0, 0.0]), q0, ARM_LIMITS)


def test_a_solve_stalled_against_a_joint_limit_stops_early_with_the_full_runs_answer(urdf_xml: str,
                                                                                     monkeypatch) -> None:
    """High and far (22 cm out, 9.5 cm up) the wrist flex ends at its limit and the solve creeps towards a point it
    cannot quite reach: it stops after a few dozen iterations instead of all 200, within 1e-8 rad of their answer."""
    chain = ArmChain(urdf_xml)
    calls = []
    jacobian = chain.jacobian
    monkeypatch.setattr(chain, "jacobian", lambda *a: calls.append(1) or jacobian(*a))
    args = (chain, TOOL, np.array([0.22, 0.0, 0.095]), np.array([0.0, 1.0, 0.0]), home_vector()[:5], ARM_LIMITS)
    early = solve_top_down(*args)
    stopped_after = len(calls)
    monkeypatch.setattr(kinematics, "STALL_STEP_RAD", 0.0)
    calls.clear()
    full = solve_top_down(*args)
    assert len(calls) == 200 and stopped_after < 60
    assert early[3] == pytest.approx(ARM_LIMITS.upper[3])
    np.testing.assert_allclose(early, full, atol=1e-8)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ik_step_moves_in_the_commanded_direction(kin: ArmKinematics, axis: int, sign: float) -> None:
    q = home_vector()
    dx = np.zeros(3)
    dx[axis] = 0.004 * sign
    q2 = kin.ik_step(q, dx)
    moved = kin.fk(q2) - kin.fk(q)
    assert moved[axis] * sign > 0.0035, moved
    assert np.linalg.norm(np.delete(moved, axis)) < 0.0005, moved
    assert q2[JOINT_NAMES.index("wrist_roll")] == q[JOINT_NAMES.index("wrist_roll")]
    assert q2[JOINT_NAMES.index("gripper")] == q[JOINT_NAMES.index("gripper")]


def test_ik_respects_joint_limits(kin: ArmKinematics) -> None:
    limits = JointLimits.so101()
    q = home_vector()
    q[JOINT_NAMES.index("shoulder_pan")] = limits.upper[0] - 0.001
    for _ in range(100):  # keep pushing along the direction of increasing pan, past its limit
        pan_direction = kin.position_jacobian(q)[:, 0]
        q = kin.ik_step(q, 0.01 * pan_direction / np.linalg.norm(pan_direction))
        assert limits.contains(q)
    assert q[0] == pytest.approx(limits.upper[0])


def test_errors_name_the_problem(kin: ArmKinematics, urdf_xml: str, tmp_path) -> None:
    with pytest.raises(ValueError, match="expected 6 joint positions"):
        kin.fk([0.0, 0.0])
    with pytest.raises(ValueError, match="dx must be 3 finite"):
        kin.ik_step(home_vector(), [0.0, np.nan, 0.0])
    with pytest.raises(KinematicsError, match="no frame 'tool0'"):
        ArmKinematics(urdf_xml, ee_frame="tool0")
    with pytest.raises(KinematicsError, match="does not exist"):
        load_urdf_xml(tmp_path / "missing.urdf")
    bad = tmp_path / "one_joint.urdf"
    bad.write_text('<robot name="r"><link name="base_link"/><link name="gripper_frame_link"/>'
                   '<joint name="j" type="revolute"><parent link="base_link"/><child link="gripper_frame_link"/>'
                   '<axis xyz="0 0 1"/><limit lower="-1" upper="1" effort="1" velocity="1"/></joint></robot>')
    with pytest.raises(KinematicsError, match="URDF has no joints"):
        ArmKinematics.from_file(bad)
