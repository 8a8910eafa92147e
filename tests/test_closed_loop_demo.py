"""`make demo` through the real nodes (sim node + one policy node over DDS) on two tasks in turn, the task changed
at run time (the sim node's parameter + set_instruction). Asserts the loop and the reports, not success: chunks
flow, the arm moves, each episode is scored, each task gets a video a person can see."""
import json

import imageio.v3 as iio
import pytest

from so101_sim import closed_loop_demo
from so101_sim.policy_plugins import default_checkpoint
from so101_sim.tasks import TASKS

SIZE = 64


@pytest.mark.slow  # ~65 s on the loaded 2-core machine: torch import, policy start-up, two episodes, videos
@pytest.mark.timeout(300)
def test_shipped_checkpoint_runs_two_tasks_in_turn_over_dds(tmp_path, capsys):
    checkpoint = default_checkpoint()
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    rc = closed_loop_demo.main(["--tasks", "pick_place,stacking", "--episodes", "1", "--max-seconds", "4",
                                "--settle-seconds", "0", "--image-size", str(SIZE), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((tmp_path / "demo.json").read_text())
    assert list(report["tasks"]) == ["pick_place", "stacking"] and report["episodes"] == 2
    for task, summary in report["tasks"].items():
        episode = summary["results"][0]
        assert summary["episodes"] == 1 and summary["instruction"] == TASKS[task].instruction
        assert episode["task"] == task and episode["seed"] == 1000 and isinstance(episode["success"], bool)
        assert 0.0 <= episode["score"] <= 1.0 and summary["score"] == episode["score"]
        assert episode["nfe"] == [1]
        # 5 Hz re-planning for up to 4 s: well over a handful of chunks unless the loop is broken.
        assert episode["chunks"] >= 5, episode
        assert episode["max_joint_motion_rad"] > 0.05, episode
        assert all(ms > 0 for ms in episode["chunk_total_ms"]) and episode["chunk_ms_median"] > 0
        # top | wrist side by side, nearest-neighbour upscaled from 64 px to 384 px high.
        frames = iio.imread(tmp_path / f"{task}.gif")
        assert frames.ndim == 4 and frames.shape[0] >= 5 and frames.shape[1:] == (384, 2 * 384, 3), frames.shape
        assert summary["gif"] == str(tmp_path / f"{task}.gif")
        assert summary["mp4"] == str(tmp_path / f"{task}.mp4")
        assert iio.imread(tmp_path / f"{task}.mp4", plugin="pyav").shape[1:] == (384, 2 * 384, 3)
        assert f"[demo] {task} episode 1/1 seed 1000: " in out
    # The stacking GIF shows the stacking scene: the orange toy, which pick_place's scene does not have.
    def toy_pixels(frame):
        r, g, b = (frame[..., i].astype(int) for i in range(3))
        return int(((r > 150) & (g > 0.3 * r) & (g < 0.7 * r) & (b < 0.5 * g)).sum())
    assert toy_pixels(iio.imread(tmp_path / "stacking.gif")[0]) > 100
    assert toy_pixels(iio.imread(tmp_path / "pick_place.gif")[0]) == 0
    # The sim switched its scene at the reset, and the policy was told the new instruction, in one process each.
    sim_log, policy_log = (tmp_path / "sim_node.log").read_text(), (tmp_path / "policy_node.log").read_text()
    assert "task switched from 'pick_place'" in sim_log
    assert f"instruction set: {TASKS['stacking'].instruction!r}" in policy_log
    assert policy_log.count("]: ready: cameras") == 1
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last["tasks"]) == {"pick_place", "stacking"} and last["chunk_ms_median"] > 0
    assert all(set(t) == {"score", "success_rate", "episodes"} for t in last["tasks"].values())


def test_unknown_task_is_one_line_naming_the_registered_tasks(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        closed_loop_demo.main(["--tasks", "pick_place,stack", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown task(s) ['stack']; registered tasks: [" in err and "'stacking'" in err
    assert not (tmp_path / "out").exists()
