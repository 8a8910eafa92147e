"""The pick-place success detector on constructed states, and the task registry."""
from __future__ import annotations

import mujoco
import numpy as np
import pytest

from so101_sim.env import SimEnv
from so101_sim.ik import TopDownIK
from so101_sim.scene import SceneConfig
from so101_sim.tasks import TASKS, make_task


@pytest.fixture(scope="module")
def env():
    e = SimEnv(SceneConfig(image_height=32, image_width=32))
    yield e
    e.close()


def _place_cube(env: SimEnv, xyz, vel=(0.0, 0.0, 0.0)) -> None:
    adr, dof = env.scene.cube_qpos, env.scene.cube_dof
    env.data.qpos[adr:adr + 7] = [*xyz, 1, 0, 0, 0]
    env.data.qvel[dof:dof + 6] = [*vel, 0, 0, 0]
    mujoco.mj_forward(env.model, env.data)


def _box(env):
    return env.data.xpos[env.scene.box_body].copy()


def _resting_z(env):
    return env.cfg.box_wall_thickness + env.cfg.cube_half_size


def test_cube_resting_in_box_released_is_success(env):
    env.reset(0)
    box = _box(env)
    _place_cube(env, [box[0] + 0.01, box[1] - 0.01, _resting_z(env)])
    assert env.task.success(env.data)


def test_cube_at_start_is_not_success(env):
    env.reset(0)
    assert not env.task.success(env.data)


@pytest.mark.parametrize("offset,z_extra,vel", [
    ((0.2, 0.0), 0.0, (0, 0, 0)),        # on the table, far from the box
    ((0.05, 0.0), 0.03, (0, 0, 0)),      # on the box wall, not inside
    ((0.0, 0.0), 0.06, (0, 0, 0)),       # above the box (still carried or falling)
    ((0.0, 0.0), 0.0, (0.0, 0.0, -0.2)),  # inside but still moving
])
def test_not_success_outside_high_or_moving(env, offset, z_extra, vel):
    env.reset(0)
    box = _box(env)
    _place_cube(env, [box[0] + offset[0], box[1] + offset[1], _resting_z(env) + z_extra], vel)
    assert not env.task.success(env.data)


def test_cube_in_box_still_held_by_the_jaws_is_not_success(env):
    env.reset(0)
    box = _box(env)
    cube = np.array([box[0], box[1], _resting_z(env) + 0.005])
    ik = TopDownIK(env.scene)
    arm = ik.solve(cube, (0, 1, 0), env.joint_positions()[:5])
    env.data.qpos[env.scene.joint_qpos[:5]] = arm
    env.data.qpos[env.scene.joint_qpos[5]] = 0.15  # jaws squeezing a 3 cm cube
    _place_cube(env, cube)
    assert env.task.cube_in_box(env.data)
    assert env.task.gripper_touches_cube(env.data)
    assert not env.task.success(env.data)


def test_reset_randomises_cube_in_10cm_region_deterministically(env):
    positions = []
    for seed in range(20):
        env.reset(seed)
        positions.append(env.task.cube_position(env.data))
    positions = np.array(positions)
    centre = np.asarray(env.cfg.cube_region_center)
    assert np.all(np.abs(positions[:, :2] - centre) <= 0.05 + 1e-3)
    assert np.ptp(positions[:, 0]) > 0.04 and np.ptp(positions[:, 1]) > 0.04
    np.testing.assert_allclose(positions[:, 2], env.cfg.cube_half_size, atol=2e-3)
    env.reset(7)
    np.testing.assert_allclose(env.task.cube_position(env.data), positions[7], atol=1e-9)


def test_registry_names_known_tasks(env):
    assert "pick_place" in TASKS
    with pytest.raises(ValueError, match="unknown task 'stack'.*pick_place"):
        make_task("stack", env.scene)


def test_reset_rejects_bad_seed(env):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        env.reset(-1)
