"""Episode bags -> synchronised, cached training samples for the Mean-Flow policy (plain Python, no rclpy node).

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

Each synchronised episode is cached once (images decoded and resized) as ``.npy`` files + JSON in a folder named
by a hash of the bag's bytes and of the settings, so epochs and later runs never re-read bags.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC
from so101_common.joints import JointLimits
from so101_common.trajectory import TrajectoryError, TrajectoryFollower

from meanflow_policy.backbone import resize_image
from meanflow_policy.bag_reader import (
    BagError,
    BagTopics,
    RawEpisode,
    find_bags,
    read_episode,
    read_frames,
)

LOG = logging.getLogger("meanflow_policy.dataset")
CACHE_VERSION = 1
ACTION_SOURCES = ("trajectory", "next_state")
MIN_STD = 1e-3  # rad: a joint that never moved must not blow up normalisation
_EPISODE_META = "episode.json"
CACHE_SPACE_MARGIN = 64 * 2**20  # bytes left free on the cache's disk after an entry


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
        base = dict(fps=float(config.fps), image_size=int(config.image_size),
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
    dt_ns = 1e9 / cfg.fps
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
    state_age = (times - raw.state_times[s_idx]) / 1e9
    state_fresh = state_age <= cfg.max_state_age_s + 1e-9
    state = raw.states[s_idx].astype(np.float32)
    state[~state_fresh] = np.nan

    frame_msg_index = np.full((n, len(cams)), -1, dtype=np.int64)
    stale_any = ~state_fresh
    report.dropped_stale["joint_states"] = int(np.count_nonzero(~state_fresh))
    for j, cam in enumerate(cams):
        i = _latest_before(cam_times[cam], times)
        age = (times - cam_times[cam][i]) / 1e9
        fresh = age <= cfg.max_image_age_s + 1e-9
        frame_msg_index[fresh, j] = cam_order[cam][i[fresh]]
        report.dropped_stale[cam] = int(np.count_nonzero(~fresh))
        stale_any |= ~fresh

    next_times = start + np.round((np.arange(n) + 1) * dt_ns).astype(np.int64)
    if cfg.action_source == "next_state":
        a_idx = _latest_before(raw.state_times, next_times)
        action = raw.states[a_idx].copy()
        valid = ((next_times - raw.state_times[a_idx]) / 1e9 <= cfg.max_state_age_s + 1e-9) & (next_times <= end)
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
        return (int(ns) - origin_ns) / 1e9

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


def bag_fingerprint(path: Path, cfg: SyncConfig) -> str:
    """Hash of every file's bytes in the bag directory plus the sync settings (the cache key)."""
    h = hashlib.sha256(json.dumps(cfg.cache_key(), sort_keys=True).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:32]


def _cache_dir(cache_root: Path, key: str) -> Path:
    return cache_root / f"ep-{key}"


def _load_cached(folder: Path, cfg: SyncConfig) -> Episode:
    meta = json.loads((folder / _EPISODE_META).read_text())

    def load(name: str) -> np.ndarray:
        return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    report = SyncReport(**meta["report"])
    report.from_cache = True
    return Episode(name=meta["name"], instruction=meta["instruction"], source=meta["source"], key=meta["key"],
                   times_ns=np.asarray(load("times_ns")), state=np.asarray(load("state")),
                   action=np.asarray(load("action")), action_valid=np.asarray(load("action_valid")),
                   frame_index=np.asarray(load("frame_index")),
                   frames={cam: load(f"frames_{cam}") for cam in cfg.camera_keys}, report=report)


def free_bytes(path: Path) -> int:
    """Free space of the file system holding ``path`` (a function of its own so tests can shrink it)."""
    return shutil.disk_usage(path).free


def ensure_writable_dirs(dirs: dict[str, Path]) -> None:
    """Create and write-test each folder (by the option that names it) before any work, so an unwritable
    ``--out`` or ``--cache-dir`` is one line at the start instead of a traceback after loading or evaluating."""
    for what, path in dirs.items():
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise DatasetError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from exc


def _write_frames(file: Path, frames: Iterator[np.ndarray], shape: tuple[int, ...]) -> None:
    """A uint8 ``.npy`` written with plain writes: a full disk is an OSError (ENOSPC) here, whereas writing
    through a memory map of a sparse file kills the whole process with SIGBUS."""
    with open(file, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                  "fortran_order": False, "shape": shape})
        for frame in frames:
            fh.write(np.ascontiguousarray(frame, dtype=np.uint8).reshape(shape[1:]).data)


def _build_episode(path: Path, cfg: SyncConfig, key: str, folder: Path, replace: bool = False) -> Episode:
    """Read and synchronise one bag into the cache entry ``folder``.

    Entries are content-keyed, so when another process (a second training run on the same cache) finishes the
    same entry first, its copy is kept and ours dropped: an entry that a reader may have memory-mapped is never
    deleted, except a broken one being rebuilt (``replace``). The entry's size is checked against the free space
    first; a write that fails anyway (full disk, quota) removes the half-written entry and ends the run with one
    line (DatasetError), as every later episode would fail the same way.
    """
    raw = read_episode(path, cfg.topics, cfg.joint_names, cfg.clock, cfg.instruction,
                       need_trajectory=cfg.action_source == "trajectory")
    for warning in raw.warnings:
        LOG.warning("%s", warning)
    arrays, report = synchronise(raw, cfg)
    frame_index = np.full(arrays["frame_msg_index"].shape, -1, dtype=np.int32)
    used_frames = [np.unique(idx[idx >= 0]) for idx in arrays["frame_msg_index"].T]
    need = (sum(len(u) for u in used_frames) * cfg.image_size ** 2 * 3
            + sum(a.nbytes for a in arrays.values()) + frame_index.nbytes)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        free = free_bytes(folder.parent)
        if free < need + CACHE_SPACE_MARGIN:
            raise DatasetError(f"--cache-dir {folder.parent}: episode {raw.name} needs {need / 2**20:.1f} MiB of "
                               f"cache (+{CACHE_SPACE_MARGIN // 2**20} MiB margin), only {free / 2**20:.1f} MiB are "
                               f"free: free some space or pass --cache-dir on a larger disk")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for j, (cam, topic) in enumerate(cfg.topics.cameras):
            msg_idx = arrays["frame_msg_index"][:, j]
            used = used_frames[j]
            frame_index[:, j] = np.where(msg_idx >= 0, np.searchsorted(used, msg_idx), -1)
            decoded = read_frames(path, topic, used, lambda rgb: resize_image(rgb, cfg.image_size))
            _write_frames(tmp / f"frames_{cam}.npy", (decoded.pop(int(msg)) for msg in used),
                          (len(used), cfg.image_size, cfg.image_size, 3))
        np.save(tmp / "times_ns.npy", arrays["times_ns"])
        np.save(tmp / "state.npy", arrays["state"])
        np.save(tmp / "action.npy", arrays["action"])
        np.save(tmp / "action_valid.npy", arrays["action_valid"])
        np.save(tmp / "frame_index.npy", frame_index)
        meta = dict(name=raw.name, instruction=raw.instruction, source=str(path), key=key,
                    sync=cfg.cache_key(), report=asdict(report))
        (tmp / _EPISODE_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if replace:
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _EPISODE_META).is_file():
                raise
            LOG.info("cache entry %s was written by another process meanwhile; using it", folder)
    except OSError as exc:
        raise DatasetError(f"--cache-dir {folder.parent}: writing the cache of episode {raw.name} failed "
                           f"({exc.strerror or exc}); the partial entry was removed: free some space or pass "
                           f"--cache-dir on a larger disk") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    episode = _load_cached(folder, cfg)
    episode.report.from_cache = False
    return episode


def load_episode(path: str | Path, cfg: SyncConfig, cache_root: str | Path) -> Episode:
    """One bag as a synchronised Episode, from the cache when the bag's bytes and settings are unchanged."""
    path = Path(path)
    key = bag_fingerprint(path, cfg)
    folder = _cache_dir(Path(cache_root), key)
    if (folder / _EPISODE_META).is_file():
        try:
            return _load_cached(folder, cfg)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            LOG.warning("cache entry %s unreadable (%s); rebuilding it from %s", folder, exc, path)
            return _build_episode(path, cfg, key, folder, replace=True)
    return _build_episode(path, cfg, key, folder, replace=folder.exists())


@dataclass
class LoadReport:
    """Totals over a set of bags: what was loaded, from where, and what was skipped and why."""

    episodes: int = 0
    from_cache: int = 0
    read_from_bags: int = 0
    samples: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    dropped_stale: dict[str, int] = field(default_factory=dict)
    dropped_no_action: int = 0
    bad_messages: int = 0

    def summary(self) -> str:
        stale = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped_stale.items()) if v) or "none"
        text = (f"{self.episodes} episodes ({self.from_cache} from cache, {self.read_from_bags} read from bags), "
                f"{self.samples} samples; steps dropped: stale [{stale}], no action {self.dropped_no_action}; "
                f"bad messages skipped {self.bad_messages}")
        if self.skipped:
            text += f"; {len(self.skipped)} episodes skipped"
        return text


def load_episodes(bags: Sequence[str | Path], cfg: SyncConfig, cache_root: str | Path,
                  strict: bool = False) -> tuple[list[Episode], LoadReport]:
    """Every bag under ``bags`` (episode dirs or dataset folders); bad ones skipped with a warning, or fatal."""
    try:
        paths, unreadable = find_bags(bags)
    except BagError as exc:
        raise DatasetError(str(exc)) from exc
    report = LoadReport()
    episodes: list[Episode] = []
    for folder, problem in unreadable.items():
        if strict:
            raise DatasetError(f"bad episode (strict mode): {problem}")
        LOG.warning("skipping episode: %s", problem)
        report.skipped[folder] = problem
    for path in paths:
        try:
            ep = load_episode(path, cfg, cache_root)
            if ep.sample_steps.size == 0:
                raise BagError(f"{path}: no usable samples ({ep.report.steps} grid steps, stale streams "
                               f"{ep.report.dropped_stale})")
        except BagError as exc:
            if strict:
                raise DatasetError(f"bad episode (strict mode): {exc}") from exc
            LOG.warning("skipping episode: %s", exc)
            report.skipped[str(path)] = str(exc)
            continue
        episodes.append(ep)
        r = ep.report
        report.episodes += 1
        report.from_cache += int(r.from_cache)
        report.read_from_bags += int(not r.from_cache)
        report.samples += int(ep.sample_steps.size)
        for k, v in r.dropped_stale.items():
            report.dropped_stale[k] = report.dropped_stale.get(k, 0) + v
        report.dropped_no_action += r.dropped_no_action
        report.bad_messages += sum(r.bad_messages.values())
    if not episodes:
        reasons = "; ".join(f"{Path(p).name}: {why}" for p, why in list(report.skipped.items())[:3])
        raise DatasetError(f"empty dataset: none of the {len(paths) + len(unreadable)} bags under "
                           f"{[str(b) for b in bags]} gave a training sample" + (f" ({reasons})" if reasons else ""))
    return episodes, report


def split_episodes(episodes: Sequence[Episode], val_fraction: float = 0.1,
                   seed: int = 0) -> tuple[list[Episode], list[Episode]]:
    """Train/validation split by whole episodes (held-out demos), deterministic for a seed and set of bags."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(episodes, key=lambda e: e.key)
    n_val = int(round(len(ordered) * val_fraction))
    if val_fraction > 0 and len(ordered) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(ordered) - 1)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val_ids = set(perm[:n_val].tolist())
    train = [e for i, e in enumerate(ordered) if i not in val_ids]
    val = [e for i, e in enumerate(ordered) if i in val_ids]
    return train, val


def compute_stats(episodes: Sequence[Episode]) -> dict:
    """Mean/std of states (over samples) and actions (over valid actions), joint units; std floored at MIN_STD."""
    if not episodes:
        raise DatasetError("cannot compute normalisation stats of an empty training split")
    states = np.concatenate([np.asarray(e.state)[e.sample_steps] for e in episodes]).astype(np.float64)
    actions = np.concatenate([np.asarray(e.action)[np.asarray(e.action_valid)] for e in episodes]).astype(np.float64)

    def moments(x: np.ndarray) -> dict:
        return {"mean": x.mean(axis=0).tolist(), "std": np.maximum(x.std(axis=0), MIN_STD).tolist()}

    return {"state": moments(states), "action": moments(actions)}


class SampleSet:
    """All samples of some episodes; ``batch(rows)`` gathers a training batch with vectorised numpy."""

    def __init__(self, episodes: Sequence[Episode], cfg: SyncConfig) -> None:
        if not episodes:
            raise DatasetError("no episodes given")
        self.episodes = list(episodes)
        self.cfg = cfg
        self.chunk_size = cfg.chunk_size
        lengths = np.array([len(e.times_ns) for e in self.episodes])
        self._offset = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._length = lengths
        self._state = np.concatenate([np.asarray(e.state) for e in self.episodes])
        self._action = np.concatenate([np.asarray(e.action) for e in self.episodes])
        self._valid = np.concatenate([np.asarray(e.action_valid) for e in self.episodes])
        self._frame_index = np.concatenate([np.asarray(e.frame_index) for e in self.episodes])
        steps = [e.sample_steps for e in self.episodes]
        self.sample_episode = np.concatenate([np.full(len(s), i) for i, s in enumerate(steps)]).astype(np.int64)
        self.sample_step = np.concatenate(steps).astype(np.int64)
        if len(self) == 0:
            raise DatasetError("the episodes contain no samples")

    def __len__(self) -> int:
        return int(self.sample_step.size)

    def chunk(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Actions (B, C, J) and pad mask (B, C) of sample ``rows``."""
        ep, step = self.sample_episode[rows], self.sample_step[rows]
        k = step[:, None] + np.arange(self.chunk_size)[None, :]
        beyond = k >= self._length[ep][:, None]
        g = self._offset[ep][:, None] + np.minimum(k, self._length[ep][:, None] - 1)
        return self._action[g], beyond | ~self._valid[g]

    def batch(self, rows: Sequence[int] | np.ndarray, images: bool = True) -> dict:
        """A batch in the policy's training format (see MeanFlowPolicy.compute_loss); ``images=False`` leaves the
        frames out (training on cached prefix features)."""
        rows = np.asarray(rows, dtype=np.int64)
        ep, step = self.sample_episode[rows], self.sample_step[rows]
        g = self._offset[ep] + step
        actions, pad = self.chunk(rows)
        out = {
            "state": torch.from_numpy(self._state[g].astype(np.float32)),
            "actions": torch.from_numpy(actions.astype(np.float32)),
            "action_is_pad": torch.from_numpy(pad),
            "instruction": [self.episodes[e].instruction for e in ep],
        }
        if images:
            size = self.cfg.image_size
            frames = np.empty((len(rows), len(self.cfg.camera_keys), size, size, 3), dtype=np.uint8)
            for j, cam in enumerate(self.cfg.camera_keys):
                fidx = self._frame_index[g, j]
                for b in range(len(rows)):
                    frames[b, j] = self.episodes[ep[b]].frames[cam][fidx[b]]
            out["images"] = torch.from_numpy(frames)
        return out

    def observation(self, row: int) -> dict:
        """One sample as a policy.sample() observation (images keyed by camera, at the cached size)."""
        ep, step = int(self.sample_episode[row]), int(self.sample_step[row])
        g = self._offset[ep] + step
        e = self.episodes[ep]
        return {"images": {cam: np.asarray(e.frames[cam][self._frame_index[g, j]])
                           for j, cam in enumerate(self.cfg.camera_keys)},
                "state": self._state[g].astype(np.float32), "instruction": e.instruction}

    def batches(self, batch_size: int, seed: int = 0, shuffle: bool = True,
                infinite: bool = True) -> Iterator[dict]:
        """Batches forever (reshuffled every epoch) or one pass; the last partial batch of a pass is kept."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
            for i in range(0, len(order), batch_size):
                yield self.batch(order[i:i + batch_size])
            if not infinite:
                return
