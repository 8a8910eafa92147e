"""The recorder core alone: episodes, metadata, index, refusals, discard, failures (disk full, write error)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import Image, JointState

from so101_common.episode_bag import INDEX_FILE, read_episode_metadata
from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, RECORDED_TOPICS, camera_image_topic
from so101_common.images import image_to_rgb, rgb_to_image
from so101_teleop.recorder import KNOWN_TOPIC_TYPES, EpisodeRecorder

WRIST = camera_image_topic("wrist")


def make_recorder(root: Path, **kw) -> EpisodeRecorder:
    rec = EpisodeRecorder(root, **kw)
    for topic in RECORDED_TOPICS:
        rec.add_topic(topic, KNOWN_TOPIC_TYPES[topic])
    return rec


def joint_state(i: int) -> bytes:
    msg = JointState()
    msg.name = list(JOINT_NAMES)
    msg.position = [0.01 * i] * 6
    return serialize_message(msg)


def read_bag(path: Path) -> dict[str, list[tuple[int, bytes]]]:
    out: dict[str, list[tuple[int, bytes]]] = {}
    with Reader(path) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, raw))
    return out


def test_every_recorded_topic_has_a_known_type() -> None:
    assert set(RECORDED_TOPICS) <= set(KNOWN_TOPIC_TYPES)


def test_full_episode_bag_metadata_and_index(tmp_path: Path) -> None:
    rec = make_recorder(tmp_path)
    assert not rec.write(JOINT_STATES_TOPIC, 1, joint_state(0)), "idle: dropped"
    result = rec.start("  pick up the red cube ")
    assert result.ok and rec.recording
    path = Path(result.path)
    frames = [np.full((48, 64, 3), i, np.uint8) for i in range(5)]
    for i, frame in enumerate(frames):
        assert rec.write(WRIST, 1_000 + i, serialize_message(rgb_to_image(frame, 1_000 + i)))
    for i in range(7):
        assert rec.write(JOINT_STATES_TOPIC, 2_000 + i, joint_state(i))
    second = rec.start("another")
    assert not second.ok and "already recording" in second.message
    stopped = rec.stop()
    assert stopped.ok and "12 messages" in stopped.message and not rec.recording
    bag = read_bag(path)
    assert len(bag[WRIST]) == 5 and len(bag[JOINT_STATES_TOPIC]) == 7
    images = [image_to_rgb(deserialize_message(raw, Image)) for _, raw in bag[WRIST]]
    assert all(np.array_equal(a, b) for a, b in zip(images, frames))
    assert deserialize_message(bag[JOINT_STATES_TOPIC][3][1], JointState).position[0] == pytest.approx(0.03)
    meta = read_episode_metadata(path)
    assert meta.instruction == "pick up the red cube" and meta.robot == "so101" and meta.success is True
    assert meta.status == "complete" and meta.stop_time_ns > meta.start_time_ns
    assert meta.message_counts[WRIST] == 5 and meta.message_counts[JOINT_STATES_TOPIC] == 7
    assert meta.message_counts[camera_image_topic("top")] == 0
    assert meta.software_version
    bag_metadata = yaml.safe_load((path / "metadata.yaml").read_text())  # also travels inside the bag
    assert "pick up the red cube" in bag_metadata["rosbag2_bagfile_information"]["custom_data"]["so101.episode"]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert [e["name"] for e in index["episodes"]] == [path.name]
    assert index["episodes"][0]["messages"] == 12
    assert rec.dropped_idle == 1


def test_refusals_and_discard(tmp_path: Path) -> None:
    rec = make_recorder(tmp_path)
    assert "instruction is empty" in rec.start("   ").message
    assert "nothing to stop" in rec.stop().message
    assert "nothing to discard" in rec.discard().message
    first = rec.start("stack blocks")
    rec.write(JOINT_STATES_TOPIC, 5, joint_state(1))
    assert rec.discard().ok and not Path(first.path).exists()
    kept = rec.start("stack blocks again")
    assert rec.stop().ok and read_episode_metadata(kept.path).instruction == "stack blocks again"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert [e["name"] for e in index["episodes"]] == [Path(kept.path).name]


def test_disk_full_refuses_start_and_fails_running_episode(tmp_path: Path) -> None:
    free = {"bytes": 10 * 2**30}
    rec = make_recorder(tmp_path, min_free_bytes=100 * 2**20, free_bytes=lambda p: free["bytes"])
    result = rec.start("wipe the table")
    rec.write(JOINT_STATES_TOPIC, 5, joint_state(1))
    assert rec.check_disk() == ""
    free["bytes"] = 50 * 2**20
    assert "only 50 MiB free" in rec.check_disk()
    assert not rec.recording
    meta = read_episode_metadata(result.path)
    assert meta.status == "failed" and "disk nearly full" in meta.failure and meta.success is False
    assert len(read_bag(Path(result.path))[JOINT_STATES_TOPIC]) == 1, "what was written stays readable"
    refused = rec.start("wipe the table")
    assert not refused.ok and "only 50 MiB free" in refused.message
    assert json.loads((tmp_path / INDEX_FILE).read_text())["episodes"][0]["status"] == "failed"


def test_shutdown_finalises_a_readable_failed_episode(tmp_path: Path) -> None:
    rec = make_recorder(tmp_path)
    result = rec.start("fold the towel")
    for i in range(3):
        rec.write(JOINT_STATES_TOPIC, 10 + i, joint_state(i))
    assert rec.shutdown("interrupted").ok
    assert rec.shutdown("again") is None
    assert len(read_bag(Path(result.path))[JOINT_STATES_TOPIC]) == 3
    assert read_episode_metadata(result.path).failure == "interrupted"


def test_real_write_error_fails_episode_and_recorder_goes_on(tmp_path: Path) -> None:
    """A file-size limit (RLIMIT_FSIZE) makes the kernel refuse writes (EFBIG), like a full disk would."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        import numpy as np
        from rclpy.serialization import serialize_message
        from so101_common.graph import RECORDED_TOPICS, camera_image_topic
        from so101_common.images import rgb_to_image
        from so101_teleop.recorder import KNOWN_TOPIC_TYPES, EpisodeRecorder
        rec = EpisodeRecorder({str(tmp_path)!r})
        for t in RECORDED_TOPICS:
            rec.add_topic(t, KNOWN_TOPIC_TYPES[t])
        first = rec.start("pour water")
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, resource.RLIM_INFINITY))
        frame = serialize_message(rgb_to_image(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)))
        written = 0
        while rec.write(camera_image_topic("wrist"), written, frame):
            written += 1
            if written > 100:
                break
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        second = rec.start("pour water again")
        rec.write(camera_image_topic("wrist"), 1, frame)
        third = rec.stop()
        print(json.dumps(dict(written=written, recording=rec.recording, failure=rec.last_failure,
                              first=first.path, second=second.ok, third=third.ok)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < report["written"] < 100
    assert "write error" in report["failure"] and "File too large" in report["failure"]
    assert report["second"] and report["third"], "the recorder keeps working after a failed episode"
    meta = read_episode_metadata(report["first"])
    assert meta.status == "failed" and "write error" in meta.failure


def test_episode_is_on_disk_from_its_start_and_check_disk_flushes_it(tmp_path: Path) -> None:
    """What a kill -9 would leave: episode.json says 'recording', the index lists it, the messages are in the file."""
    from mcap.exceptions import EndOfFile
    from mcap.records import Message
    from mcap.stream_reader import StreamReader

    rec = make_recorder(tmp_path)
    path = Path(rec.start("sort the cubes").path)
    assert read_episode_metadata(path).status == "recording"
    assert json.loads((tmp_path / INDEX_FILE).read_text())["episodes"][0]["status"] == "recording"
    for i in range(3):
        rec.write(JOINT_STATES_TOPIC, 10 + i, joint_state(i))
    assert rec.check_disk() == ""
    messages = 0
    with open(path / f"{path.name}.mcap", "rb") as fh:
        with pytest.raises(EndOfFile):  # an unfinished file: no summary, no footer
            for record in StreamReader(fh).records:
                messages += isinstance(record, Message)
    assert messages == 3
    assert rec.stop().ok and read_episode_metadata(path).status == "complete"


def test_episode_cut_by_a_write_error_can_be_recovered(tmp_path: Path) -> None:
    """A full disk (here: the kernel refusing writes past RLIMIT_FSIZE) mid-episode: the bag cannot be finalised,
    episode.json says why, and so101-recover-episode makes what reached the file readable (still marked failed)."""
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        from rclpy.serialization import serialize_message
        from so101_common.graph import RECORDED_TOPICS, camera_image_topic
        from so101_common.images import rgb_to_image
        from so101_teleop.recorder import KNOWN_TOPIC_TYPES, EpisodeRecorder
        rec = EpisodeRecorder({str(tmp_path)!r})
        for t in RECORDED_TOPICS:
            rec.add_topic(t, KNOWN_TOPIC_TYPES[t])
        print(rec.start("pour water").path)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, resource.RLIM_INFINITY))
        frame = serialize_message(rgb_to_image(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)))
        written = 0
        while rec.write(camera_image_topic("wrist"), written, frame):
            written += 1
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert not (path / "metadata.yaml").exists(), "the bag could not be finalised"
    assert "write error" in read_episode_metadata(path).failure
    recovered = subprocess.run([shutil.which("so101-recover-episode"), str(path)], capture_output=True, text=True,
                               timeout=60)
    assert recovered.returncode == 0, recovered.stderr
    frames = read_bag(path)[WRIST]
    assert 2 <= len(frames) <= 4, "the images in complete chunks (4 MiB of 0.9 MiB frames)"
    assert [t for t, _ in frames] == list(range(len(frames)))
    meta = read_episode_metadata(path)
    assert meta.status == "failed" and "write error" in meta.failure and "so101-recover-episode" in meta.recovery
    assert meta.message_counts[WRIST] == len(frames), "counts of what the file holds, not of what was sent"
