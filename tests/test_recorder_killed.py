"""The episode recorder killed with SIGKILL mid-episode (its own process, real messages over DDS): the training
reader names the folder it leaves, so101-recover-episode rebuilds the bag, and the training reader reads it."""
from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
from builtin_interfaces.msg import Duration
from mcap.exceptions import McapError
from mcap.records import Message
from mcap.stream_reader import StreamReader
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

import pytest

from meanflow_policy.data.cache import load_episode, load_episodes

from meanflow_policy.data.sync import DatasetError, SyncConfig
from so101_common.episode_bag import read_episode_metadata
from so101_common.graph import (JOINT_NAMES, JOINT_STATES_TOPIC, START_EPISODE_SERVICE, TRAJECTORY_TOPIC,
                                camera_image_topic)
from so101_common.images import rgb_to_image
from so101_common.joints import home_vector
from so101_common.testing import spin_until, wait_until_answering
from so101_interfaces.srv import StartEpisode

CAMERAS = (camera_image_topic("wrist"), camera_image_topic("top"))
QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)


def messages_on_disk(mcap: Path) -> int:
    """Messages of the (unfinished) mcap that are already in the file, read record by record."""
    count = 0
    with open(mcap, "rb") as fh:
        try:
            for record in StreamReader(fh).records:
                count += isinstance(record, Message)
        except (McapError, struct.error):
            pass  # the file ends inside a record: the writer is still at work
    return count


def publish_episode(node, ticks: int) -> dict[str, int]:
    """Two small cameras, joint states and one-point trajectories at about 30 Hz; the count per topic."""
    pubs = {t: node.create_publisher(Image, t, QOS) for t in CAMERAS}
    pubs[JOINT_STATES_TOPIC] = node.create_publisher(JointState, JOINT_STATES_TOPIC, QOS)
    pubs[TRAJECTORY_TOPIC] = node.create_publisher(JointTrajectory, TRAJECTORY_TOPIC, QOS)
    assert spin_until(node, lambda: all(p.get_subscription_count() >= 1 for p in pubs.values()), 20.0)
    home = home_vector(JOINT_NAMES)
    rng = np.random.default_rng(0)
    for tick in range(ticks):
        for topic in CAMERAS:
            pubs[topic].publish(rgb_to_image(rng.integers(0, 255, (24, 32, 3), np.uint8), time.time_ns()))
        pubs[JOINT_STATES_TOPIC].publish(JointState(name=list(JOINT_NAMES), position=list(home + 0.001 * tick)))
        point = JointTrajectoryPoint(positions=list(home + 0.002 * tick), time_from_start=Duration(nanosec=100_000_000))
        pubs[TRAJECTORY_TOPIC].publish(JointTrajectory(joint_names=list(JOINT_NAMES), points=[point]))
        spin_until(node, lambda: False, 1 / 30)
    return {t: ticks for t in pubs}


def test_recorder_killed_mid_episode_is_recovered_and_trained_from(node_process, ros_node, tmp_path: Path) -> None:
    data = tmp_path / "data"
    recorder = node_process("so101_teleop.recorder_node", params={
        "dataset_dir": str(data), "min_free_mb": 1.0, "disk_check_period_s": 0.2,
        "topics": [*CAMERAS, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC]})
    client = ros_node.create_client(StartEpisode, START_EPISODE_SERVICE)
    # An empty instruction is refused and changes nothing: its answer proves the replies reach this client.
    assert wait_until_answering(ros_node, client, StartEpisode.Request(instruction=" "), 20.0), recorder.output()
    future = client.call_async(StartEpisode.Request(instruction="put the cube in the bowl"))
    assert spin_until(ros_node, future.done, 10.0) and future.result().success, recorder.output()
    episode = Path(future.result().episode_path)

    published = publish_episode(ros_node, ticks=60)
    total = sum(published.values())
    mcap = episode / f"{episode.name}.mcap"
    # The recorder flushes on its disk-check timer: wait until all of it is in the file, then kill it.
    assert spin_until(ros_node, lambda: messages_on_disk(mcap) >= total, 20.0), recorder.output()
    recorder.proc.send_signal(signal.SIGKILL)
    assert recorder.proc.wait(10) == -signal.SIGKILL

    assert sorted(p.name for p in episode.iterdir()) == sorted([mcap.name, "episode.json"]), "no metadata.yaml"
    assert read_episode_metadata(episode).status == "recording"
    with pytest.raises(DatasetError, match=f"{episode.name}: .*unfinished episode.*so101-recover-episode"):
        load_episodes([data], SyncConfig(image_size=8), tmp_path / "cache")

    result = subprocess.run([shutil.which("so101-recover-episode"), str(episode)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"recovered {total} messages" in result.stdout

    with Reader(episode) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts == published, "every message the recorder received is in the recovered bag"
    meta = read_episode_metadata(episode)
    assert meta.status == "recovered" and meta.instruction == "put the cube in the bowl"
    episodes, report = load_episodes([data], SyncConfig(image_size=8), tmp_path / "cache")
    assert [e.name for e in episodes] == [episode.name] and not report.skipped
    assert episodes[0].instruction == "put the cube in the bowl" and episodes[0].sample_steps.size > 30
    assert load_episode(episode, SyncConfig(image_size=8), tmp_path / "cache").report.from_cache
