"""The paper's stacking and sorting tasks and the language-decided variants: scenes, randomisation, scores on
constructed states and on executed episodes, instruction_followed."""
from __future__ import annotations

import mujoco
import numpy as np
import pytest

from so101_sim.env import SimEnv
from so101_sim.expert import ScriptedExpert
from so101_sim.scene import CUBE_BODY, GREEN_CUBE_BODY, TOY_BODY, SceneConfig, stack_top_height
from so101_sim.tasks import LANGUAGE_DECIDED, TASKS, make_task

CFG = SceneConfig(image_height=32, image_width=32)


@pytest.fixture(scope="module")
def envs():
    made: dict[str, SimEnv] = {}

    def get(task: str) -> SimEnv:
        if task not in made:
            made[task] = SimEnv(CFG, task=task)
        return made[task]

    yield get
    for e in made.values():
        e.close()


def _place(env: SimEnv, name: str, xyz, yaw: float = 0.0) -> None:
    obj = env.scene.objects[name]
    env.data.qpos[obj.qpos:obj.qpos + 7] = [*xyz, np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]
    env.data.qvel[obj.dof:obj.dof + 6] = 0.0
    mujoco.mj_forward(env.model, env.data)


def _in_box_xyz(env: SimEnv, which: str, dx: float = 0.0) -> list[float]:
    box = env.data.xpos[env.scene.boxes[which]]
    return [box[0] + dx, box[1], env.cfg.box_wall_thickness + env.cfg.cube_half_size]


def _execute(env: SimEnv, plan: np.ndarray) -> None:
    for target in plan:
        env.command(target)
        env.step()


def test_registry_has_the_papers_tasks_and_the_language_variants():
    assert set(TASKS) == {"pick_place", "stacking", "sorting", "sorting_swapped", "pick_place_red",
                          "pick_place_green"}
    assert TASKS["stacking"].instruction == "put the orange toy on the coloured blocks"
    assert TASKS["sorting"].instruction == "put the red cube in the left box and the green cube in the right box"
    assert TASKS["sorting_swapped"].instruction == ("put the green cube in the left box and the red cube in the "
                                                    "right box")
    assert TASKS["pick_place_green"].instruction == "grasp the green block and put it in the box"
    assert set(LANGUAGE_DECIDED) <= set(TASKS)


def test_a_task_refuses_a_scene_without_its_objects(envs):
    with pytest.raises(ValueError, match="task 'sorting' needs the scene layout"):
        make_task("sorting", envs("pick_place").scene)


@pytest.mark.parametrize("pair,region", [(("sorting", "sorting_swapped"), "sort_region_center"),
                                         (("pick_place_red", "pick_place_green"), "cube_region_center")])
def test_variants_share_the_scene_seed_by_seed_and_cubes_never_overlap(envs, pair, region):
    a, b = envs(pair[0]), envs(pair[1])
    centre = np.asarray(getattr(CFG, region))
    red_xy = []
    for seed in range(15):
        a.reset(seed)
        b.reset(seed)
        pa = {n: a.task.position(a.data, n) for n in (CUBE_BODY, GREEN_CUBE_BODY)}
        for n in pa:
            np.testing.assert_allclose(b.task.position(b.data, n), pa[n], atol=1e-9)
            assert np.all(np.abs(pa[n][:2] - centre) <= 0.05 + 1e-3)
        assert np.linalg.norm(pa[CUBE_BODY][:2] - pa[GREEN_CUBE_BODY][:2]) >= CFG.min_object_distance - 2e-3
        red_xy.append(pa[CUBE_BODY][:2])
    assert np.ptp(np.array(red_xy), axis=0).min() > 0.04
    assert a.instruction_followed() is False and a.score() == 0.0


def test_stacking_randomises_toy_position_and_yaw(envs):
    env = envs("stacking")
    poses = []
    for seed in range(12):
        env.reset(seed)
        p = env.task.position(env.data, TOY_BODY)
        x_axis = env.data.xmat[env.scene.objects[TOY_BODY].body].reshape(3, 3)[:, 0]
        poses.append([p[0], p[1], p[2], np.arctan2(x_axis[1], x_axis[0])])
    poses = np.array(poses)
    assert np.all(np.abs(poses[:, :2] - CFG.cube_region_center) <= 0.05 + 1e-3)
    assert np.ptp(poses[:, 0]) > 0.04 and np.ptp(poses[:, 1]) > 0.04
    assert np.ptp(poses[:, 3]) > 3.0, "yaw is not randomised"
    # Lying flat on its torso after the settle steps.
    np.testing.assert_allclose(poses[:, 2], env.task.rest_height(TOY_BODY), atol=2e-3)
    assert env.instruction_followed() is None


def test_sorting_scores_quarter_per_grasp_and_per_match(envs):
    env = envs("sorting")
    env.reset(0)
    _place(env, CUBE_BODY, _in_box_xyz(env, "left"))
    _place(env, GREEN_CUBE_BODY, _in_box_xyz(env, "right"))
    assert env.score() == 1.0 and env.success() and env.instruction_followed()
    # The same state under the swapped instruction: both cubes were carried (grasp credit), neither matches.
    swapped = envs("sorting_swapped")
    swapped.reset(0)
    _place(swapped, CUBE_BODY, _in_box_xyz(swapped, "left"))
    _place(swapped, GREEN_CUBE_BODY, _in_box_xyz(swapped, "right"))
    assert swapped.score() == 0.5 and not swapped.success() and swapped.instruction_followed() is False
    # One cube in its box, the other still on the table.
    env.reset(0)
    _place(env, GREEN_CUBE_BODY, _in_box_xyz(env, "right"))
    assert env.score() == 0.5 and env.instruction_followed()
    # A cube in its box but still moving is grasped, not yet matched.
    env.data.qvel[env.scene.objects[GREEN_CUBE_BODY].dof + 2] = -0.2
    assert env.score() == 0.25


def test_choice_wrong_block_in_the_box_scores_no_placement(envs):
    env = envs("pick_place_red")
    env.reset(0)
    _place(env, GREEN_CUBE_BODY, _in_box_xyz(env, "target"))
    assert env.score() == 0.0 and not env.success() and env.instruction_followed() is False
    _place(env, CUBE_BODY, _in_box_xyz(env, "target", dx=0.02))
    _place(env, GREEN_CUBE_BODY, [0.22, -0.09, CFG.cube_half_size])
    assert env.score() == 1.0 and env.success()
    # Both in the box: grasp credit for the red one, no placement.
    _place(env, GREEN_CUBE_BODY, _in_box_xyz(env, "target", dx=-0.02))
    assert env.score() == 0.5 and not env.success()


def test_stacking_needs_half_a_second_at_rest_on_the_stack(envs):
    env = envs("stacking")
    env.reset(0)
    top = stack_top_height(CFG)
    cx, cy = CFG.stack_center
    _place(env, TOY_BODY, [cx - 0.005, cy, top + env.task.rest_height(TOY_BODY) + 0.001], yaw=0.4)
    assert env.score() == 0.0, "on the stack without any history is not yet stable"
    for _ in range(6):
        env.step()
    assert env.task.on_stack(env.data) and env.score() == 0.0
    for _ in range(12):
        env.step()
    assert env.score() == 1.0 and env.success()
    # Beside the stack on the table: nothing.
    env.reset(0)
    _place(env, TOY_BODY, [cx, cy - 0.06, env.task.rest_height(TOY_BODY)])
    for _ in range(20):
        env.step()
    assert env.score() == 0.0


def test_toy_leaning_on_the_stack_is_not_on_it(envs):
    env = envs("stacking")
    env.reset(0)
    cx, cy = CFG.stack_center
    # Half on the top block, half off: the centre of mass is beyond the block's edge, so it tips off.
    _place(env, TOY_BODY, [cx, cy + CFG.stack_top_half[1] + 0.012, stack_top_height(CFG) + 0.014])
    for _ in range(30):
        env.step()
    assert not env.task.on_stack(env.data) and env.score() == 0.0


def test_a_grasp_is_remembered_after_the_object_is_dropped(envs):
    """Run the expert until the red cube is carried, then open the jaws over the table: half the score."""
    env = envs("pick_place_red")
    env.reset(3)
    plan = ScriptedExpert(env).plan()
    for target in plan:
        env.command(target)
        env.step()
        if env.task.held(env.data, CUBE_BODY) and env.task.position(env.data, CUBE_BODY)[2] > 0.04:
            break
    assert CUBE_BODY in env.task.grasped
    drop = env.joint_positions()
    drop[5] = 1.0
    env.hold(drop)
    for _ in range(30):
        env.step()
    assert env.task.position(env.data, CUBE_BODY)[2] < CFG.cube_half_size + 0.003, "cube not back on the table"
    assert env.score() == 0.5 and env.instruction_followed()
    # reset forgets it
    env.reset(3)
    assert env.task.grasped == set() and env.score() == 0.0


@pytest.mark.parametrize("done,judge,expect", [("pick_place_green", "pick_place_red", 0.0),
                                               ("sorting_swapped", "sorting", 0.5)])
def test_doing_the_other_instruction_is_scored_as_not_followed(envs, done, judge, expect):
    """The other variant's expert plan on the same seed's scene: what a policy ignoring the instruction does."""
    other, env = envs(done), envs(judge)
    other.reset(5)
    plan = ScriptedExpert(other).plan()
    env.reset(5)
    _execute(env, plan)
    assert other.task.goals(other.data)[0].obj != env.task.goals(env.data)[0].obj
    assert env.score() == expect and not env.success() and env.instruction_followed() is False
