"""The episode recorder's services as a teleop node calls them (Joy-Con and leader arm share it): non-blocking
calls whose answers are logged, and one clear error when the recorder is not running."""
from __future__ import annotations

from rclpy.impl.rcutils_logger import RcutilsLogger
from rclpy.node import Node
from std_srvs.srv import Trigger

from so101_common.graph import DISCARD_EPISODE_SERVICE, START_EPISODE_SERVICE, STOP_EPISODE_SERVICE
from so101_interfaces.srv import StartEpisode


class EpisodeClient:
    """Start / stop / discard an episode from a node's controls."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.start_client = node.create_client(StartEpisode, START_EPISODE_SERVICE)
        self.stop_client = node.create_client(Trigger, STOP_EPISODE_SERVICE)
        self.discard_client = node.create_client(Trigger, DISCARD_EPISODE_SERVICE)

    def start(self, instruction: str) -> None:
        self._call(self.start_client, StartEpisode.Request(instruction=instruction), "start_episode")

    def stop(self) -> None:
        self._call(self.stop_client, Trigger.Request(), "stop_episode")

    def discard(self) -> None:
        self._call(self.discard_client, Trigger.Request(), "discard_episode")

    def _call(self, client, request, name: str) -> None:
        logger = self.node.get_logger()
        if not client.service_is_ready():
            logger.error(f"{name}: the episode recorder is not running ({client.srv_name})")
            return

        def done(fut) -> None:
            result = fut.result()
            log_outcome(logger, result.success, f"{name}: {result.message}")

        client.call_async(request).add_done_callback(done)


def log_outcome(logger: RcutilsLogger, ok: bool, message: str) -> None:
    """INFO when ``ok``, else WARN. Each severity has its own call line: rclpy raises ValueError ("Logger severity
    cannot be changed between calls") when one line logs at two severities, which killed the teleop node the first
    time a start_episode succeeded and the next one was refused."""
    if ok:
        logger.info(message)
    else:
        logger.warning(message)
