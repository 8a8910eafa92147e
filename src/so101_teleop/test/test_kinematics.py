"""FK/IK on the project's URDF (urdf/so101.urdf.xacro expanded with xacro, loaded with Pinocchio)."""
from __future__ import annotations

import numpy as np
import pytest

from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits, home_vector
from so101_teleop.kinematics import ArmKinematics, KinematicsError, default_urdf_path, load_urdf_xml


@pytest.fixture(scope="module")
def kin() -> ArmKinematics:
    return ArmKinematics.from_file(default_urdf_path())


def test_project_urdf_is_found_and_has_the_joints(kin: ArmKinematics) -> None:
    assert default_urdf_path().name == "so101.urdf.xacro"
    names = list(kin.model.names)
    assert all(n in names for n in JOINT_NAMES)
    # Home pose: the gripper is in front of the base and above the table.
    p = kin.fk(home_vector())
    assert 0.1 < p[0] < 0.4 and abs(p[1]) < 0.01 and 0.0 < p[2] < 0.3


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


def test_errors_name_the_problem(kin: ArmKinematics, tmp_path) -> None:
    with pytest.raises(ValueError, match="expected 6 joint positions"):
        kin.fk([0.0, 0.0])
    with pytest.raises(ValueError, match="dx must be 3 finite"):
        kin.ik_step(home_vector(), [0.0, np.nan, 0.0])
    with pytest.raises(KinematicsError, match="no frame 'tool0'"):
        ArmKinematics(load_urdf_xml(default_urdf_path()), ee_frame="tool0")
    with pytest.raises(KinematicsError, match="does not exist"):
        load_urdf_xml(tmp_path / "missing.urdf")
    bad = tmp_path / "one_joint.urdf"
    bad.write_text('<robot name="r"><link name="a"/><link name="b"/><joint name="j" type="revolute">'
                   '<parent link="a"/><child link="b"/><axis xyz="0 0 1"/>'
                   '<limit lower="-1" upper="1" effort="1" velocity="1"/></joint></robot>')
    with pytest.raises(KinematicsError, match="URDF has no joints"):
        ArmKinematics.from_file(bad)
