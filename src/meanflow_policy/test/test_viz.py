"""so101-viz and the Rerun mapping: a bag becomes an .rrd whose entities hold exactly the bag's messages, at the
bag's times (read back with rerun's own reader); overlapping chunks stay on separate lines; bad input is one
error line and exit code 2; the live mapping takes real messages and names the ones it cannot show."""
from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Duration
from rclpy.serialization import serialize_message
from rerun.chunk import RrdReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore, get_types_from_msg
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from meanflow_policy.data.demo_bags import DemoContent, joint_state, joint_trajectory, write_bag
from meanflow_policy.tools.viz import main as viz_main
from meanflow_policy.viz.rerun_log import PlanLines, StackLog, open_stream
from so101_common.graph import (JOINT_NAMES, JOINT_STATES_TOPIC, POLICY_TIMING_TOPIC, TRAJECTORY_TOPIC,
                                camera_image_topic)
from so101_common.images import rgb_to_image
from so101_common.stamps import NS_PER_S
from so101_interfaces.msg import ChunkTiming

T0 = 5 * NS_PER_S
CHUNK_POINTS = 5
CHUNK_DT_S = 0.1


def _content() -> DemoContent:
    """3 frames per camera, 12 joint states, and 3 five-point chunks 0.2 s apart: the second starts while the
    first still runs (0.1..0.5 s after it), the third after the first has ended."""
    content = DemoContent()
    for c, cam in enumerate(("wrist", "top")):
        content.images[cam] = [(T0 + k * NS_PER_S // 10 + c, np.full((6, 8, 3), 40 * k + c, np.uint8))
                               for k in range(3)]
    content.states = [(T0 + k * NS_PER_S // 20, JOINT_NAMES, np.full(6, 0.01 * k)) for k in range(12)]
    for k, start in enumerate((0.0, 0.2, 0.6)):
        points = [((i + 1) * CHUNK_DT_S, np.full(6, k + 0.1 * i)) for i in range(CHUNK_POINTS)]
        content.trajectories.append((T0 + int(start * NS_PER_S), 0, JOINT_NAMES, points))
    return content


def _rows(path: Path) -> tuple[Counter, dict[str, list[int]], dict[str, str]]:
    """Per (entity, component): rows logged on the timeline; the timeline values per entity; static texts."""
    rows: Counter = Counter()
    times: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    for chunk in RrdReader(path).stream():
        batch = chunk.to_record_batch()
        for name in batch.schema.names:
            if chunk.is_static and name == "TextDocument:text":
                texts[chunk.entity_path] = batch.column(name)[0].as_py()[0]
            elif not chunk.is_static and ":" in name:
                rows[(chunk.entity_path, name)] += batch.num_rows - batch.column(name).null_count
        if not chunk.is_static and "Scalars:scalars" in batch.schema.names:
            times.setdefault(chunk.entity_path, []).extend(
                t.value for t, v in zip(batch.column("time"), batch.column("Scalars:scalars")) if v.is_valid)
    return rows, times, texts


def _timing_typestore():
    """The Kilted typestore plus so101_interfaces/msg/ChunkTiming (as ros2 bag record would store it)."""
    from ament_index_python.packages import get_package_share_directory

    store = get_typestore(Stores.ROS2_KILTED)
    text = (Path(get_package_share_directory("so101_interfaces")) / "msg" / "ChunkTiming.msg").read_text()
    store.register(get_types_from_msg(text, "so101_interfaces/msg/ChunkTiming"))
    return store


def _timing(total_ms: float) -> ChunkTiming:
    return ChunkTiming(obs_age_ms=3.0, prefix_ms=total_ms / 2, expert_ms=total_ms / 4, total_ms=total_ms, nfe=1)


def _plain_bag_with_timing(path: Path, content: DemoContent, timings: list[tuple[int, float]]) -> Path:
    """A rosbag2 without episode.json (as ``ros2 bag record`` writes) that also recorded the policy's timing."""
    store = _timing_typestore()
    messages = [(t, camera_image_topic(cam), "sensor_msgs/msg/Image", rgb_to_image(rgb, t, cam))
                for cam, frames in content.images.items() for t, rgb in frames]
    messages += [(t, JOINT_STATES_TOPIC, "sensor_msgs/msg/JointState", joint_state(t, n, p))
                 for t, n, p in content.states]
    messages += [(t, TRAJECTORY_TOPIC, "trajectory_msgs/msg/JointTrajectory", joint_trajectory(s, n, pts))
                 for t, s, n, pts in content.trajectories]
    messages += [(t, POLICY_TIMING_TOPIC, "so101_interfaces/msg/ChunkTiming", _timing(ms)) for t, ms in timings]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as bag:
        conns = {topic: bag.add_connection(topic, msgtype, typestore=store)
                 for topic, msgtype in dict.fromkeys((m[1], m[2]) for m in messages)}
        for t, topic, _, msg in sorted(messages, key=lambda m: m[0]):
            bag.write(conns[topic], t, serialize_message(msg))
    return path


def test_episode_bag_becomes_a_recording_with_every_message_at_its_bag_time(tmp_path, capsys) -> None:
    content = _content()
    bag = write_bag(tmp_path / "episode_0000", content, instruction="put the red cube in the box")
    out = tmp_path / "view" / "ep.rrd"
    assert viz_main([str(bag), "--save", str(out)]) == 0
    assert "images (3 wrist, 3 top), 12 joint states, 3 chunks, 0 timing reports" in capsys.readouterr().out
    rows, times, texts = _rows(out)
    assert texts == {"/instruction": "put the red cube in the box"}
    for cam in ("wrist", "top"):
        assert rows[(f"/cameras/{cam}", "EncodedImage:blob")] == 3  # JPEG by default
    for joint in JOINT_NAMES:
        assert rows[(f"/joints/{joint}/state", "Scalars:scalars")] == 12
        assert sorted(times[f"/joints/{joint}/state"]) == [t for t, _, _ in content.states]
        # Chunks 1 and 2 overlap, so chunk 2 has a line of its own; chunk 3 starts after chunk 1 ended: line 0.
        assert rows[(f"/joints/{joint}/plan/0", "Scalars:scalars")] == 2 * CHUNK_POINTS
        assert rows[(f"/joints/{joint}/plan/1", "Scalars:scalars")] == CHUNK_POINTS
        assert rows[(f"/joints/{joint}/plan/0", "Clear:is_recursive")] == 2  # one Clear after each chunk
        assert rows[(f"/joints/{joint}/plan/1", "Clear:is_recursive")] == 1
        due = [t + int(round((i + 1) * CHUNK_DT_S * NS_PER_S)) for t, _, _, _ in content.trajectories
               for i in range(CHUNK_POINTS)]
        assert sorted(times[f"/joints/{joint}/plan/0"] + times[f"/joints/{joint}/plan/1"]) == sorted(due)
    assert not any(entity.startswith("/policy/timing") for entity, _ in rows)


def test_a_plain_bag_with_the_policy_timing_topic_shows_chunk_latency(tmp_path, capsys) -> None:
    content = _content()
    timings = [(t + 1000, 8.0 + k) for k, (t, _, _, _) in enumerate(content.trajectories)]
    bag = _plain_bag_with_timing(tmp_path / "recorded", content, timings)
    out = tmp_path / "recorded.rrd"
    assert viz_main([str(bag), "--save", str(out), "--jpeg-quality", "0"]) == 0
    assert "3 chunks, 3 timing reports" in capsys.readouterr().out
    rows, times, texts = _rows(out)
    assert texts == {}  # no episode.json: no instruction
    assert rows[("/cameras/top", "Image:buffer")] == 3  # raw pixels with --jpeg-quality 0
    for name in ("total_ms", "prefix_ms", "expert_ms", "obs_age_ms"):
        assert rows[(f"/policy/timing/{name}", "Scalars:scalars")] == 3
        assert sorted(times[f"/policy/timing/{name}"]) == [t for t, _ in timings]


def test_a_failed_episode_is_shown_too(tmp_path) -> None:
    bag = write_bag(tmp_path / "failed", _content(), instruction="stack the blocks")
    meta = json.loads((bag / "episode.json").read_text())
    (bag / "episode.json").write_text(json.dumps({**meta, "status": "failed", "success": False}))
    assert viz_main([str(bag), "--save", str(tmp_path / "failed.rrd")]) == 0
    assert _rows(tmp_path / "failed.rrd")[2] == {"/instruction": "stack the blocks"}


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    dataset = tmp_path / "dataset"
    write_bag(dataset / "episode_0000", _content())
    no_top = write_bag(tmp_path / "no_top", _content(), topics=[camera_image_topic("wrist"), JOINT_STATES_TOPIC])
    text = tmp_path / "notes.txt"
    text.write_text("not a bag")
    return {
        "missing": (tmp_path / "nowhere", "nowhere: no such file or directory"),
        "file": (text, "notes.txt: not a rosbag2 directory"),
        "dataset": (dataset, "dataset: a dataset folder of 1 episode bags; pass one of them"),
        "no camera": (no_top, "topic '/camera/top/image_raw' (camera 'top') is missing"),
    }


@pytest.mark.parametrize("case", ["missing", "file", "dataset", "no camera"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case) -> None:
    path, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.rrd"
    assert viz_main([str(path), "--save", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("so101-viz: ") and message in err[0], err
    assert not out.exists()


def test_no_display_no_file_no_viewer_is_refused(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    bag = write_bag(tmp_path / "ep", _content())
    assert viz_main([str(bag)]) == 2
    assert "no display to open a viewer on" in capsys.readouterr().err
    assert viz_main([str(bag), "--save", str(tmp_path / "x.rrd"), "--jpeg-quality", "101"]) == 2


def test_an_unreachable_viewer_is_one_error_line_after_the_timeout(tmp_path, capsys) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bag = write_bag(tmp_path / "ep", _content())
    assert viz_main([str(bag), "--connect", f"rerun+http://127.0.0.1:{port}/proxy"]) == 2
    assert "so101-viz: the viewer did not get the recording:" in capsys.readouterr().err


def test_plan_lines_reuse_a_line_only_after_its_chunk_ended() -> None:
    lines = PlanLines()
    assert [lines.take(s, e) for s, e in [(0, 10), (5, 15), (11, 20), (12, 30), (16, 25), (21, 22)]] == [
        0, 1, 0, 2, 1, 0]


def _trajectory(points: list[tuple[float, list[float]]], names=JOINT_NAMES) -> JointTrajectory:
    msg = JointTrajectory(joint_names=list(names))
    for t, pos in points:
        sec, nanosec = divmod(int(round(t * NS_PER_S)), NS_PER_S)
        msg.points.append(JointTrajectoryPoint(positions=pos, time_from_start=Duration(sec=sec, nanosec=nanosec)))
    return msg


def test_live_mapping_takes_real_messages_and_names_what_it_cannot_show(tmp_path) -> None:
    """What viz_node hands over: joints by name in any order, images, chunks; bad ones raise ValueError."""
    out = tmp_path / "live.rrd"
    log = StackLog(open_stream("test", save=out), jpeg_quality=0)
    reordered = JointState(name=list(reversed(JOINT_NAMES)), position=[float(i) for i in range(6)])
    log.on_joint_state(T0, reordered)
    log.on_image("wrist", T0, rgb_to_image(np.zeros((4, 6, 3), np.uint8)))
    log.on_trajectory(T0, _trajectory([(0.1, [0.0] * 6), (0.2, [1.0] * 6)]))
    log.on_timing(T0, _timing(9.0))
    bad_image = rgb_to_image(np.zeros((4, 6, 3), np.uint8))
    bad_image.encoding = "yuv422"
    with pytest.raises(ValueError, match="unsupported image encoding"):
        log.on_image("top", T0, bad_image)
    with pytest.raises(ValueError, match=r"lacks joints \['gripper'\]"):
        log.on_joint_state(T0, JointState(name=list(JOINT_NAMES[:5]), position=[0.0] * 5))
    with pytest.raises(ValueError, match="no points"):
        log.on_trajectory(T0, JointTrajectory(joint_names=list(JOINT_NAMES)))
    with pytest.raises(ValueError, match="names 6 joints but its points have 2 positions"):
        log.on_trajectory(T0, _trajectory([(0.1, [0.0, 1.0])]))
    assert log.close() == ""
    rows, _, _ = _rows(out)
    assert rows[("/joints/gripper/state", "Scalars:scalars")] == 1 and rows[("/cameras/wrist", "Image:buffer")] == 1
    assert rows[("/joints/gripper/plan/0", "Scalars:scalars")] == 2
    assert rows[("/policy/timing/total_ms", "Scalars:scalars")] == 1
    assert ("/cameras/top", "Image:buffer") not in rows
    assert log.counts.joint_states == 1 and log.counts.chunks == 1 and log.counts.timings == 1
