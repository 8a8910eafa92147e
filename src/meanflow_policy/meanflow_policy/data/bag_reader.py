"""Read demonstration episodes from rosbag2 directories (mcap or sqlite3) without a ROS install.

rosbags is used as the container (it reads both storage plugins). Messages are decoded by
``rclpy.serialization.deserialize_message`` where the ROS packages are installed, else by rosbags' pure-Python CDR
decoder (``message_decoder``): the same fields, so a machine without ROS (a GPU training box) reads bags too.
Reading is split in two passes so a long episode never holds every full-size image in memory: ``read_episode``
collects joint states, trajectories and image timestamps; ``read_frames`` later decodes only the frames the
synchroniser picked.

rosbags and the ROS packages are imported only where a bag is actually read.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC, camera_image_topic
from so101_common.instruction import validate_instruction

from so101_common.stamps import NS_PER_S, ns_to_s

if TYPE_CHECKING:  # rosbags is imported where a bag is read
    from rosbags.interfaces import Connection

T = TypeVar("T")

BAG_METADATA_FILE = "metadata.yaml"
EPISODE_FILE = "episode.json"  # so101_common.episode_bag.EPISODE_FILE (that module needs rosbags)
CLOCKS = ("bag", "header")
_IMAGE_TYPE = "sensor_msgs/msg/Image"
_JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
_TRAJECTORY_TYPE = "trajectory_msgs/msg/JointTrajectory"


class BagError(ValueError):
    """An episode bag that cannot be used; the message names the bag and what is wrong with it."""


@dataclass(frozen=True)
class BagTopics:
    """Which topics hold the cameras (in camera order), the joint states and the commanded trajectories."""

    cameras: tuple[tuple[str, str], ...] = tuple((c, camera_image_topic(c)) for c in ("wrist", "top"))
    joint_states: str = JOINT_STATES_TOPIC
    trajectory: str = TRAJECTORY_TOPIC

    @classmethod
    def for_cameras(cls, camera_keys: Sequence[str], overrides: dict[str, str] | None = None,
                    joint_states: str = JOINT_STATES_TOPIC, trajectory: str = TRAJECTORY_TOPIC) -> "BagTopics":
        """Default graph topics for ``camera_keys``; ``overrides`` maps a camera key to another topic."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(camera_keys))
        if unknown:
            raise ValueError(f"camera topic overrides for unknown cameras {unknown}; cameras are {list(camera_keys)}")
        cams = tuple((c, overrides[c] if c in overrides else camera_image_topic(c)) for c in camera_keys)
        return cls(cams, joint_states, trajectory)


@dataclass
class TrajectoryCommand:
    """One recorded JointTrajectory: when it takes effect on the reference clock, and its points."""

    time_ns: int
    joint_names: list[str]
    times_s: np.ndarray
    positions: np.ndarray


@dataclass
class RawEpisode:
    """Everything but the pixels of one bag; image times are per camera, in the bag's message order."""

    path: Path
    name: str
    instruction: str
    image_times: dict[str, np.ndarray]
    state_times: np.ndarray
    states: np.ndarray
    trajectories: list[TrajectoryCommand]
    bad_messages: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def is_bag_dir(path: Path) -> bool:
    return (path / BAG_METADATA_FILE).is_file()


def _recorded_status(path: Path) -> str:
    """The status an episode.json records ('' if none can be read): tells an unfinished episode apart."""
    try:
        data = json.loads((path / EPISODE_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return ""
    status = data.get("status", "") if isinstance(data, dict) else ""
    return status if isinstance(status, str) else ""


def unreadable_episode_problem(path: Path) -> str:
    """Why a folder that looks like an episode (a .mcap, .db3 or episode.json in it) is not a readable bag.

    '' when it does not look like one. A recorder killed with SIGKILL, or stopped by a full disk, leaves exactly
    such a folder: episode.json says "recording" and the .mcap has no summary and no metadata.yaml beside it.
    """
    if is_bag_dir(path):
        return ""
    mcaps, db3s = list(path.glob("*.mcap")), list(path.glob("*.db3"))
    if not (mcaps or db3s or (path / EPISODE_FILE).is_file()):
        return ""
    if _recorded_status(path) == "recording":
        what = ("unfinished episode: its episode.json still says 'recording' (the recorder was killed or the disk "
                f"filled up) and there is no {BAG_METADATA_FILE}")
    else:
        what = f"bag folder without {BAG_METADATA_FILE}"
    if mcaps:
        todo = f"rebuild it with `so101-recover-episode {path}`"
    elif db3s:
        todo = f"a sqlite3 bag needs its {BAG_METADATA_FILE}: run `ros2 bag reindex {path}` in a ROS 2 distro"
    else:
        todo = "it holds no bag file, so nothing can be recovered: delete the folder"
    return f"{path}: {what}; {todo}"


def find_bags(paths: Iterable[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """Expand each path: a rosbag2 directory itself, or a folder whose sub-directories are bags (a dataset).

    Returns the bags and, by folder, the episode folders that are not readable bags with what to do about them
    (unfinished episodes, bag folders without metadata.yaml), so none of them is dropped silently.
    """
    found: list[Path] = []
    problems: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise BagError(f"{path}: no such file or directory")
        if is_bag_dir(path):
            found.append(path)
            continue
        if not path.is_dir():
            raise BagError(f"{path}: not a rosbag2 directory (a bag is a folder with {BAG_METADATA_FILE})")
        problem = unreadable_episode_problem(path)
        if problem:
            problems[str(path.resolve())] = problem
            continue
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        children = [p for p in subdirs if is_bag_dir(p)]
        for child in subdirs:
            problem = unreadable_episode_problem(child)
            if problem:
                problems[str(child.resolve())] = problem
        if not children and not problems:
            raise BagError(f"{path}: neither a rosbag2 directory nor a folder of them "
                           f"(no {BAG_METADATA_FILE} in it or in its sub-directories)")
        found.extend(children)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, problems


ACCEPTED_STATUSES = ("complete", "recovered")


def episode_instruction(path: Path, override: str | None) -> str:
    """The instruction of a bag: ``override`` if given, else the one its episode.json recorded.

    Episodes our recorder marked failed, unfinished or unsuccessful are refused: they are not demonstrations.
    Episodes rebuilt by so101-recover-episode ("recovered") are kept: what the operator did until the cut.
    """
    from so101_common.episode_bag import EpisodeMetadataError, read_episode_metadata

    meta = None
    if (path / EPISODE_FILE).is_file():
        try:
            meta = read_episode_metadata(path)
        except EpisodeMetadataError as exc:
            raise BagError(f"{path}: {EPISODE_FILE} is not valid episode metadata ({exc}); fix or delete it "
                           "(then pass --instruction)") from exc
        if meta.status not in ACCEPTED_STATUSES:
            raise BagError(f"{path}: episode status is {meta.status!r}, not 'complete'"
                           + (f" ({meta.failure})" if meta.failure else ""))
        if meta.success is False:
            raise BagError(f"{path}: episode is marked unsuccessful (success: false)")
    if override is not None:
        text = override
    elif meta is not None:
        text = meta.instruction
    else:
        raise BagError(f"{path}: no {EPISODE_FILE} (not recorded by so101 tools) and no instruction override; "
                       "pass --instruction")
    ok, cleaned, message = validate_instruction(text)
    if not ok:
        raise BagError(f"{path}: bad instruction: {message}")
    return cleaned


def _open(path: Path):
    """An open rosbags Reader (mcap or sqlite3); a bag it cannot open becomes a BagError."""
    from rosbags.rosbag2 import Reader, ReaderError

    try:
        reader = Reader(path)
        reader.open()
    except (ReaderError, OSError, ValueError, KeyError) as exc:
        raise BagError(f"{path}: cannot open the bag (truncated or corrupt?): {exc}") from exc
    return reader


def _connection(reader, path: Path, topic: str, msgtype: str, what: str):
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        have = sorted({c.topic for c in reader.connections})
        raise BagError(f"{path}: topic {topic!r} ({what}) is missing; the bag has {have}")
    wrong = [c.msgtype for c in conns if c.msgtype != msgtype]
    if wrong:
        raise BagError(f"{path}: topic {topic!r} ({what}) has type {wrong[0]}, expected {msgtype}")
    if sum(c.msgcount for c in conns) == 0:
        raise BagError(f"{path}: topic {topic!r} ({what}) has no messages")
    return conns


def _messages(reader, path: Path, conns: list) -> Iterable[tuple[Connection, int, bytes]]:
    """The bag's messages on ``conns``; a storage failure mid-way becomes a BagError naming the bag."""
    from rosbags.rosbag2 import ReaderError

    try:
        yield from reader.messages(connections=conns)
    except (ReaderError, OSError, ValueError, KeyError, EOFError) as exc:
        raise BagError(f"{path}: the bag is truncated or corrupt (failed while reading messages: {exc})") from exc


def trajectory_command(time_ns: int, msg) -> TrajectoryCommand:
    """A JointTrajectory message as a TrajectoryCommand taking effect at ``time_ns``; ValueError says why not
    (no points, ragged points). Shared by the bag reader and the live viewer (meanflow_policy.viz)."""
    if not msg.points:
        raise ValueError("trajectory has no points")
    try:
        times = np.array([ns_to_s(p.time_from_start.sec * NS_PER_S + p.time_from_start.nanosec)
                          for p in msg.points])
        positions = np.array([list(p.positions) for p in msg.points], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"ragged points ({exc})") from exc
    return TrajectoryCommand(int(time_ns), list(msg.joint_names), times, positions.reshape(len(times), -1))


def bag_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """Topic -> (message type, message count) of a rosbag2 directory; a folder that is not one is a BagError."""
    path = Path(path)
    if not is_bag_dir(path):
        raise BagError(unreadable_episode_problem(path) or f"{path}: not a rosbag2 directory (no {BAG_METADATA_FILE})")
    reader = _open(path)
    try:
        found: dict[str, tuple[str, int]] = {}
        for conn in reader.connections:
            _, count = found.get(conn.topic, (conn.msgtype, 0))
            found[conn.topic] = (conn.msgtype, count + conn.msgcount)
        return found
    finally:
        reader.close()


def message_decoder() -> Callable[[bytes, str], Any]:
    """(serialised CDR message, ROS type name such as 'sensor_msgs/msg/Image') -> the message.

    rclpy's deserializer where it is installed; otherwise rosbags' decoder, whose messages have the same fields
    (sequences as numpy arrays). rclpy's serializer can leave bytes past a message's end, up to 8 seen in our bags,
    which rosbags' own size check refuses (it allows 3): so its decoder is called directly and the tail ignored,
    as rclpy ignores it. Decode errors are exceptions; callers count them as bad messages."""
    try:
        from rclpy.serialization import deserialize_message
        from sensor_msgs.msg import Image, JointState
        from trajectory_msgs.msg import JointTrajectory
    except ImportError:
        from rosbags.typesys import Stores, get_typestore

        store = get_typestore(Stores.ROS2_KILTED)

        def decode(raw: bytes, msgtype: str) -> Any:
            if len(raw) < 4 or bytes(raw[:2]) not in (b"\x00\x00", b"\x00\x01"):
                raise ValueError("not a CDR message (unknown encapsulation)")
            msgdef = store.get_msgdef(msgtype)
            func = msgdef.deserialize_cdr_le if raw[1] else msgdef.deserialize_cdr_be
            message, _end = func(memoryview(raw)[4:], 0, msgdef.cls, store)
            return message

        return decode
    classes: dict[str, Any] = {_IMAGE_TYPE: Image, _JOINT_STATE_TYPE: JointState, _TRAJECTORY_TYPE: JointTrajectory}
    return lambda raw, msgtype: deserialize_message(raw, classes[msgtype])


def read_messages(path: str | Path, topic: str, msg_class: type[T]) -> list[tuple[int, T]]:
    """Every message on ``topic`` decoded as ``msg_class``, with its bag (receive) time; a message that cannot be
    decoded is a BagError naming it. For small topics (timing reports), not images."""
    from rclpy.serialization import deserialize_message

    path = Path(path)
    reader = _open(path)
    out: list[tuple[int, T]] = []
    try:
        conns = [c for c in reader.connections if c.topic == topic]
        for i, (_conn, t_ns, raw) in enumerate(_messages(reader, path, conns)):
            try:
                out.append((t_ns, deserialize_message(raw, msg_class)))
            except Exception as exc:  # noqa: BLE001 - rclpy raises several types for bad CDR
                raise BagError(f"{path}: message {i} on {topic} cannot be decoded as {msg_class.__name__}: "
                               f"{exc}") from exc
    finally:
        reader.close()
    return out


def read_episode(path: str | Path, topics: BagTopics, joint_names: Sequence[str] = JOINT_NAMES,
                 clock: str = "bag", instruction: str | None = None, need_trajectory: bool = True,
                 any_status: bool = False) -> RawEpisode:
    """First pass over one bag: joint states (in ``joint_names`` order), trajectories, image timestamps.

    ``clock`` "bag" uses the recorder's receive time for every stream (one clock, robust to publishers on
    other clocks); "header" uses each message's header stamp (zero stamps fall back to the receive time). A
    trajectory takes effect at that time, as a controller starts a trajectory on receipt or at its stamp.
    ``any_status`` (a viewer, not training): failed, unfinished and unsuccessful episodes are read as well, and
    the instruction is ``instruction`` or '' as given (episode.json is not consulted).
    """
    from so101_common.images import stamp_to_ns

    decode = message_decoder()

    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    path = Path(path)
    if not is_bag_dir(path):
        raise BagError(unreadable_episode_problem(path) or f"{path}: not a rosbag2 directory (no {BAG_METADATA_FILE})")
    text = (instruction or "") if any_status else episode_instruction(path, instruction)
    joint_names = list(joint_names)
    reader = _open(path)
    try:
        cam_conns = {cam: _connection(reader, path, topic, _IMAGE_TYPE, f"camera {cam!r}")
                     for cam, topic in topics.cameras}
        js_conns = _connection(reader, path, topics.joint_states, _JOINT_STATE_TYPE, "joint states")
        traj_conns = ([] if not need_trajectory
                      else _connection(reader, path, topics.trajectory, _TRAJECTORY_TYPE, "commanded trajectories"))
        conn_ids = {c.id: ("camera", cam) for cam, cs in cam_conns.items() for c in cs}
        conn_ids.update({c.id: ("state", "") for c in js_conns})
        conn_ids.update({c.id: ("trajectory", "") for c in traj_conns})
        image_times: dict[str, list[int]] = {cam: [] for cam in cam_conns}
        state_times: list[int] = []
        states: list[np.ndarray] = []
        trajectories: list[TrajectoryCommand] = []
        bad: dict[str, int] = {}
        warnings: list[str] = []
        seen_names: list[str] = []
        state_rejects: dict[str, int] = {}  # why joint states were unusable, by kind (for the error below)

        def reject(topic: str, reason: str) -> None:
            bad[topic] = bad.get(topic, 0) + 1
            if bad[topic] <= 3:
                warnings.append(f"{path.name}: skipped a message on {topic}: {reason}")

        all_conns = [c for cs in cam_conns.values() for c in cs] + js_conns + traj_conns
        for conn, t_ns, raw in _messages(reader, path, all_conns):
            kind, cam = conn_ids[conn.id]
            if kind == "camera":
                stamp = t_ns
                if clock == "header":
                    try:
                        stamp = stamp_to_ns(decode(raw, _IMAGE_TYPE).header.stamp) or t_ns
                    except Exception as exc:  # noqa: BLE001 - any decode failure is one bad message
                        reject(conn.topic, f"cannot decode ({exc})")
                        stamp = -1
                image_times[cam].append(stamp)
                continue
            try:
                msg = decode(raw, _JOINT_STATE_TYPE if kind == "state" else _TRAJECTORY_TYPE)
            except Exception as exc:  # noqa: BLE001 - any decode failure is one bad message
                reject(conn.topic, f"cannot decode ({exc})")
                if kind == "state":
                    state_rejects["decode"] = state_rejects.get("decode", 0) + 1
                continue
            stamp = (stamp_to_ns(msg.header.stamp) or t_ns) if clock == "header" else t_ns
            if kind == "state":
                index = {n: i for i, n in enumerate(msg.name)}
                missing = [n for n in joint_names if n not in index]
                if missing:
                    seen_names = list(msg.name)
                    state_rejects["names"] = state_rejects.get("names", 0) + 1
                    reject(conn.topic, f"joints {missing} missing (message has {list(msg.name)})")
                    continue
                if len(msg.position) != len(msg.name):
                    state_rejects["length"] = state_rejects.get("length", 0) + 1
                    reject(conn.topic, f"{len(msg.name)} names but {len(msg.position)} positions")
                    continue
                pos = np.array([msg.position[index[n]] for n in joint_names], dtype=np.float64)
                if not np.all(np.isfinite(pos)):
                    state_rejects["nonfinite"] = state_rejects.get("nonfinite", 0) + 1
                    bad_joints = [n for n, v in zip(joint_names, pos) if not np.isfinite(v)]
                    reject(conn.topic, f"field 'position' has non-finite values (NaN or inf) for {bad_joints}")
                    continue
                state_times.append(stamp)
                states.append(pos)
            else:
                try:
                    trajectories.append(trajectory_command(stamp, msg))
                except ValueError as exc:
                    reject(conn.topic, str(exc))
    finally:
        reader.close()
    if not states:
        raise BagError(f"{path}: no usable joint states on {topics.joint_states}: "
                       + _no_states_reason(state_rejects, joint_names, seen_names))
    order = np.argsort(np.asarray(state_times), kind="stable")
    return RawEpisode(
        path=path, name=path.name, instruction=text,
        image_times={cam: np.asarray(v, dtype=np.int64) for cam, v in image_times.items()},
        state_times=np.asarray(state_times, dtype=np.int64)[order], states=np.stack(states)[order],
        trajectories=sorted(trajectories, key=lambda c: c.time_ns), bad_messages=bad, warnings=warnings)


def _no_states_reason(rejects: dict[str, int], joint_names: list[str], seen_names: list[str]) -> str:
    """Why every joint state was unusable, by kind, the most frequent kind first."""
    texts = {
        "names": f"the configured joint names {joint_names} do not match; messages carry joints {seen_names}",
        "nonfinite": "field 'position' holds non-finite values (NaN or inf)",
        "length": "field 'position' has another length than field 'name'",
        "decode": "the messages cannot be decoded as sensor_msgs/msg/JointState",
    }
    parts = [f"{n} messages: {texts[k]}" for k, n in sorted(rejects.items(), key=lambda kv: -kv[1])]
    return "; ".join(parts) or "no message was read"


def read_frames(path: str | Path, topic: str, wanted: np.ndarray,
                transform: Callable[[np.ndarray], T]) -> dict[int, T]:
    """Second pass: decode the frames at message indices ``wanted`` of ``topic`` and apply ``transform``."""
    from so101_common.images import ImageError, image_to_rgb

    decode = message_decoder()

    path = Path(path)
    wanted_set = {int(i) for i in wanted}
    out: dict[int, T] = {}
    reader = _open(path)
    try:
        conns = [c for c in reader.connections if c.topic == topic]
        for i, (_conn, _t, raw) in enumerate(_messages(reader, path, conns)):
            if i in wanted_set:
                try:
                    msg = decode(raw, _IMAGE_TYPE)
                except Exception as exc:  # noqa: BLE001 - either decoder raises several types for bad CDR
                    raise BagError(f"{path}: image {i} on {topic} cannot be decoded: {exc}") from exc
                try:
                    out[i] = transform(image_to_rgb(msg))
                except (ImageError, ValueError) as exc:
                    raise BagError(f"{path}: image {i} on {topic} cannot be used: {exc}") from exc
                if len(out) == len(wanted_set):
                    break
    finally:
        reader.close()
    missing = sorted(wanted_set - set(out))
    if missing:
        raise BagError(f"{path}: {topic} has fewer images than its first read found (missing index {missing[0]})")
    return out
