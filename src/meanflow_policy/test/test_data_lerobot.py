"""LeRobotDataset v3.0 export and import on real bags: layout, SO-101 units, same training samples, bad datasets."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from meanflow_policy.data import lerobot as lr
from meanflow_policy.tools import export_lerobot
from meanflow_policy.tools import train as train_cli
from meanflow_policy.data.cache import load_episodes
from meanflow_policy.data.samples import SampleSet
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.data.demo_bags import DemoContent, synthetic_episode, write_bag
from so101_common.graph import JOINT_NAMES
from so101_common.joints import JointLimits

CFG = SyncConfig(fps=10.0, image_size=32, chunk_size=6)
INSTRUCTIONS = ("reach the yellow square", "reach the yellow square", "touch the blue wall")
# Video is lossy (H.264, yuv420p, crf 18): after the training resize, pixels (0-255) may differ by 2 on average and
# by 16 for all but 1 %: the 4:2:0 chroma subsampling smears hard colour edges (measured: mean 1.3, 99th pct 10).
FRAME_MEAN_TOL, FRAME_Q99_TOL = 2.0, 16
JOINT_TOL = 1e-5  # rad: float32 degrees in the parquet table


def _stale_wrist_episode() -> DemoContent:
    """Like a synthetic episode, but the wrist camera drops out for 0.3 s mid-episode (stale steps)."""
    content = synthetic_episode(seed=7, duration_s=1.6, height=48, width=64)
    t0 = content.images["wrist"][0][0]
    content.images["wrist"] = [(t, img) for t, img in content.images["wrist"]
                               if not 0.6e9 <= t - t0 <= 0.9e9]
    return content


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demos")
    for i, text in enumerate(INSTRUCTIONS):
        write_bag(root / f"episode_{i}", synthetic_episode(seed=i, duration_s=1.5, height=48, width=64),
                  instruction=text)
    write_bag(root / "episode_3", _stale_wrist_episode(), instruction=INSTRUCTIONS[0])
    return root


@pytest.fixture(scope="module")
def exported(bags: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lerobot") / "so101_demo"
    assert export_lerobot.main(["--bags", str(bags), "--out", str(out), "--fps", "10"]) == 0
    return out


def test_units_follow_lerobot_so101_follower() -> None:
    """Arm joints in LeRobot's degree mode ((ticks - mid) * 360 / 4095), gripper 0..100 over its range."""
    limits = JointLimits.so101(JOINT_NAMES)
    rad = np.array([0.0, math.pi / 2, -math.pi / 4, 2 * math.pi * 100 / 4096, 0.0, limits.lower[-1]])
    deg = lr.to_lerobot_units(rad, JOINT_NAMES)
    np.testing.assert_allclose(deg[:5], [0.0, 90 * 4096 / 4095, -45 * 4096 / 4095, 100 * 360 / 4095, 0.0])
    assert deg[5] == pytest.approx(0.0)
    assert lr.to_lerobot_units(limits.upper, JOINT_NAMES)[5] == pytest.approx(100.0)
    back = lr.from_lerobot_units(deg, JOINT_NAMES)
    np.testing.assert_allclose(back, rad, atol=1e-12)


def test_export_writes_a_v3_dataset(exported: Path, bags: Path) -> None:
    info = json.loads((exported / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "so101_follower"
    assert info["total_episodes"] == 4 and info["total_tasks"] == 2
    assert info["features"]["observation.state"]["names"] == [f"{n}.pos" for n in JOINT_NAMES]
    assert info["features"]["observation.images.top"]["shape"] == [48, 64, 3]
    tasks = pd.read_parquet(exported / "meta/tasks.parquet")
    assert list(tasks.index) == ["reach the yellow square", "touch the blue wall"]
    assert list(tasks["task_index"]) == [0, 1]
    data = pq.read_table(exported / "data/chunk-000/file-000.parquet").to_pandas()
    assert len(data) == info["total_frames"]
    assert list(data["index"]) == list(range(len(data)))
    episodes = pd.read_parquet(exported / "meta/episodes/chunk-000/file-000.parquet")
    assert list(episodes["length"]) == list(data.groupby("episode_index").size())
    assert list(episodes["tasks"].map(list)) == [[t] for t in INSTRUCTIONS] + [[INSTRUCTIONS[0]]]
    # The stale wrist gap is kept on the grid (held frame) and flagged, as training drops those steps.
    stale = data[(data["episode_index"] == 3) & ~data["meanflow.fresh"]]
    assert 2 <= len(stale) <= 4
    import av

    for cam in ("wrist", "top"):
        with av.open(str(exported / f"videos/observation.images.{cam}/chunk-000/file-000.mp4")) as video:
            assert sum(1 for _ in video.decode(video=0)) == len(data)
    stats = json.loads((exported / "meta/stats.json").read_text())
    assert np.array(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)
    # States are LeRobot units of the training samples' radians.
    from_bags, _ = load_episodes([bags / "episode_0"], CFG, exported.parent / "cache")
    ep0 = data[data["episode_index"] == 0]
    want = lr.to_lerobot_units(from_bags[0].state[from_bags[0].sample_steps], JOINT_NAMES)
    np.testing.assert_allclose(np.stack(ep0["observation.state"])[from_bags[0].sample_steps], want, atol=1e-3)


def test_training_samples_from_lerobot_equal_those_from_bags(exported: Path, bags: Path, tmp_path: Path) -> None:
    from_bags, _ = load_episodes([bags], CFG, tmp_path / "cache")
    from_lerobot, report = lr.load_lerobot_episodes(exported, CFG)
    assert report.episodes == 4 == len(from_bags)
    for eb, el in zip(sorted(from_bags, key=lambda e: e.name), from_lerobot):
        assert el.instruction == eb.instruction
        np.testing.assert_array_equal(el.sample_steps, eb.sample_steps)
        np.testing.assert_array_equal(el.action_valid, eb.action_valid)
        np.testing.assert_allclose(el.state[el.sample_steps], eb.state[eb.sample_steps], atol=JOINT_TOL)
        np.testing.assert_allclose(el.action, eb.action, atol=JOINT_TOL)
    # Whole training batches (chunks, pad masks, images at the training size) agree.
    set_b = SampleSet(sorted(from_bags, key=lambda e: e.name), CFG)
    set_l = SampleSet(from_lerobot, CFG)
    assert len(set_b) == len(set_l)
    rows = np.arange(len(set_b))
    bb, bl = set_b.batch(rows), set_l.batch(rows)
    assert bb["instruction"] == bl["instruction"]
    torch.testing.assert_close(bl["state"], bb["state"], atol=JOINT_TOL, rtol=0)
    torch.testing.assert_close(bl["actions"], bb["actions"], atol=JOINT_TOL, rtol=0)
    assert torch.equal(bl["action_is_pad"], bb["action_is_pad"])
    diff = (bl["images"].float() - bb["images"].float()).abs()
    assert float(diff.mean()) < FRAME_MEAN_TOL
    assert float(np.percentile(diff.numpy(), 99)) <= FRAME_Q99_TOL


def test_meanflow_train_reads_a_lerobot_dataset(exported: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        code = train_cli.main(["--lerobot-dataset", str(exported), "--out", str(tmp_path / "run"), "--fps", "10",
                               "--chunk-size", "6", "--steps", "2", "--batch-size", "4", "--val-every", "2",
                               "--val-batches", "1", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                               "--cpu-threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    dataset = json.loads((tmp_path / "run/dataset.json").read_text())
    sources = [e["source"] for e in dataset["train_episodes"] + dataset["val_episodes"]]
    assert sorted(sources) == sorted(f"{exported}#episode_{i}" for i in range(4))


def _copy(exported: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(exported, target)
    return target


def _edit_info(root: Path, edit) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    edit(info)
    (root / "meta/info.json").write_text(json.dumps(info))


def _train_error(root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, *extra: str) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = train_cli.main(["--lerobot-dataset", str(root), "--out", str(tmp_path / "run"), "--fps", "10",
                               "--steps", "1", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                               "--no-progress", *extra])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_bad_lerobot_datasets_give_one_clear_error(exported: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    root = _copy(exported, tmp_path)
    # another fps than the policy's
    message = _train_error(root, tmp_path, caplog, "--chunk-size", "6", "--fps", "30")
    assert "'fps' is 10" in message and "30 Hz" in message and "info.json" in message
    # another arm's joint names
    _edit_info(root, lambda i: i["features"]["action"].update(names=[f"joint_{k}" for k in range(6)]))
    message = _train_error(root, tmp_path, caplog)
    assert "'action'" in message and "joint_0" in message and "shoulder_pan.pos" in message
    shutil.rmtree(root)
    # a missing video file
    root = _copy(exported, tmp_path)
    (root / "videos/observation.images.top/chunk-000/file-000.mp4").unlink()
    message = _train_error(root, tmp_path, caplog)
    assert "observation.images.top" in message and "missing" in message
    # a camera the policy needs is not in the dataset
    _edit_info(root, lambda i: i["features"].pop("observation.images.wrist"))
    message = _train_error(root, tmp_path, caplog)
    assert "'observation.images.wrist' is missing" in message
    # an older format version
    _edit_info(root, lambda i: i.update(codebase_version="v2.1"))
    message = _train_error(root, tmp_path, caplog)
    assert "codebase_version 'v2.1'" in message and "v3.0" in message
    (root / "meta/info.json").unlink()
    assert "no meta/info.json" in _train_error(root, tmp_path, caplog)
    # not a LeRobot dataset at all
    message = _train_error(tmp_path / "nothing", tmp_path, caplog)
    assert "no such directory" in message


def test_export_bad_input_is_one_line_and_leaves_no_dataset(bags: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    def export_error(*argv: str) -> str:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert export_lerobot.main(["--bags", str(bags), *argv]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        return errors[0]

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "not an empty folder" in export_error("--out", str(taken))
    assert (taken / "notes.txt").read_text() == "mine"
    assert "whole number" in export_error("--out", str(tmp_path / "a"), "--fps", "7.5")
    # A good episode, then one without the top camera, in strict mode: the export fails after it has begun
    # writing, and nothing is left behind, not even a partial folder.
    mixed = tmp_path / "mixed"
    shutil.copytree(bags / "episode_0", mixed / "episode_0")
    content = synthetic_episode(seed=9, duration_s=1.0, height=48, width=64)
    write_bag(mixed / "episode_9", content, instruction=INSTRUCTIONS[0],
              topics=[t for t in ("/camera/wrist/image_raw", "/joint_states", "/arm_controller/joint_trajectory")])
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert export_lerobot.main(["--bags", str(mixed), "--out", str(tmp_path / "b"), "--strict"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "episode_9" in errors[0] and "/camera/top/image_raw" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed", "taken"]


def _reencode_av1(video: Path) -> None:
    """Re-encode an mp4 as LeRobot's recorder does by default (SVT-AV1, yuv420p, crf 30, GOP 2)."""
    import av
    from fractions import Fraction

    with av.open(str(video)) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    target = video.with_suffix(".av1.mp4")
    with av.open(str(target), mode="w") as dst:
        stream = dst.add_stream("libsvtav1", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.time_base = "yuv420p", Fraction(1, 10)
        stream.options = {"crf": "30", "g": "2"}
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = k
            dst.mux(stream.encode(frame))
        dst.mux(stream.encode())
    target.replace(video)


def test_a_dataset_recorded_by_lerobot_trains_every_frame(exported: Path, tmp_path: Path) -> None:
    """No meanflow.* columns (LeRobot's recorder writes none) and AV1 video: every frame is a sample with a valid
    action, joint values converted from the table, frames decoded from AV1."""
    root = _copy(exported, tmp_path)
    table = pq.read_table(root / "data/chunk-000/file-000.parquet")
    pq.write_table(table.drop_columns(["meanflow.fresh", "meanflow.action_valid"]),
                   root / "data/chunk-000/file-000.parquet")
    _edit_info(root, lambda i: [i["features"].pop(k) for k in ("meanflow.fresh", "meanflow.action_valid")])
    _reencode_av1(root / "videos/observation.images.wrist/chunk-000/file-000.mp4")
    ours, _ = lr.load_lerobot_episodes(exported, CFG)
    theirs, report = lr.load_lerobot_episodes(root, CFG)
    data = table.to_pandas()
    for e_ours, e_theirs in zip(ours, theirs):
        n = len(e_theirs.times_ns)
        np.testing.assert_array_equal(e_theirs.sample_steps, np.arange(n))
        assert e_theirs.action_valid.all()
        rows = data[data["episode_index"] == int(e_theirs.name.split("_")[-1])]
        np.testing.assert_allclose(e_theirs.action, lr.from_lerobot_units(np.stack(rows["action"]), JOINT_NAMES),
                                   atol=1e-6)
        diff = np.abs(e_theirs.frames["wrist"].astype(float) - e_ours.frames["wrist"].astype(float))
        assert diff.mean() < 2 * FRAME_MEAN_TOL  # AV1 at crf 30 on top of the H.264 loss
    assert report.samples == len(data)


def test_episode_keys_follow_the_content(exported: Path, tmp_path: Path) -> None:
    """Keys order the split and name prefix-feature cache entries: changed actions must give new keys."""
    import pyarrow as pa

    root = _copy(exported, tmp_path)
    file = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(file)
    shifted = np.stack(table.column("action").to_numpy(zero_copy_only=False)) + 1.0
    column = pa.FixedSizeListArray.from_arrays(pa.array(shifted.reshape(-1).astype(np.float32)), shifted.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", column), file)
    before, _ = lr.load_lerobot_episodes(exported, CFG)
    after, _ = lr.load_lerobot_episodes(root, CFG)
    assert not {e.key for e in before} & {e.key for e in after}
    np.testing.assert_allclose(after[0].action[:, 0] - before[0].action[:, 0], math.radians(1) * 4095 / 4096,
                               atol=1e-5)
