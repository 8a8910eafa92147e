"""The recorder node as its own process over DDS: full episodes, SIGINT/SIGTERM mid-episode, refusal, discard."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import Image, JointState, Joy
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from so101_common.episode_bag import INDEX_FILE, read_episode_metadata
from so101_common.graph import (DISCARD_EPISODE_SERVICE, JOINT_NAMES, JOINT_STATES_TOPIC, JOY_TOPIC,
                                START_EPISODE_SERVICE, STOP_EPISODE_SERVICE, TRAJECTORY_TOPIC, camera_image_topic)
from so101_common.images import image_to_rgb, rgb_to_image
from so101_common.testing import spin_until, wait_until_answering
from so101_interfaces.srv import StartEpisode

CAMERAS = (camera_image_topic("wrist"), camera_image_topic("top"))

# Other processes on this DDS domain may publish the same topics; our messages carry this frame_id.
TOKEN = f"recorder_test_{os.getpid()}"
TYPES = {CAMERAS[0]: Image, CAMERAS[1]: Image, JOINT_STATES_TOPIC: JointState, TRAJECTORY_TOPIC: JointTrajectory,
         JOY_TOPIC: Joy}
QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)


class Publishers:
    """Publishes the five recorded topics from the test process and counts what it sent."""

    def __init__(self, node) -> None:
        self.node = node
        self.pubs = {t: node.create_publisher(Image, t, QOS) for t in CAMERAS}
        self.pubs[JOINT_STATES_TOPIC] = node.create_publisher(JointState, JOINT_STATES_TOPIC, QOS)
        self.pubs[TRAJECTORY_TOPIC] = node.create_publisher(JointTrajectory, TRAJECTORY_TOPIC, QOS)
        self.pubs[JOY_TOPIC] = node.create_publisher(Joy, JOY_TOPIC, QOS)
        self.counts = {t: 0 for t in self.pubs}
        rng = np.random.default_rng(1)
        self.frames = [rng.integers(0, 255, (480, 640, 3), np.uint8) for _ in range(4)]

    def wait_matched(self) -> None:
        assert spin_until(self.node, lambda: all(p.get_subscription_count() >= 1 for p in self.pubs.values()), 15.0)

    def run(self, seconds: float, camera_hz: float = 30.0) -> None:
        period = 1.0 / camera_hz
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < seconds:
            for k, topic in enumerate(CAMERAS):
                frame = self.frames[(tick + k) % len(self.frames)]
                self.pubs[topic].publish(rgb_to_image(frame, time.time_ns(), TOKEN))
                self.counts[topic] += 1
            js = JointState(name=list(JOINT_NAMES), position=[0.001 * tick] * 6)
            js.header.frame_id = TOKEN
            self.pubs[JOINT_STATES_TOPIC].publish(js)
            self.counts[JOINT_STATES_TOPIC] += 1
            traj = JointTrajectory(joint_names=list(JOINT_NAMES),
                                   points=[JointTrajectoryPoint(positions=[0.1] * 6)])
            traj.header.frame_id = TOKEN
            self.pubs[TRAJECTORY_TOPIC].publish(traj)
            self.counts[TRAJECTORY_TOPIC] += 1
            if tick % 2 == 0:
                joy = Joy(axes=[0.0, 0.5], buttons=[0] * 11)
                joy.header.frame_id = TOKEN
                self.pubs[JOY_TOPIC].publish(joy)
                self.counts[JOY_TOPIC] += 1
            tick += 1
            self.node.executor_for_test.spin_once(timeout_sec=0)
            time.sleep(max(0.0, start + tick * period - time.monotonic()))


def read_bag(path: Path) -> dict[str, list[bytes]]:
    """This test's messages in the bag, per topic, decoded with rclpy."""
    out: dict[str, list] = {}
    with Reader(path) as reader:
        for conn, _t, raw in reader.messages():
            msg = deserialize_message(raw, TYPES[conn.topic])
            if msg.header.frame_id == TOKEN:
                out.setdefault(conn.topic, []).append(msg)
    return out


# Services remapped to private names: another recorder may run on this DDS domain at the same time.
SERVICE_PREFIX = f"/recorder_test_{os.getpid()}"
START, STOP, DISCARD = (SERVICE_PREFIX + s for s in (START_EPISODE_SERVICE, STOP_EPISODE_SERVICE,
                                                     DISCARD_EPISODE_SERVICE))


class Services:
    """The recorder's services, one client each from the test's node. Each is first shown to answer a request it
    refuses while idle (an empty instruction, stop / discard with no episode): Fast DDS drops the reply to a client
    it has not matched yet (so101_common.testing.wait_until_answering), which once lost a fast refusal."""

    TYPES = {START: StartEpisode, STOP: Trigger, DISCARD: Trigger}
    HARMLESS = {START: StartEpisode.Request(instruction=" "), STOP: Trigger.Request(), DISCARD: Trigger.Request()}

    def __init__(self, node, names: tuple[str, ...] = (START, STOP, DISCARD), timeout: float = 30.0) -> None:
        self.node = node
        self.clients = {name: node.create_client(self.TYPES[name], name) for name in names}
        for name, client in self.clients.items():
            assert wait_until_answering(node, client, self.HARMLESS[name], timeout), f"{name} never answered"

    def call(self, name: str, request, timeout: float = 30.0):
        future = self.clients[name].call_async(request)
        assert spin_until(self.node, future.done, timeout), f"no answer from {name}"
        return future.result()


def start_recorder(node_process, tmp_path: Path):
    remaps = ["--ros-args"] + [a for s in (START_EPISODE_SERVICE, STOP_EPISODE_SERVICE, DISCARD_EPISODE_SERVICE)
                               for a in ("-r", f"{s}:={SERVICE_PREFIX}{s}")]
    return node_process("so101_teleop.recorder_node", params={"dataset_dir": str(tmp_path / "data"),
                                                               "min_free_mb": 1.0}, extra_args=remaps)


def test_full_episode_two_cameras_640x480_30hz(node_process, ros_node, tmp_path: Path) -> None:
    recorder = start_recorder(node_process, tmp_path)
    services = Services(ros_node)
    pubs = Publishers(ros_node)
    pubs.wait_matched()
    pubs.run(0.5)  # not recording yet: none of this may end up in the bag
    pubs.counts = {t: 0 for t in pubs.counts}
    spin_until(ros_node, lambda: False, 0.5)
    started = services.call(START, StartEpisode.Request(instruction="put the cube in"
                                                                                                   " the bowl"))
    assert started.success, started.message
    pubs.run(3.0)
    # What is still queued when stop_episode arrives is not recorded: 2 s let a recorder that a loaded machine
    # stalled (make test beside a training job) catch up; after 1 s, 3-4 of 90 messages per topic were missing once.
    spin_until(ros_node, lambda: False, 2.0)
    stopped = services.call(STOP, Trigger.Request())
    assert stopped.success, stopped.message
    path = Path(started.episode_path)
    bag = read_bag(path)
    assert pubs.counts[CAMERAS[0]] >= 80
    assert {t: len(bag.get(t, [])) for t in pubs.counts} == pubs.counts, recorder.output()[-2000:]
    for topic in CAMERAS:
        images = bag[topic]
        assert all((m.width, m.height, m.encoding) == (640, 480, "rgb8") for m in images)
        k = CAMERAS.index(topic)
        assert np.array_equal(image_to_rgb(images[5]), pubs.frames[(5 + k) % 4])
    js = bag[JOINT_STATES_TOPIC]
    assert list(js[0].name) == list(JOINT_NAMES)
    positions = [m.position[0] for m in js]
    assert positions == sorted(positions), "messages are in publication order"
    assert bag[TRAJECTORY_TOPIC][0].points[0].positions[0] == 0.1
    assert list(bag[JOY_TOPIC][0].axes) == [0.0, 0.5]
    meta = read_episode_metadata(path)
    assert meta.instruction == "put the cube in the bowl" and meta.robot == "so101"
    assert meta.success is True and meta.status == "complete" and meta.software_version
    assert 2.5 < (meta.stop_time_ns - meta.start_time_ns) / 1e9 < 10.0
    index = json.loads((path.parent / INDEX_FILE).read_text())
    assert [e["name"] for e in index["episodes"]] == [path.name]
    assert recorder.alive()


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGINT),
                                     (signal.SIGINT, signal.SIGINT, signal.SIGTERM), ()],
                         ids=["SIGINT", "SIGTERM", "SIGINT-SIGINT", "SIGINT-SIGINT-SIGTERM", "SIGINT-storm"])
def test_signal_mid_episode_leaves_a_readable_bag(node_process, ros_node, tmp_path: Path,
                                                  signals: tuple[int, ...]) -> None:
    """Also as ``ros2 launch`` does on Ctrl-C: the terminal's SIGINT, launch's own, then SIGTERM."""
    recorder = start_recorder(node_process, tmp_path)
    services = Services(ros_node)
    pubs = Publishers(ros_node)
    pubs.wait_matched()
    started = services.call(START, StartEpisode.Request(instruction="open drawer"))
    assert started.success
    pubs.run(1.0)
    # Time for the recorder to take in what was sent (30 MB of images): on a loaded 2-core machine it lags.
    spin_until(ros_node, lambda: False, 2.0)
    if signals:
        recorder.send(*signals, gap_s=0.02)
    else:  # SIGINT every 5 ms until it exits: some land inside the finalisation
        assert recorder.send_until_exit(signal.SIGINT, 0.005) > 1
    assert recorder.wait(15) == 0, recorder.output()
    path = Path(started.episode_path)
    assert (path / "metadata.yaml").is_file()
    bag = read_bag(path)
    assert {t: len(bag.get(t, [])) for t in pubs.counts} == pubs.counts
    meta = read_episode_metadata(path)
    assert meta.status == "failed" and meta.failure.startswith("interrupted")
    out = recorder.output()
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "shutting down" in line]
    assert len(lines) == 1 and "finalised" in lines[0], out


def test_second_start_refused_and_discard(node_process, ros_node, tmp_path: Path) -> None:
    start_recorder(node_process, tmp_path)
    services = Services(ros_node)
    first = services.call(START, StartEpisode.Request(instruction="wipe"))
    assert first.success and Path(first.episode_path).is_dir()
    second = services.call(START, StartEpisode.Request(instruction="wipe 2"))
    assert not second.success and "already recording" in second.message
    discarded = services.call(DISCARD, Trigger.Request())
    assert discarded.success and not Path(first.episode_path).exists()
    again = services.call(STOP, Trigger.Request())
    assert not again.success and "not recording" in again.message
    empty = services.call(START, StartEpisode.Request(instruction=" "))
    assert not empty.success and "instruction is empty" in empty.message
    index = json.loads((tmp_path / "data" / INDEX_FILE).read_text())
    assert index["episodes"] == []


def test_full_disk_refuses_start_and_node_stays_up(node_process, ros_node, tmp_path: Path) -> None:
    remaps = ["--ros-args", "-r", f"{START_EPISODE_SERVICE}:={START}"]
    recorder = node_process("so101_teleop.recorder_node", extra_args=remaps, params={
        "dataset_dir": str(tmp_path / "data"), "min_free_mb": 1e12})  # more than any disk has free
    services = Services(ros_node, (START,))
    refused = services.call(START, StartEpisode.Request(instruction="wipe"))
    assert not refused.success and "MiB free" in refused.message and "needs at least" in refused.message
    assert recorder.alive()


def test_topic_of_unknown_type_takes_the_publishers_type(node_process, ros_node, tmp_path: Path) -> None:
    topic = f"{SERVICE_PREFIX}/notes"
    remaps = ["--ros-args"] + [a for s in (START_EPISODE_SERVICE, STOP_EPISODE_SERVICE)
                               for a in ("-r", f"{s}:={SERVICE_PREFIX}{s}")]
    node_process("so101_teleop.recorder_node", extra_args=remaps, params={
        "dataset_dir": str(tmp_path / "data"), "min_free_mb": 1.0, "topics": [topic]})
    services = Services(ros_node, (START, STOP))
    pub = ros_node.create_publisher(String, topic, QOS)
    assert spin_until(ros_node, lambda: pub.get_subscription_count() > 0, 15.0), "recorder never subscribed"
    started = services.call(START, StartEpisode.Request(instruction="take notes"))
    for i in range(10):
        pub.publish(String(data=f"note {i}"))
    spin_until(ros_node, lambda: False, 0.5)
    assert services.call(STOP, Trigger.Request()).success
    with Reader(started.episode_path) as reader:
        assert [c.msgtype for c in reader.connections] == ["std_msgs/msg/String"]
        notes = [deserialize_message(raw, String).data for _c, _t, raw in reader.messages()]
    assert notes == [f"note {i}" for i in range(10)]
