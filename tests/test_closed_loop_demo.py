"""One short closed-loop episode of the shipped checkpoint through the real nodes (sim node + policy node over
DDS), as `make demo` runs it. Asserts the loop, not success: chunks flow, the arm moves, the episode is scored."""
import json

import imageio.v3 as iio

from so101_sim import closed_loop_demo
from so101_sim.policy_plugins import default_checkpoint


def test_shipped_checkpoint_closes_the_loop_over_dds(tmp_path, capsys):
    checkpoint = default_checkpoint()
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    rc = closed_loop_demo.main(["--episodes", "1", "--max-seconds", "4", "--settle-seconds", "0",
                                "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    episode = report["results"][0]
    assert report["episodes"] == 1 and isinstance(episode["success"], bool)
    assert report["nfe"] == 1 and episode["nfe"] == [1]
    # 5 Hz re-planning for up to 4 s: well over a handful of chunks unless the loop is broken.
    assert episode["chunks"] >= 5, episode
    assert episode["max_joint_motion_rad"] > 0.05, episode
    assert all(ms > 0 for ms in episode["chunk_total_ms"])
    frames = iio.imread(tmp_path / "top_camera.gif")
    assert frames.ndim == 4 and frames.shape[0] >= 5
    assert "[demo] success" in capsys.readouterr().out
