"""Episode recorder node: raw CDR from the configured topics into one rosbag2 (mcap) directory per episode.

Services (so101_common.graph): start_episode (so101_interfaces/srv/StartEpisode), stop_episode and
discard_episode (std_srvs/Trigger). Subscriptions use ``raw=True``: the serialized bytes go straight into the
bag, stamped with the receive time, as ``ros2 bag record`` does. SIGINT/SIGTERM during an episode finalise
the bag (readable) and mark the episode failed ("interrupted").
"""
from __future__ import annotations

import importlib
import sys

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from so101_common.graph import (
    DISCARD_EPISODE_SERVICE,
    RECORDED_TOPICS,
    RECORDER_NODE,
    START_EPISODE_SERVICE,
    STOP_EPISODE_SERVICE,
)
from so101_common.spin import spin_node
from std_srvs.srv import Trigger

from so101_interfaces.srv import StartEpisode
from so101_teleop.episode_client import log_outcome
from so101_teleop.recorder import KNOWN_TOPIC_TYPES, EpisodeRecorder


def message_class(type_name: str) -> type:
    """'sensor_msgs/msg/Image' -> the generated Python class."""
    parts = type_name.split("/")
    if len(parts) != 3 or parts[1] != "msg":
        raise ValueError(f"not a message type name: {type_name!r} (expected 'pkg/msg/Type')")
    return getattr(importlib.import_module(f"{parts[0]}.msg"), parts[2])


class RecorderNode(Node):
    def __init__(self) -> None:
        super().__init__(RECORDER_NODE)

        def declare(name: str, default, description: str):
            return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

        dataset_dir = declare("dataset_dir", "~/so101_data/demos", "dataset folder: one episode directory each")
        topics = declare("topics", list(RECORDED_TOPICS), "topics recorded into every episode")
        robot = declare("robot", "so101", "robot name stored in the episode metadata")
        min_free_mb = declare("min_free_mb", 500.0, "below this much free disk an episode fails / cannot start")
        depth = declare("queue_depth", 100, "subscription queue depth (reliable QoS) per topic")
        disk_period = declare("disk_check_period_s", 1.0, "how often free disk space is checked and the episode "
                              "flushed to its file while recording (the most a kill -9 loses)")
        self.recorder = EpisodeRecorder(dataset_dir, robot=str(robot), min_free_bytes=int(min_free_mb * 2**20))
        self._qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                               reliability=ReliabilityPolicy.RELIABLE)
        self._pending = list(topics)
        self._topic_subs: dict[str, object] = {}
        self.write_failures = 0
        self._subscribe_known()
        if self._pending:
            self._discovery_timer = self.create_timer(0.5, self._discover_types)
        self.create_timer(float(disk_period), self._check_disk)
        self.create_service(StartEpisode, START_EPISODE_SERVICE, self._on_start)
        self.create_service(Trigger, STOP_EPISODE_SERVICE, self._on_stop)
        self.create_service(Trigger, DISCARD_EPISODE_SERVICE, self._on_discard)
        self.get_logger().info(f"episode recorder ready: {self.recorder.dataset_dir}, topics {list(topics)}")

    def _subscribe(self, topic: str, type_name: str) -> None:
        try:
            cls = message_class(type_name)
        except (ValueError, ImportError, AttributeError) as exc:
            self.get_logger().error(f"cannot record {topic}: type {type_name} is not importable ({exc})")
            return
        self.recorder.add_topic(topic, type_name)
        self._topic_subs[topic] = self.create_subscription(
            cls, topic, lambda data, topic=topic: self._on_message(topic, data), self._qos, raw=True)
        self.get_logger().info(f"recording {topic} [{type_name}]")

    def _subscribe_known(self) -> None:
        for topic in list(self._pending):
            if topic in KNOWN_TOPIC_TYPES:
                self._pending.remove(topic)
                self._subscribe(topic, KNOWN_TOPIC_TYPES[topic])

    def _discover_types(self) -> None:
        """Topics of unknown type are subscribed once a publisher announces their type."""
        announced = dict(self.get_topic_names_and_types())
        for topic in list(self._pending):
            types = announced.get(topic)
            if types:
                self._pending.remove(topic)
                self._subscribe(topic, types[0])
        if not self._pending:
            self._discovery_timer.cancel()

    def _on_message(self, topic: str, data: bytes) -> None:
        if not self.recorder.recording:
            return
        if not self.recorder.write(topic, self.get_clock().now().nanoseconds, data):
            if not self.recorder.recording:
                self.write_failures += 1
                self.get_logger().error(f"episode failed: {self.recorder.last_failure}")

    def _check_disk(self) -> None:
        problem = self.recorder.check_disk()
        if problem:
            self.get_logger().error(f"episode failed: {self.recorder.last_failure}")

    def _on_start(self, request: StartEpisode.Request, response: StartEpisode.Response) -> StartEpisode.Response:
        result = self.recorder.start(request.instruction)
        response.success, response.message, response.episode_path = result.ok, result.message, result.path
        log_outcome(self.get_logger(), result.ok, f"start_episode: {result.message}")
        return response

    def _on_stop(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        result = self.recorder.stop(success=True)
        response.success, response.message = result.ok, result.message
        log_outcome(self.get_logger(), result.ok, f"stop_episode: {result.message}")
        return response

    def _on_discard(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        result = self.recorder.discard()
        response.success, response.message = result.ok, result.message
        log_outcome(self.get_logger(), result.ok, f"discard_episode: {result.message}")
        return response


SHUTDOWN_DRAIN_S = 2.0


def _finalise(node: "RecorderNode") -> str:
    """Finalise an episode in progress (spin_node keeps further signals from cutting this short)."""
    result = node.recorder.shutdown("interrupted: the recorder was shut down during the episode")
    return "no episode in progress" if result is None else f"{result.message}: {result.path}"


def main(args: list[str] | None = None) -> None:
    # Messages already delivered when Ctrl-C comes belong to the episode: handle them (at most this long) first.
    sys.exit(spin_node(RecorderNode, "episode_recorder", args, cleanup=_finalise, drain_s=SHUTDOWN_DRAIN_S))


if __name__ == "__main__":
    main()
