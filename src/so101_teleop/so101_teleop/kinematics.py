"""Where the teleop finds the arm model; the kinematics themselves are so101_common.kinematics (shared with the sim).

The 5-DoF arm cannot reach arbitrary 6-D poses, so the Cartesian jog controls the end-effector *position*
with the first four joints (wrist roll stays under direct control): ``ArmKinematics.ik_step``.
"""
from __future__ import annotations

from pathlib import Path

from so101_common.kinematics import KinematicsError

URDF_RELATIVE = Path("urdf") / "so101.urdf.xacro"


def default_urdf_path() -> Path:
    """The project's URDF, installed by so101_description (found in its share directory, never in the source)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        return Path(get_package_share_directory("so101_description")) / URDF_RELATIVE
    except PackageNotFoundError:
        raise KinematicsError("package so101_description is not installed (source the install space or set "
                              "urdf_path)") from None
