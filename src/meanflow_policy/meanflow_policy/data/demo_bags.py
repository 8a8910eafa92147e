"""Write rosbag2 demonstrations with known content: for tests, the loader benchmark and trying the pipeline.

Messages are real ROS messages serialised with rclpy. ``write_bag`` writes exactly the messages it is given (an
episode through so101_common's EpisodeWriter, or a plain rosbag2 in mcap or sqlite3 without episode.json);
``synthetic_episode`` generates a smooth reaching motion whose images show the commanded target, so a policy
can learn it. Run ``python -m meanflow_policy.data.demo_bags OUT --episodes 4`` to write a small dataset.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from builtin_interfaces.msg import Duration
from rclpy.serialization import serialize_message
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from so101_common.episode_bag import EpisodeMetadata, EpisodeWriter, update_index
from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC, camera_image_topic
from so101_common.images import rgb_to_image
from so101_common.joints import home_vector

from so101_common.stamps import NS_PER_S, s_to_ns

_IMAGE_TYPE = "sensor_msgs/msg/Image"
_TYPES = {JOINT_STATES_TOPIC: "sensor_msgs/msg/JointState", TRAJECTORY_TOPIC: "trajectory_msgs/msg/JointTrajectory"}


@dataclass
class DemoContent:
    """Messages of one bag: images per camera, joint states and trajectories, each with its bag time (ns)."""

    images: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    states: list[tuple[int, Sequence[str], Sequence[float] | np.ndarray]] = field(default_factory=list)
    # (receive time, header stamp (0 = start now), joint names, [(time_from_start_s, positions), ...])
    trajectories: list[tuple[int, int, Sequence[str], list[tuple[float, Sequence[float]]]]] = field(
        default_factory=list)


def _stamp(msg, ns: int) -> None:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(ns), NS_PER_S)


def joint_state(stamp_ns: int, names: Sequence[str], positions: Sequence[float] | np.ndarray) -> JointState:
    msg = JointState()
    _stamp(msg, stamp_ns)
    msg.name = list(names)
    msg.position = [float(p) for p in positions]
    return msg


def joint_trajectory(stamp_ns: int, names: Sequence[str],
                     points: Sequence[tuple[float, Sequence[float]]]) -> JointTrajectory:
    msg = JointTrajectory()
    _stamp(msg, stamp_ns)
    msg.joint_names = list(names)
    for tfs, pos in points:
        p = JointTrajectoryPoint()
        p.positions = [float(v) for v in pos]
        sec, nanosec = divmod(s_to_ns(tfs), NS_PER_S)
        p.time_from_start = Duration(sec=sec, nanosec=nanosec)
        msg.points.append(p)
    return msg


def _serialised(content: DemoContent) -> list[tuple[int, str, str, bytes]]:
    out = []
    for cam, frames in content.images.items():
        topic = camera_image_topic(cam)
        out += [(t, topic, _IMAGE_TYPE, serialize_message(rgb_to_image(rgb, t, cam))) for t, rgb in frames]
    out += [(t, JOINT_STATES_TOPIC, _TYPES[JOINT_STATES_TOPIC], serialize_message(joint_state(t, n, p)))
            for t, n, p in content.states]
    out += [(t, TRAJECTORY_TOPIC, _TYPES[TRAJECTORY_TOPIC], serialize_message(joint_trajectory(s, n, pts)))
            for t, s, n, pts in content.trajectories]
    return sorted(out, key=lambda m: m[0])


def write_bag(path: str | Path, content: DemoContent, instruction: str | None = "pick up the cube",
              storage: str = "mcap", topics: Sequence[str] | None = None) -> Path:
    """Write ``content`` as an episode (instruction given: EpisodeWriter, mcap) or a plain rosbag2 (None).

    ``topics`` limits which topics are declared and written (to make bags that lack one).
    """
    path = Path(path)
    messages = [m for m in _serialised(content) if topics is None or m[1] in topics]
    declared = dict.fromkeys((m[1], m[2]) for m in messages)
    if instruction is not None:
        if storage != "mcap":
            raise ValueError("episodes are always mcap; use instruction=None for a plain sqlite3 bag")
        writer = EpisodeWriter(path, EpisodeMetadata(instruction=instruction))
        for topic, msgtype in declared:
            writer.add_topic(topic, msgtype)
        for t, topic, _, raw in messages:
            writer.write(topic, t, raw)
        writer.close(success=True)
        return path
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    typestore = get_typestore(Stores.ROS2_KILTED)
    with Writer(path, version=9, storage_plugin=plugin) as bag:
        conns = {topic: bag.add_connection(topic, msgtype, typestore=typestore) for topic, msgtype in declared}
        for t, topic, _, raw in messages:
            bag.write(conns[topic], t, raw)
    return path


def synthetic_episode(seed: int, duration_s: float = 4.0, image_hz: float = 30.0, state_hz: float = 100.0,
                      command_hz: float = 10.0, height: int = 96, width: int = 128,
                      cameras: Sequence[str] = ("wrist", "top"), start_ns: int = NS_PER_S) -> DemoContent:
    """A reach towards a random goal: the top image shows the goal as a bright square, the wrist image the
    gripper opening; the teleop-like commands step the target towards the goal at ``command_hz``."""
    rng = np.random.default_rng(seed)
    home = home_vector(JOINT_NAMES)
    goal = home + rng.uniform(-0.6, 0.6, size=len(JOINT_NAMES))
    content = DemoContent()
    dt_cmd = 1.0 / command_hz
    n_cmd = int(duration_s * command_hz)
    targets = [home + (goal - home) * min(1.0, (i + 1) / (0.7 * n_cmd)) for i in range(n_cmd)]
    for i, target in enumerate(targets):
        content.trajectories.append((start_ns + s_to_ns(i * dt_cmd), 0, JOINT_NAMES, [(dt_cmd, target)]))

    def commanded(t: float) -> np.ndarray:
        i = min(int(t / dt_cmd), n_cmd - 1)
        prev = home if i == 0 else targets[i - 1]
        alpha = min(1.0, (t - i * dt_cmd) / dt_cmd)
        return prev + alpha * (targets[i] - prev)

    for k in range(int(duration_s * state_hz)):
        t = k / state_hz
        pos = commanded(max(0.0, t - 0.03))  # the arm lags its target a little
        content.states.append((start_ns + s_to_ns(t), JOINT_NAMES, pos))
    gy, gx = int((goal[0] + 2) / 4 * (height - 16)), int((goal[1] + 2) / 4 * (width - 16))
    for c, cam in enumerate(cameras):
        frames = []
        for k in range(int(duration_s * image_hz)):
            t = k / image_hz
            img = np.full((height, width, 3), 40 + 30 * c, dtype=np.uint8)
            if cam == "top":
                img[gy:gy + 16, gx:gx + 16] = (255, 200, 0)
            else:
                img[:, : int(width * np.clip(commanded(t)[-1] / 1.8, 0, 1))] = (0, 120, 255)
            frames.append((start_ns + s_to_ns(t + 0.004 * (c + 1)), img))
        content.images[cam] = frames
    return content


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic SO-101 demonstration episodes (rosbag2, mcap).")
    parser.add_argument("out", type=Path, help="dataset folder to create episodes in")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per episode")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    existing = [p.name for p in (args.out / f"episode_{i:04d}" for i in range(args.episodes)) if p.exists()]
    if existing:
        parser.error(f"{args.out} already holds {existing[:3]}: choose an empty folder")
    for i in range(args.episodes):
        content = synthetic_episode(args.seed + i, args.duration, height=args.height, width=args.width)
        write_bag(args.out / f"episode_{i:04d}", content, instruction="reach the yellow square")
    update_index(args.out)
    print(f"wrote {args.episodes} episodes to {args.out}")


if __name__ == "__main__":
    main()
