"""Episode bags -> synchronised training samples for the Mean-Flow policy (plain Python, no rclpy node).

Synchronisation runs on a fixed-rate grid (``fps``) of the reference clock, from the first instant every stream
has a message to the last joint state. Per step k at time t_k:
- each camera gives its latest frame at or before t_k; older than ``max_image_age_s`` -> the step is dropped;
- the state is the latest joint state at or before t_k (ordered by ``joint_names``; stale -> dropped);
- the action a_k is the target for t_{k+1}: the recorded trajectory commands replayed through
  so101_common's TrajectoryFollower (exactly what the controller tracked) or, with ``action_source=
  "next_state"``, the joint state at t_{k+1}. This matches the policy node, which publishes chunk point i at
  (i+1)/fps after the observation.
- the chunk of step k is a_k .. a_{k+C-1}; entries past the episode end are padded (value of the last valid
  action, ``action_is_pad`` True).

Each synchronised episode is cached once (data/cache.py); samples and batches of cached episodes are
data/samples.py.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC
from so101_common.joints import JointLimits
from so101_common.trajectory import TrajectoryError, TrajectoryFollower

from meanflow_policy.data.bag_reader import BagError, BagTopics, RawEpisode
from so101_common.stamps import NS_PER_S

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1
ACTION_SOURCES = ("trajectory", "next_state")


class DatasetError(ValueError):
    """The demonstrations cannot give a training set (nothing usable, or a bad episode under ``strict``)."""


@dataclass(frozen=True)
class SyncConfig:
    """How bags become samples; everything here except ``chunk_size`` is part of the cache key."""

    fps: float = 30.0
    image_size: int = 64
    camera_keys: tuple[str, ...] = ("wrist", "top")
    camera_topics: tuple[tuple[str, str], ...] = ()  # (camera, topic) overrides of the graph's camera topics
    joint_names: tuple[str, ...] = JOINT_NAMES
    joint_states_topic: str = JOINT_STATES_TOPIC
    trajectory_topic: str = TRAJECTORY_TOPIC
    max_image_age_s: float = 0.1
    max_state_age_s: float = 0.1
    action_source: str = "trajectory"
    clock: str = "bag"
    instruction: str | None = None
    chunk_size: int = 20

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_image_age_s <= 0 or self.max_state_age_s <= 0:
            raise ValueError("max_image_age_s and max_state_age_s must be > 0")
        if self.action_source not in ACTION_SOURCES:
            raise ValueError(f"action_source must be one of {ACTION_SOURCES}, got {self.action_source!r}")
        if not self.camera_keys:
            raise ValueError("camera_keys is empty")
        JointLimits.so101(tuple(self.joint_names))  # raises naming joints this arm does not have

    @classmethod
    def from_policy_config(cls, config, **overrides) -> "SyncConfig":
        """The sync settings a MeanFlowConfig implies (fps, image size, cameras, joints, chunk size)."""
        base: dict[str, Any] = dict(fps=float(config.fps), image_size=int(config.image_size),
                    camera_keys=tuple(config.camera_keys), joint_names=tuple(config.joint_names),
                    chunk_size=int(config.chunk_size))
        base.update(overrides)
        return cls(**base)

    @property
    def topics(self) -> BagTopics:
        return BagTopics.for_cameras(self.camera_keys, dict(self.camera_topics), self.joint_states_topic,
                                     self.trajectory_topic)

    def cache_key(self) -> dict:
        d = asdict(self)
        d.pop("chunk_size")
        d["cache_version"] = CACHE_VERSION
        return d


@dataclass
class SyncReport:
    """What happened to one episode: steps on the grid, samples kept and why the others were dropped."""

    name: str
    steps: int = 0
    samples: int = 0
    dropped_stale: dict[str, int] = field(default_factory=dict)
    dropped_no_action: int = 0
    bad_messages: dict[str, int] = field(default_factory=dict)
    rejected_trajectories: int = 0
    from_cache: bool = False


@dataclass
class Episode:
    """One synchronised episode; arrays may be read-only memory maps of the cache."""

    name: str
    instruction: str
    source: str
    key: str
    times_ns: np.ndarray  # (N,) int64, step times on the reference clock
    state: np.ndarray  # (N, J) float32
    action: np.ndarray  # (N, J) float32, a_k = target at t_{k+1}; invalid rows hold the previous valid action
    action_valid: np.ndarray  # (N,) bool
    frame_index: np.ndarray  # (N, n_cameras) int32 into frames[cam]; -1 where that camera was stale
    frames: dict[str, np.ndarray]  # camera -> (M, S, S, 3) uint8, only the frames some step uses
    report: SyncReport

    @property
    def sample_steps(self) -> np.ndarray:
        """Steps that are training samples: every stream fresh and a valid first action."""
        return np.nonzero(np.all(self.frame_index >= 0, axis=1) & self.action_valid
                          & np.isfinite(self.state).all(axis=1))[0]


def _latest_before(times: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of the last ``times`` entry <= each query (times sorted); -1 where none."""
    return np.searchsorted(times, query, side="right") - 1


def synchronise(raw: RawEpisode, cfg: SyncConfig) -> tuple[dict, SyncReport]:
    """Grid, states, actions and per-camera message indices of one raw episode (no pixels yet)."""
    report = SyncReport(name=raw.name, bad_messages=dict(raw.bad_messages))
    dt_ns = NS_PER_S / cfg.fps
    cams = list(cfg.camera_keys)
    cam_order = {}
    cam_times = {}
    for cam in cams:
        t = raw.image_times[cam]
        order = np.argsort(t, kind="stable")
        order = order[t[order] >= 0]  # undecodable stamps (header clock) are never picked
        if order.size == 0:
            raise BagError(f"{raw.path}: camera {cam!r} has no usable images")
        cam_order[cam], cam_times[cam] = order, t[order]
    start = max([int(raw.state_times[0])] + [int(cam_times[c][0]) for c in cams])
    end = int(raw.state_times[-1])
    if end < start:
        raise BagError(f"{raw.path}: the joint states end before every camera has sent an image; no overlap")
    n = int(np.floor((end - start) / dt_ns + 1e-9)) + 1
    times = start + np.round(np.arange(n) * dt_ns).astype(np.int64)
    report.steps = n

    s_idx = _latest_before(raw.state_times, times)
    state_age = (times - raw.state_times[s_idx]) / NS_PER_S
    state_fresh = state_age <= cfg.max_state_age_s + 1e-9
    state = raw.states[s_idx].astype(np.float32)
    state[~state_fresh] = np.nan

    frame_msg_index = np.full((n, len(cams)), -1, dtype=np.int64)
    stale_any = ~state_fresh
    report.dropped_stale["joint_states"] = int(np.count_nonzero(~state_fresh))
    for j, cam in enumerate(cams):
        i = _latest_before(cam_times[cam], times)
        age = (times - cam_times[cam][i]) / NS_PER_S
        fresh = age <= cfg.max_image_age_s + 1e-9
        frame_msg_index[fresh, j] = cam_order[cam][i[fresh]]
        report.dropped_stale[cam] = int(np.count_nonzero(~fresh))
        stale_any |= ~fresh

    next_times = start + np.round((np.arange(n) + 1) * dt_ns).astype(np.int64)
    if cfg.action_source == "next_state":
        a_idx = _latest_before(raw.state_times, next_times)
        action = raw.states[a_idx].copy()
        valid = ((next_times - raw.state_times[a_idx]) / NS_PER_S <= cfg.max_state_age_s + 1e-9) & (next_times <= end)
    else:
        action, rejected = _replay_trajectories(raw, cfg, next_times, times[0])
        report.rejected_trajectories = rejected
        valid = next_times <= end
    # Invalid rows repeat the previous valid action so pads hold the arm still if a loss ever ignores the mask.
    last_valid = np.maximum.accumulate(np.where(valid, np.arange(n), -1))
    first = int(np.argmax(valid)) if valid.any() else 0
    action = action[np.where(last_valid >= 0, last_valid, first)].astype(np.float32)
    report.dropped_no_action = int(np.count_nonzero(~valid & ~stale_any))
    arrays = dict(times_ns=times, state=state, action=action, action_valid=valid, frame_msg_index=frame_msg_index)
    report.samples = int(np.count_nonzero(~stale_any & valid))
    return arrays, report


def _replay_trajectories(raw: RawEpisode, cfg: SyncConfig, query_ns: np.ndarray,
                         origin_ns: int) -> tuple[np.ndarray, int]:
    """Targets the joint trajectory controller tracked at ``query_ns``, replaying commands in receipt order."""
    limits = JointLimits.so101(tuple(cfg.joint_names))
    follower = TrajectoryFollower(limits, raw.states[0])

    def sec(ns: int) -> float:
        """Seconds since the grid start: small floats keep nanosecond precision."""
        return (int(ns) - origin_ns) / NS_PER_S

    out = np.empty((len(query_ns), len(cfg.joint_names)), dtype=np.float64)
    cmds = raw.trajectories
    k = 0
    rejected = 0
    errors: list[str] = []
    for i, t in enumerate(query_ns):
        while k < len(cmds) and cmds[k].time_ns <= t:
            c = cmds[k]
            try:
                follower.set_trajectory(sec(c.time_ns), c.joint_names, c.times_s, c.positions)
            except TrajectoryError as exc:
                rejected += 1
                errors.append(str(exc))
            k += 1
        out[i] = follower.sample(sec(t))
    if k and rejected == k:
        raise BagError(f"{raw.path}: every one of the {k} trajectories on {cfg.trajectory_topic} was "
                       f"rejected (joint names {cmds[0].joint_names} vs configured {list(cfg.joint_names)}): "
                       f"{errors[0]}")
    if rejected:
        LOG.warning("%s: %d of %d trajectory commands rejected, e.g. %s", raw.name, rejected, k, errors[0])
    return out, rejected


