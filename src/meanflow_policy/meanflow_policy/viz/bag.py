"""One episode bag into a StackLog, read by the training reader (meanflow_policy.data.bag_reader): the viewer shows
what training reads, and a bag training refuses for its format is refused here with the same words.

Everything but the pixels is read first (``load_bag``): a bag that cannot be shown fails before a recording
is opened. The images are decoded afterwards, one camera at a time, and logged as they are decoded.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meanflow_policy.data.bag_reader import (BagError, BagTopics, RawEpisode, bag_topics, is_bag_dir,
                                             read_episode, read_frames, read_messages)
from meanflow_policy.viz.rerun_log import TIMING_FIELDS, StackLog
from so101_common.graph import POLICY_TIMING_TOPIC, TRAJECTORY_TOPIC

TIMING_TYPE = "so101_interfaces/msg/ChunkTiming"


@dataclass
class Episode:
    """An episode bag without its pixels: what read_episode found, the instruction (if the bag has an
    episode.json) and the policy's timing reports (if it recorded the timing topic)."""

    raw: RawEpisode
    instruction: str | None
    timings: list[tuple[int, dict[str, float]]]


def load_bag(path: Path) -> Episode:
    """Read one episode bag (any status: failed and unsuccessful episodes are worth seeing too); BagError names
    the bag and what is wrong (not a bag, a camera or the joint states missing, unreadable)."""
    from so101_common.episode_bag import EpisodeMetadataError, read_episode_metadata

    if not path.exists():
        raise BagError(f"{path}: no such file or directory")
    episodes = sorted(p for p in path.iterdir() if is_bag_dir(p)) if path.is_dir() and not is_bag_dir(path) else []
    if episodes:
        raise BagError(f"{path}: a dataset folder of {len(episodes)} episode bags; pass one of them, e.g. "
                       f"{episodes[0]}")
    topics = bag_topics(path)
    has_trajectories = topics.get(TRAJECTORY_TOPIC, ("", 0))[1] > 0
    raw = read_episode(path, BagTopics(), clock="bag", need_trajectory=has_trajectories, any_status=True)
    try:
        instruction: str | None = read_episode_metadata(path).instruction
    except (FileNotFoundError, EpisodeMetadataError):
        instruction = None  # a plain rosbag2 (ros2 bag record) has no episode.json
    timings: list[tuple[int, dict[str, float]]] = []
    if POLICY_TIMING_TOPIC in topics:
        msgtype = topics[POLICY_TIMING_TOPIC][0]
        if msgtype != TIMING_TYPE:
            raise BagError(f"{path}: topic {POLICY_TIMING_TOPIC!r} has type {msgtype}, expected {TIMING_TYPE}")
        from so101_interfaces.msg import ChunkTiming

        timings = [(t, {name: float(getattr(msg, name)) for name in TIMING_FIELDS})
                   for t, msg in read_messages(path, POLICY_TIMING_TOPIC, ChunkTiming)]
    return Episode(raw, instruction, timings)


def log_bag(episode: Episode, log: StackLog) -> None:
    """Log the episode: instruction, joint states, chunks and timing, then each camera's frames as decoded."""
    raw = episode.raw
    if episode.instruction is not None:
        log.instruction(episode.instruction)
    log.joint_states(raw.state_times, raw.states)
    for command in raw.trajectories:
        try:
            log.chunk(command)
        except ValueError as exc:
            raw.warnings.append(f"{raw.name}: skipped a trajectory at {command.time_ns} ns: {exc}")
    for t_ns, values in episode.timings:
        log.timing(t_ns, values)
    for camera, topic in BagTopics().cameras:
        times = iter(raw.image_times[camera])  # read_frames decodes in this order, one call per frame

        def show(rgb: np.ndarray, camera: str = camera, times: Iterator[np.int64] = times) -> None:
            log.image(camera, int(next(times)), rgb)

        read_frames(raw.path, topic, np.arange(len(raw.image_times[camera])), show)
