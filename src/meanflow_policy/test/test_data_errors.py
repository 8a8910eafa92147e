"""Bad input is named: corrupt bags, missing topics, mismatched joints, refused episodes, empty datasets."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from rosbags.rosbag2 import Reader

from meanflow_policy.data.bag_reader import BagError
from meanflow_policy.data.cache import load_episode, load_episodes
from meanflow_policy.data.sync import DatasetError, SyncConfig
from meanflow_policy.data.demo_bags import synthetic_episode, write_bag
from so101_common.episode_bag import EpisodeMetadata, EpisodeWriter
from so101_common.graph import JOINT_STATES_TOPIC, TRAJECTORY_TOPIC, camera_image_topic

CFG = SyncConfig(image_size=8)



def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_mcap_is_named_and_skipped(good_bag: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "data"
    _copy(good_bag, root / "a_good")
    cut = _copy(good_bag, root / "b_cut")
    mcap = next(cut.glob("*.mcap"))
    with open(mcap, "r+b") as fh:
        fh.truncate(mcap.stat().st_size // 2)
    with pytest.raises(BagError, match=r"b_cut: cannot open the bag \(truncated or corrupt\?\)"):
        load_episode(cut, CFG, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="meanflow_policy.data"):
        episodes, report = load_episodes([root], CFG, tmp_path / "cache")
    assert [e.name for e in episodes] == ["a_good"]
    assert list(report.skipped) == [str(cut.resolve())] and "truncated or corrupt" in report.skipped[str(cut.resolve())]
    assert "1 episodes skipped" in report.summary()
    assert any("skipping episode" in r.message and "b_cut" in r.message for r in caplog.records)
    with pytest.raises(DatasetError, match="strict mode.*b_cut.*truncated or corrupt"):
        load_episodes([root], CFG, tmp_path / "cache", strict=True)


def _with_garbage(good: Path, dst: Path, topic: str, when_ns: int) -> Path:
    """A copy of ``good`` whose first message on ``topic`` from ``when_ns`` on is cut short (bad CDR)."""
    reader = Reader(good)
    reader.open()
    writer = EpisodeWriter(dst, EpisodeMetadata(instruction="reach"))
    for conn in reader.connections:
        writer.add_topic(conn.topic, conn.msgtype)
    for conn, t, raw in reader.messages():
        if conn.topic == topic and t >= when_ns:
            raw, when_ns = bytes(raw[:12]), 1 << 62
        writer.write(conn.topic, t, raw)
    reader.close()
    writer.close(success=True)
    return dst


def test_undecodable_messages(good_bag: Path, tmp_path: Path) -> None:
    """A bad joint state is skipped and counted; a bad image that a step needs makes the episode fail, named."""
    bag = _with_garbage(good_bag, tmp_path / "bad_state", JOINT_STATES_TOPIC, 1_500_000_000)
    ep = load_episode(bag, CFG, tmp_path / "cache")
    assert ep.report.bad_messages == {JOINT_STATES_TOPIC: 1}
    _, report = load_episodes([bag], CFG, tmp_path / "cache")
    assert report.bad_messages == 1 and "bad messages skipped 1" in report.summary()
    bag = _with_garbage(good_bag, tmp_path / "bad_image", camera_image_topic("top"), 1_500_000_000)
    with pytest.raises(BagError, match=r"bad_image: image 15 on /camera/top/image_raw cannot be decoded"):
        load_episode(bag, CFG, tmp_path / "cache")


@pytest.mark.parametrize("missing, what", [
    (camera_image_topic("top"), "camera 'top'"),
    (JOINT_STATES_TOPIC, "joint states"),
    (TRAJECTORY_TOPIC, "commanded trajectories"),
])
def test_missing_topic_is_named(tmp_path: Path, missing: str, what: str) -> None:
    content = synthetic_episode(1, duration_s=0.5, height=16, width=16)
    topics = [camera_image_topic("wrist"), camera_image_topic("top"), JOINT_STATES_TOPIC, TRAJECTORY_TOPIC]
    bag = write_bag(tmp_path / "ep", content, instruction="reach", topics=[t for t in topics if t != missing])
    with pytest.raises(BagError, match=f"topic '{missing}' \\({what}\\) is missing; the bag has"):
        load_episode(bag, CFG, tmp_path / "cache")


def test_next_state_actions_do_not_need_the_trajectory_topic(tmp_path: Path) -> None:
    content = synthetic_episode(1, duration_s=0.5, height=16, width=16)
    bag = write_bag(tmp_path / "ep", content, instruction="reach",
                    topics=[camera_image_topic("wrist"), camera_image_topic("top"), JOINT_STATES_TOPIC])
    ep = load_episode(bag, SyncConfig(image_size=8, action_source="next_state"), tmp_path / "cache")
    assert ep.sample_steps.size > 10


def test_joint_names_that_do_not_match(tmp_path: Path) -> None:
    content = synthetic_episode(2, duration_s=0.5, height=16, width=16)
    renamed = [(t, [f"joint{i}" for i in range(6)], p) for t, _, p in content.states]
    content.states = renamed
    bag = write_bag(tmp_path / "ep", content, instruction="reach")
    with pytest.raises(BagError, match=r"configured joint names \['shoulder_pan'.*do not match; messages carry "
                                       r"joints \['joint0'"):
        load_episode(bag, CFG, tmp_path / "cache")


def test_trajectories_for_other_joints(tmp_path: Path) -> None:
    content = synthetic_episode(3, duration_s=0.5, height=16, width=16)
    content.trajectories = [(t, s, [f"j{i}" for i in range(6)], pts) for t, s, _, pts in content.trajectories]
    bag = write_bag(tmp_path / "ep", content, instruction="reach")
    with pytest.raises(BagError, match="every one of the 5 trajectories .* was rejected.*unknown joints"):
        load_episode(bag, CFG, tmp_path / "cache")


def test_unknown_joint_names_in_config() -> None:
    with pytest.raises(ValueError, match="no limits known for joints \\['elbow'\\]"):
        SyncConfig(joint_names=("shoulder_pan", "elbow"))


def test_refused_episodes_and_empty_dataset(good_bag: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    failed = _copy(good_bag, root / "failed")
    meta = json.loads((failed / "episode.json").read_text())
    (failed / "episode.json").write_text(json.dumps({**meta, "status": "failed", "failure": "operator aborted"}))
    unsuccessful = _copy(good_bag, root / "unsuccessful")
    (unsuccessful / "episode.json").write_text(json.dumps({**meta, "success": False}))
    with pytest.raises(DatasetError, match=r"empty dataset: none of the 2 bags.*failed: .*status is 'failed', not "
                                           r"'complete' \(operator aborted\).*unsuccessful: .*success: false"):
        load_episodes([root], CFG, tmp_path / "cache")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="nothing: neither a rosbag2 directory nor a folder of them"):
        load_episodes([tmp_path / "nothing"], CFG, tmp_path / "cache")
    with pytest.raises(DatasetError, match="nope: no such file or directory"):
        load_episodes([tmp_path / "nope"], CFG, tmp_path / "cache")


def test_stale_cameras_everywhere_is_an_empty_episode(tmp_path: Path) -> None:
    content = synthetic_episode(4, duration_s=1.0, height=16, width=16)
    content.images["wrist"] = content.images["wrist"][:1]  # the wrist camera died after its first frame
    bag = write_bag(tmp_path / "ep", content, instruction="reach")
    ep = load_episode(bag, CFG, tmp_path / "cache")
    assert ep.report.dropped_stale["wrist"] == ep.report.steps - 3  # fresh for 0.1 s: steps 0..2 at 30 Hz
    with pytest.raises(DatasetError, match="empty dataset"):
        load_episodes([bag], SyncConfig(image_size=8, max_image_age_s=0.001), tmp_path / "cache")
