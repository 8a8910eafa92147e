"""The episode format: one rosbag2 directory (mcap) per demonstration, plus ``episode.json`` inside it.

The teleop recorder (live CDR from DDS) and the simulator's demo generator (messages serialised in-process)
both write through EpisodeWriter, so training reads exactly one format. ``index.json`` at the dataset root
lists every episode; it is rebuilt from the episodes' own files, so it can never disagree with them for long.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rosbags.interfaces import Connection
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

EPISODE_FILE = "episode.json"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
SOFTWARE_VERSION = "0.1.0"
_TYPESTORE = get_typestore(Stores.ROS2_KILTED)


class EpisodeMetadataError(ValueError):
    """An episode.json that cannot be used (not JSON, not UTF-8, not an object, a field of the wrong type)."""


@dataclass
class EpisodeMetadata:
    instruction: str
    robot: str = "so101"
    task: str = ""
    start_time_ns: int = 0
    stop_time_ns: int = 0
    success: bool | None = None
    status: str = "recording"  # recording | complete | failed | recovered
    failure: str = ""
    recovery: str = ""  # how so101-recover-episode rebuilt the bag, when it did
    message_counts: dict[str, int] = field(default_factory=dict)
    seed: int | None = None
    software_version: str = SOFTWARE_VERSION
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "EpisodeMetadata":
        """Fields of ``data`` this version knows; wrong types raise EpisodeMetadataError naming the field."""
        if not isinstance(data, dict):
            raise EpisodeMetadataError(f"expected a JSON object, got a JSON {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known}
        if not isinstance(fields.get("instruction"), str):
            raise EpisodeMetadataError("field 'instruction' is missing or not a string")
        for name in ("robot", "task", "status", "failure", "recovery"):
            if name in fields and not isinstance(fields[name], str):
                raise EpisodeMetadataError(f"field {name!r} is not a string")
        if fields.get("success") not in (None, True, False):
            raise EpisodeMetadataError("field 'success' is not true, false or null")
        counts = fields.get("message_counts", {})
        if not isinstance(counts, dict):
            raise EpisodeMetadataError("field 'message_counts' is not an object")
        for name in ("start_time_ns", "stop_time_ns"):
            if name in fields and not isinstance(fields[name], (int, float)):
                raise EpisodeMetadataError(f"field {name!r} is not a number")
        return cls(**fields)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class EpisodeWriter:
    """Writes one episode bag. Messages are CDR bytes; topics are declared with their ROS type name.

    episode.json (status "recording") is written as soon as the bag is opened, so a recorder killed mid-episode
    (kill -9, power loss) leaves a folder that says what it is; ``close`` rewrites it atomically with the final
    status. ``flush`` puts everything written so far on disk (so101-recover-episode can rebuild it from there).
    """

    def __init__(self, path: str | Path, metadata: EpisodeMetadata) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"episode directory {self.path} already exists")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata
        if not self.metadata.start_time_ns:
            self.metadata.start_time_ns = time.time_ns()
        self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._connections: dict[str, Connection] = {}
        self.closed = False
        try:
            _atomic_write(self.path / EPISODE_FILE, self.metadata.to_json())
        except OSError:
            self.discard()
            raise

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic, e.g. ``("/joint_states", "sensor_msgs/msg/JointState")``."""
        if topic in self._connections:
            return
        self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=_TYPESTORE)
        self.metadata.message_counts.setdefault(topic, 0)

    def write(self, topic: str, timestamp_ns: int, cdr: bytes) -> None:
        if self.closed:
            raise RuntimeError(f"episode {self.path} is closed")
        conn = self._connections.get(topic)
        if conn is None:
            raise KeyError(f"topic {topic!r} was not declared with add_topic")
        self._writer.write(conn, int(timestamp_ns), bytes(cdr))
        self.metadata.message_counts[topic] += 1

    def flush(self) -> None:
        """Write the messages buffered so far to the file (a new mcap chunk), so a kill -9 cannot lose them.

        rosbags keeps up to 1 MiB of messages in memory before it writes a chunk and has no public flush; its
        mcap storage's ``close_chunk`` is used when present (a storage without it is left alone).
        """
        if self.closed:
            return
        storage = getattr(self._writer, "storage", None)
        close_chunk, chunk = getattr(storage, "close_chunk", None), getattr(storage, "chunk", None)
        if storage is None or close_chunk is None or chunk is None or not chunk.bio.tell():
            return
        close_chunk()
        storage.bio.flush()

    def close(self, success: bool | None = None, failure: str = "", status: str | None = None,
              stop_time_ns: int | None = None) -> EpisodeMetadata:
        """Finalise the bag (readable afterwards) and write episode.json; safe to call twice.

        ``status`` defaults to "failed" with a ``failure`` and "complete" without; the recovery tool passes its own.
        """
        if self.closed:
            return self.metadata
        self.closed = True
        self.metadata.stop_time_ns = time.time_ns() if stop_time_ns is None else int(stop_time_ns)
        self.metadata.success = success
        self.metadata.status = status or ("failed" if failure else "complete")
        self.metadata.failure = failure
        try:
            self._writer.set_custom_data("so101.episode", json.dumps(asdict(self.metadata), sort_keys=True))
        finally:
            try:
                self._writer.close()
            finally:
                # Written even when closing the bag fails (broken storage), so the episode says why it failed.
                _atomic_write(self.path / EPISODE_FILE, self.metadata.to_json())
        return self.metadata

    def discard(self) -> None:
        """Drop the episode entirely."""
        if not self.closed:
            self.closed = True
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the directory is removed anyway
                pass
        shutil.rmtree(self.path, ignore_errors=True)


def read_episode_metadata(path: str | Path) -> EpisodeMetadata:
    """Metadata of an episode directory written by EpisodeWriter; a broken file raises EpisodeMetadataError."""
    file = Path(path) / EPISODE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not an episode written by so101 tools")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EpisodeMetadataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise EpisodeMetadataError(f"{file}: not valid JSON ({exc})") from exc
    try:
        return EpisodeMetadata.from_dict(data)
    except EpisodeMetadataError as exc:
        raise EpisodeMetadataError(f"{file}: {exc}") from exc


def update_index(dataset_dir: str | Path) -> dict:
    """Rebuild ``index.json`` of a dataset folder from its episodes' metadata; returns the index."""
    root = Path(dataset_dir)
    episodes = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            meta = read_episode_metadata(child)
        except (FileNotFoundError, EpisodeMetadataError):
            continue
        episodes.append({
            "name": child.name,
            "instruction": meta.instruction,
            "task": meta.task,
            "status": meta.status,
            "success": meta.success,
            "duration_s": max(0.0, (meta.stop_time_ns - meta.start_time_ns) / 1e9),
            "messages": sum(meta.message_counts.values()),
        })
    index = {"format_version": FORMAT_VERSION, "episodes": episodes}
    _atomic_write(root / INDEX_FILE, json.dumps(index, indent=2))
    return index
