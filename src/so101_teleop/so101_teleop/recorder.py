"""Episode recording without ROS: one rosbag2 (mcap) directory per episode through so101_common's EpisodeWriter.

The node hands in serialized CDR bytes as they arrive; this class decides whether they belong to an episode,
keeps the dataset's ``index.json`` current, and turns a write error or a nearly full disk into a *failed*
episode (its metadata says why) while staying ready for the next one. An episode is marked on disk from its start
(episode.json, status "recording"), and ``check_disk`` (the node's periodic timer) also flushes the buffered
messages to the file, so a recorder killed with SIGKILL loses at most one period of messages and leaves a folder
that ``so101-recover-episode`` turns back into a readable bag.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from so101_common.episode_bag import EpisodeMetadata, EpisodeWriter, update_index
from so101_common.graph import (JOINT_STATES_TOPIC, JOY_TOPIC, TRAJECTORY_TOPIC, camera_image_topic,
                                camera_info_topic)
from so101_common.instruction import validate_instruction

# Message types of the topics we know; other configured topics take the type their publishers announce.
KNOWN_TOPIC_TYPES: dict[str, str] = {
    camera_image_topic("wrist"): "sensor_msgs/msg/Image",
    camera_image_topic("top"): "sensor_msgs/msg/Image",
    camera_info_topic("wrist"): "sensor_msgs/msg/CameraInfo",
    camera_info_topic("top"): "sensor_msgs/msg/CameraInfo",
    JOINT_STATES_TOPIC: "sensor_msgs/msg/JointState",
    TRAJECTORY_TOPIC: "trajectory_msgs/msg/JointTrajectory",
    JOY_TOPIC: "sensor_msgs/msg/Joy",
}


@dataclass(frozen=True)
class Result:
    ok: bool
    message: str
    path: str = ""


class EpisodeRecorder:
    """Thread-safe: the node's subscription callbacks, services and timers may call it from any thread."""

    def __init__(self, dataset_dir: str | Path, robot: str = "so101", min_free_bytes: int = 500 * 2**20,
                 free_bytes: Callable[[Path], int] | None = None) -> None:
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.robot = robot
        self.min_free_bytes = int(min_free_bytes)
        self._free_bytes = free_bytes or (lambda p: shutil.disk_usage(p).free)
        self._topics: dict[str, str] = {}
        self._writer: EpisodeWriter | None = None
        self._lock = threading.RLock()
        self.dropped_idle = 0
        self.last_failure = ""

    @property
    def recording(self) -> bool:
        return self._writer is not None

    @property
    def episode_path(self) -> Path | None:
        writer = self._writer
        return writer.path if writer is not None else None

    @property
    def topics(self) -> dict[str, str]:
        return dict(self._topics)

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic to record (also into the running episode, if any)."""
        with self._lock:
            self._topics[topic] = msgtype
            if self._writer is not None:
                self._writer.add_topic(topic, msgtype)

    def _new_episode_dir(self) -> Path:
        stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
        base = self.dataset_dir / f"episode_{stamp}"
        path, n = base, 1
        while path.exists():
            path = base.with_name(f"{base.name}_{n}")
            n += 1
        return path

    def _disk_problem(self) -> str:
        free = self._free_bytes(self.dataset_dir)
        if free < self.min_free_bytes:
            return (f"only {free / 2**20:.0f} MiB free in {self.dataset_dir}; "
                    f"recording needs at least {self.min_free_bytes / 2**20:.0f} MiB")
        return ""

    def start(self, instruction: str, task: str = "") -> Result:
        ok, cleaned, message = validate_instruction(instruction)
        with self._lock:
            if self._writer is not None:
                return Result(False, f"already recording {self._writer.path.name}: stop or discard it first",
                              str(self._writer.path))
            if not ok:
                return Result(False, f"cannot start: {message}")
            try:
                self.dataset_dir.mkdir(parents=True, exist_ok=True)
                problem = self._disk_problem()
                if problem:
                    return Result(False, f"cannot start: {problem}")
                path = self._new_episode_dir()
                writer = EpisodeWriter(path, EpisodeMetadata(instruction=cleaned, robot=self.robot, task=task))
                for topic, msgtype in self._topics.items():
                    writer.add_topic(topic, msgtype)
            except OSError as exc:
                return Result(False, f"cannot start an episode in {self.dataset_dir}: {exc}")
            self._writer = writer
            self._refresh_index()
            return Result(True, f"recording {path.name}: {cleaned!r}", str(path))

    def write(self, topic: str, timestamp_ns: int, cdr: bytes) -> bool:
        """Add one message to the running episode; False when idle (dropped) or when the write failed."""
        with self._lock:
            writer = self._writer
            if writer is None:
                self.dropped_idle += 1
                return False
            try:
                writer.write(topic, timestamp_ns, cdr)
            except Exception as exc:  # noqa: BLE001 - any storage error fails the episode, never the node
                self._fail(f"write error on {topic}: {type(exc).__name__}: {exc}")
                return False
            return True

    def check_disk(self) -> str:
        """Fail the running episode when the disk is nearly full, else flush it to the file; the problem or ''."""
        with self._lock:
            if self._writer is None:
                return ""
            try:
                problem = self._disk_problem()
            except OSError as exc:
                problem = f"cannot check free space: {exc}"
            if problem:
                self._fail(f"disk nearly full: {problem}")
                return problem
            try:
                self._writer.flush()
            except Exception as exc:  # noqa: BLE001 - any storage error fails the episode, never the node
                problem = f"write error while flushing: {type(exc).__name__}: {exc}"
                self._fail(problem)
            return problem

    def _fail(self, reason: str) -> None:
        writer, self._writer = self._writer, None
        self.last_failure = f"{writer.path.name}: {reason}"
        try:
            writer.close(success=False, failure=reason)
        except Exception:  # noqa: BLE001 - the storage is broken; episode.json is still attempted by close()
            pass
        self._refresh_index()

    def _refresh_index(self) -> None:
        try:
            update_index(self.dataset_dir)
        except OSError:
            pass

    def stop(self, success: bool | None = True) -> Result:
        with self._lock:
            if self._writer is None:
                detail = f" (last failure: {self.last_failure})" if self.last_failure else ""
                return Result(False, f"not recording; nothing to stop{detail}")
            writer, self._writer = self._writer, None
            try:
                meta = writer.close(success=success)
            except Exception as exc:  # noqa: BLE001
                self.last_failure = f"{writer.path.name}: finalising failed: {exc}"
                self._refresh_index()
                return Result(False, f"episode {writer.path.name} could not be finalised: {exc}", str(writer.path))
            self._refresh_index()
            total = sum(meta.message_counts.values())
            duration = (meta.stop_time_ns - meta.start_time_ns) / 1e9
            return Result(True, f"saved {writer.path.name}: {total} messages, {duration:.1f} s", str(writer.path))

    def discard(self) -> Result:
        with self._lock:
            if self._writer is None:
                return Result(False, "not recording; nothing to discard")
            writer, self._writer = self._writer, None
            writer.discard()
            self._refresh_index()
            return Result(True, f"discarded {writer.path.name}", str(writer.path))

    def shutdown(self, reason: str) -> Result | None:
        """Finalise a running episode (readable bag) marked as failed with ``reason``; None when idle."""
        with self._lock:
            if self._writer is None:
                return None
            path = self._writer.path
            self._fail(reason)
            return Result(True, f"finalised {path.name} on shutdown", str(path))
