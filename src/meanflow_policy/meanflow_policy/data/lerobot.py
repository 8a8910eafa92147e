"""Episode bags <-> LeRobotDataset v3.0 directories (parquet tables + one mp4 per camera), no LeRobot install needed.

Export (``so101-export-lerobot``, meanflow_policy.tools.export_lerobot) reads each bag with the training pipeline's
reader and synchroniser, so every
LeRobot frame is one step of the training grid: the same states, the same actions (a_k = target at t_{k+1}) and
the frame each camera had at that step (at the bag's native resolution). Import (``load_lerobot_episodes``, used by
``meanflow-train --lerobot-dataset``) turns such a directory back into the same ``Episode`` objects training uses.

Layout written (read from LeRobot's source, lerobot/datasets/{utils,io_utils,dataset_metadata,feature_utils}.py,
codebase_version "v3.0"):
  meta/info.json, meta/stats.json, meta/tasks.parquet (index "task" -> task_index),
  meta/episodes/chunk-000/file-000.parquet (one row per episode: length, tasks, dataset_from/to_index, data/ and
  videos/<key>/ chunk and file indices, from/to timestamps), data/chunk-000/file-000.parquet (one row per frame),
  videos/observation.images.<camera>/chunk-000/file-000.mp4 (all episodes back to back, pts = global frame index).

Joint units: LeRobot's SO-101 follower (lerobot/robots/so_follower) reports ``<joint>.pos`` with the arm joints in
MotorNormMode.DEGREES (``use_degrees=True``, the config default) and the gripper in RANGE_0_100. Its degrees are
(ticks - middle of the calibrated range) * 360 / 4095; ours are radians with zero at the same middle and 4096
ticks per turn (so101_hardware.calibration), so deg = rad * 180/pi * 4096/4095. Its gripper percent is the
position within the calibrated range, which our calibration maps linearly onto the URDF gripper limits, so
percent = (rad - lower) / (upper - lower) * 100 (both directions of drive_mode agree). LeRobot's degree mode does
not apply drive_mode: an arm joint calibrated with drive_mode 1 has the opposite sign there.

Two extra per-frame columns keep the training grid's bookkeeping (LeRobot ignores columns it has no use for):
``meanflow.fresh`` (every camera and the joint state were fresh at that step; stale steps hold the last frame and
state) and ``meanflow.action_valid`` (the step has a next target). A dataset recorded elsewhere has neither: every
frame is then a sample with a valid action.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from so101_common.instruction import validate_instruction
from so101_common.joints import JointLimits

from meanflow_policy.data.bag_reader import BagError, find_bags, read_episode, read_frames
from meanflow_policy.data.cache import LoadReport
from meanflow_policy.data.sync import DatasetError, Episode, SyncConfig, SyncReport, _latest_before, synchronise
from meanflow_policy.images import resize_image

LOG = logging.getLogger(__name__)
CODEBASE_VERSION = "v3.0"
ROBOT_TYPE = "so101_follower"
CHUNKS_SIZE = 1000
DATA_FILE = "data/chunk-000/file-000.parquet"
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"
TASKS_FILE = "meta/tasks.parquet"
INFO_FILE = "meta/info.json"
STATS_FILE = "meta/stats.json"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STATE_KEY, ACTION_KEY = "observation.state", "action"
FRESH_KEY, VALID_KEY = "meanflow.fresh", "meanflow.action_valid"
VIDEO_CODEC = "libx264"  # H.264 in yuv420p: decoded by LeRobot's torchcodec and pyav backends alike
VIDEO_CRF = 18
DEG_PER_RAD = 180.0 / math.pi * 4096.0 / 4095.0
GRIPPER = "gripper"


class LeRobotFormatError(DatasetError):
    """A LeRobot dataset that does not fit the policy (other joints, cameras or fps, missing files)."""


def camera_feature(camera: str) -> str:
    return f"observation.images.{camera}"


def joint_feature_names(joint_names: Sequence[str]) -> list[str]:
    """LeRobot's motor feature names (``shoulder_pan.pos`` ...) for our joints."""
    return [f"{n}.pos" for n in joint_names]


def to_lerobot_units(radians: np.ndarray, joint_names: Sequence[str]) -> np.ndarray:
    """Joint radians (..., J) -> LeRobot SO-101 units: arm degrees (use_degrees=True), gripper 0-100."""
    limits = JointLimits.so101(tuple(joint_names))
    out = np.asarray(radians, dtype=np.float64) * DEG_PER_RAD
    for i, name in enumerate(joint_names):
        if name == GRIPPER:
            out[..., i] = (np.asarray(radians)[..., i] - limits.lower[i]) / (limits.upper[i] - limits.lower[i]) * 100
    return out


def from_lerobot_units(values: np.ndarray, joint_names: Sequence[str]) -> np.ndarray:
    """Inverse of ``to_lerobot_units``: LeRobot SO-101 units -> joint radians."""
    limits = JointLimits.so101(tuple(joint_names))
    values = np.asarray(values, dtype=np.float64)
    out = values / DEG_PER_RAD
    for i, name in enumerate(joint_names):
        if name == GRIPPER:
            out[..., i] = limits.lower[i] + values[..., i] / 100.0 * (limits.upper[i] - limits.lower[i])
    return out


def _int_fps(fps: float, what: str) -> int:
    if abs(fps - round(fps)) > 1e-9:
        raise ValueError(f"{what} {fps}: LeRobot datasets need a whole number of frames per second")
    return int(round(fps))


# ---------------------------------------------------------------------------------------------------- export
@dataclass
class _ExportedEpisode:
    name: str
    instruction: str
    state: np.ndarray  # (N, J) radians, stale steps hold the last state
    action: np.ndarray  # (N, J) radians
    fresh: np.ndarray  # (N,) bool
    action_valid: np.ndarray  # (N,) bool


def _episode_for_export(path: Path, cfg: SyncConfig) -> tuple[_ExportedEpisode, dict[str, np.ndarray]]:
    """One bag on the training grid, and per camera the message index of the frame shown at each step."""
    raw = read_episode(path, cfg.topics, cfg.joint_names, cfg.clock, cfg.instruction,
                       need_trajectory=cfg.action_source == "trajectory")
    for warning in raw.warnings:
        LOG.warning("%s", warning)
    arrays, _report = synchronise(raw, cfg)
    times = arrays["times_ns"]
    fresh = np.all(arrays["frame_msg_index"] >= 0, axis=1) & np.isfinite(arrays["state"]).all(axis=1)
    state = raw.states[_latest_before(raw.state_times, times)]
    held: dict[str, np.ndarray] = {}
    for cam, _topic in cfg.topics.cameras:
        stamps = raw.image_times[cam]
        order = np.argsort(stamps, kind="stable")
        order = order[stamps[order] >= 0]
        # Every step has a frame (the grid starts once each camera has sent one); stale steps hold the last one.
        held[cam] = order[_latest_before(stamps[order], times)]
    episode = _ExportedEpisode(raw.name, raw.instruction, state, arrays["action"].astype(np.float64), fresh,
                               arrays["action_valid"].astype(bool))
    return episode, held


class _CameraVideo:
    """One camera's mp4 (episodes back to back, frame k at pts k in a 1/fps time base) and its pixel stats."""

    def __init__(self, camera: str, path: Path, fps: int) -> None:
        self.camera, self.path, self.fps = camera, path, fps
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self._pixels = 0
        # PyAV's output container and video stream, opened with the first frame (its stubs model them loosely)
        self._container: Any = None
        self._stream: Any = None
        self._sum, self._sq = np.zeros(3), np.zeros(3)
        self._lo, self._hi = np.full(3, np.inf), np.full(3, -np.inf)

    def _open(self, height: int, width: int) -> tuple[int, int]:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size = (height, width)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream(VIDEO_CODEC, rate=self.fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = Fraction(1, self.fps)
        self._stream.options = {"crf": str(VIDEO_CRF), "g": "2"}  # short GOP: cheap random access, as LeRobot
        return self.size

    def add(self, rgb: np.ndarray, repeats: int = 1) -> None:
        """Append ``rgb`` as the next ``repeats`` frames (a held frame of stale steps repeats)."""
        import av

        size = self.size if self.size is not None else self._open(*rgb.shape[:2])
        if rgb.shape[:2] != size:
            raise ValueError(f"camera {self.camera!r} image is {rgb.shape[1]}x{rgb.shape[0]}, earlier frames "
                             f"{size[1]}x{size[0]}; one LeRobot video needs one size")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for _ in range(repeats):
            frame.pts = self.frames
            self.frames += 1
            self._container.mux(self._stream.encode(frame))
        # Stats on a strided copy of at most ~160 px per side (as LeRobot downsamples images for its stats).
        step = max(1, max(rgb.shape[:2]) // 160)
        x = np.ascontiguousarray(rgb[::step, ::step].transpose(2, 0, 1)).reshape(3, -1).astype(np.float64) / 255.0
        self._pixels += repeats * x.shape[1]
        self._sum += repeats * x.sum(axis=1)
        self._sq += repeats * (x * x).sum(axis=1)
        self._lo, self._hi = np.minimum(self._lo, x.min(axis=1)), np.maximum(self._hi, x.max(axis=1))

    def write_episode(self, bag: Path, topic: str, held: np.ndarray) -> None:
        """The frames at message indices ``held`` (one per step), decoded and encoded one at a time when they are
        in message order (a long episode never sits in memory at full resolution)."""
        if np.all(np.diff(held) >= 0):
            used, counts = np.unique(held, return_counts=True)
            repeats = iter(counts.tolist())
            read_frames(bag, topic, used, lambda rgb: self.add(rgb, next(repeats)))
            return
        decoded = read_frames(bag, topic, np.unique(held), lambda rgb: rgb)  # header clock, reordered stamps
        for i in held:
            self.add(decoded[int(i)])

    def close(self) -> None:
        if self._container is not None:
            self._container.mux(self._stream.encode())
            self._container.close()

    def stats(self) -> dict:
        """Per-channel stats of pixels in [0, 1], shaped (3, 1, 1) as LeRobot stores them."""
        n = max(self._pixels, 1)
        mean = self._sum / n
        std = np.sqrt(np.maximum(self._sq / n - mean ** 2, 0.0))

        def c11(v: np.ndarray) -> list:
            return np.asarray(v, dtype=np.float64).reshape(3, 1, 1).tolist()

        return {"min": c11(self._lo), "max": c11(self._hi), "mean": c11(mean), "std": c11(std),
                "count": [int(self.frames)]}


def _moments(x: np.ndarray) -> dict:
    return {"min": x.min(axis=0).tolist(), "max": x.max(axis=0).tolist(), "mean": x.mean(axis=0).tolist(),
            "std": x.std(axis=0).tolist(), "count": [int(len(x))]}


def export_lerobot(bags: Sequence[str | Path], out: str | Path, cfg: SyncConfig, robot_type: str = ROBOT_TYPE,
                   strict: bool = False) -> dict:
    """Write the bags under ``bags`` as a LeRobotDataset v3.0 at ``out`` (new or empty); returns a summary.

    The dataset is written next to ``out`` and renamed into place at the end, so a failed export leaves nothing
    that looks like a dataset."""
    out = Path(out)
    _int_fps(cfg.fps, "--fps")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; choose a new one")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        summary = _export(bags, partial, cfg, robot_type, strict)
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    except OSError as exc:
        raise DatasetError(f"--out {out}: writing the dataset failed ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    summary["out"] = str(out)
    return summary


def _export(bags: Sequence[str | Path], out: Path, cfg: SyncConfig, robot_type: str, strict: bool) -> dict:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    fps = _int_fps(cfg.fps, "--fps")
    paths, unreadable = find_bags(bags)
    skipped: dict[str, str] = dict(unreadable)
    if unreadable and strict:
        raise DatasetError(f"bad episode (strict mode): {next(iter(unreadable.values()))}")
    names = joint_feature_names(cfg.joint_names)
    cams = list(cfg.camera_keys)
    videos = {cam: _CameraVideo(cam, out / VIDEO_PATH.format(video_key=camera_feature(cam), chunk_index=0,
                                                               file_index=0), fps) for cam in cams}
    tasks: dict[str, int] = {}
    columns: dict[str, list] = {k: [] for k in ("timestamp", "frame_index", "episode_index", "index",
                                                "task_index", STATE_KEY, ACTION_KEY, FRESH_KEY, VALID_KEY)}
    episodes: list[dict] = []
    total = 0
    try:
        for path in paths:
            try:
                ep, held = _episode_for_export(path, cfg)
            except BagError as exc:
                if strict:
                    raise DatasetError(f"bad episode (strict mode): {exc}") from exc
                LOG.warning("skipping episode: %s", exc)
                skipped[str(path)] = str(exc)
                continue
            n = len(ep.state)
            index = len(episodes)
            task_index = tasks.setdefault(ep.instruction, len(tasks))
            row: dict = {"episode_index": index, "tasks": [ep.instruction], "length": n,
                         "data/chunk_index": 0, "data/file_index": 0,
                         "dataset_from_index": total, "dataset_to_index": total + n}
            for cam, topic in cfg.topics.cameras:
                start = videos[cam].frames
                try:
                    videos[cam].write_episode(path, topic, held[cam])
                except BagError as exc:  # frames of this episode may be in the videos already: cannot skip it
                    raise DatasetError(f"export stopped: {exc}") from exc
                key = camera_feature(cam)
                row.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                            f"videos/{key}/from_timestamp": start / fps,
                            f"videos/{key}/to_timestamp": (start + n) / fps})
            columns["timestamp"].append(np.arange(n, dtype=np.float32) / np.float32(fps))
            columns["frame_index"].append(np.arange(n, dtype=np.int64))
            columns["episode_index"].append(np.full(n, index, dtype=np.int64))
            columns["index"].append(np.arange(total, total + n, dtype=np.int64))
            columns["task_index"].append(np.full(n, task_index, dtype=np.int64))
            columns[STATE_KEY].append(to_lerobot_units(ep.state, cfg.joint_names).astype(np.float32))
            columns[ACTION_KEY].append(to_lerobot_units(ep.action, cfg.joint_names).astype(np.float32))
            columns[FRESH_KEY].append(ep.fresh)
            columns[VALID_KEY].append(ep.action_valid)
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
            episodes.append(row)
            total += n
            LOG.info("exported %s: %d frames, %d stale, instruction %r", ep.name, n, int((~ep.fresh).sum()),
                     ep.instruction)
    finally:
        for writer in videos.values():
            writer.close()
    if not episodes:
        raise DatasetError(f"nothing to export: none of the bags under {[str(b) for b in bags]} could be read"
                           + (f" ({next(iter(skipped.values()))})" if skipped else ""))
    data = {k: np.concatenate(v) for k, v in columns.items()}
    J = len(names)
    table = pa.table({
        STATE_KEY: pa.FixedSizeListArray.from_arrays(pa.array(data[STATE_KEY].reshape(-1)), J),
        ACTION_KEY: pa.FixedSizeListArray.from_arrays(pa.array(data[ACTION_KEY].reshape(-1)), J),
        **{k: pa.array(data[k]) for k in ("timestamp", "frame_index", "episode_index", "index", "task_index",
                                            FRESH_KEY, VALID_KEY)},
    })
    for file in (DATA_FILE, EPISODES_FILE):
        (out / file).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / DATA_FILE)
    pd.DataFrame({"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task")).to_parquet(
        out / TASKS_FILE)
    pd.DataFrame(episodes).to_parquet(out / EPISODES_FILE, index=False)

    sizes: dict[str, tuple[int, int]] = {}
    for cam in cams:
        size = videos[cam].size
        if size is None:
            raise DatasetError(f"camera {cam!r}: no frame was exported")
        sizes[cam] = size
    vector = {"dtype": "float32", "shape": [J], "names": names}
    features = {
        STATE_KEY: dict(vector), ACTION_KEY: dict(vector),
        **{camera_feature(cam): {
            "dtype": "video", "shape": [sizes[cam][0], sizes[cam][1], 3],
            "names": ["height", "width", "channels"],
            "info": {"video.height": sizes[cam][0], "video.width": sizes[cam][1],
                     "video.codec": "h264", "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                     "video.fps": fps, "video.channels": 3, "has_audio": False}} for cam in cams},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
        FRESH_KEY: {"dtype": "bool", "shape": [1], "names": None},
        VALID_KEY: {"dtype": "bool", "shape": [1], "names": None},
    }
    info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": len(episodes),
            "total_frames": total, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": fps,
            "splits": {"train": f"0:{len(episodes)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
            "features": features}
    (out / INFO_FILE).write_text(json.dumps(info, indent=4) + "\n")
    stats = {STATE_KEY: _moments(data[STATE_KEY].astype(np.float64)),
             ACTION_KEY: _moments(data[ACTION_KEY].astype(np.float64)),
             **{camera_feature(cam): videos[cam].stats() for cam in cams}}
    (out / STATS_FILE).write_text(json.dumps(stats, indent=4) + "\n")
    return {"out": str(out), "episodes": len(episodes), "frames": total, "tasks": list(tasks), "fps": fps,
            "skipped": skipped}


# ---------------------------------------------------------------------------------------------------- import
def _read_info(root: Path) -> dict:
    path = root / INFO_FILE
    if not path.is_file():
        raise LeRobotFormatError(f"--lerobot-dataset {root}: no {INFO_FILE} (not a LeRobotDataset directory)")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeRobotFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise LeRobotFormatError(f"{path}: no 'features' mapping")
    return info


def check_compatible(root: Path, info: dict, cfg: SyncConfig) -> None:
    """One clear error when the dataset's version, fps, joints or cameras do not fit ``cfg``."""
    where = root / INFO_FILE
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise LeRobotFormatError(f"{where}: codebase_version {version!r}; this reader needs {CODEBASE_VERSION!r} "
                                 "(convert older datasets with LeRobot's convert_dataset_v21_to_v30)")
    if not isinstance(info.get("fps"), (int, float)) or abs(float(info["fps"]) - cfg.fps) > 1e-9:
        raise LeRobotFormatError(f"{where}: field 'fps' is {info.get('fps')!r}, the policy runs at {cfg.fps:g} Hz "
                                 f"(pass --fps {info.get('fps')} to train at the dataset's rate)")
    want = joint_feature_names(cfg.joint_names)
    features = info["features"]
    for key in (STATE_KEY, ACTION_KEY):
        if key not in features:
            raise LeRobotFormatError(f"{where}: feature {key!r} is missing; features are {sorted(features)}")
        names = features[key].get("names")
        if isinstance(names, dict):  # older exports: {"motors": [...]}
            names = next(iter(names.values()), None)
        if list(names or []) != want:
            raise LeRobotFormatError(f"{where}: feature {key!r} has joint names {names}, expected {want} "
                                     "(an SO-101 follower in this order)")
    for cam in cfg.camera_keys:
        key = camera_feature(cam)
        if key not in features:
            have = sorted(k for k in features if k.startswith("observation.images."))
            raise LeRobotFormatError(f"{where}: camera feature {key!r} is missing; the dataset has {have}")
        if features[key].get("dtype") != "video":
            raise LeRobotFormatError(f"{where}: feature {key!r} has dtype {features[key].get('dtype')!r}; this "
                                     "reader takes video features")


def _decode_video(path: Path, size: int, n_frames: int, fps: int) -> np.ndarray:
    """Every frame of an mp4, resized to (size, size) as training resizes bag images, indexed by pts * fps."""
    import av

    if not path.is_file():
        raise LeRobotFormatError(f"video {path} is missing")
    out = np.zeros((n_frames, size, size, 3), dtype=np.uint8)
    seen = np.zeros(n_frames, dtype=bool)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                k = int(round(float(frame.pts * stream.time_base) * fps))  # type: ignore[operator]  # decoded: has pts
                if 0 <= k < n_frames:
                    out[k] = resize_image(frame.to_ndarray(format="rgb24"), size)
                    seen[k] = True
    except (av.error.FFmpegError, OSError) as exc:
        raise LeRobotFormatError(f"video {path} cannot be decoded: {exc}") from exc
    if not seen.all():
        raise LeRobotFormatError(f"video {path} has {int(seen.sum())} of the {n_frames} frames the episodes "
                                 f"index (first missing: frame {int(np.argmin(seen))})")
    return out


def _fingerprint(root: Path) -> str:
    """Hash of every file's bytes in the dataset: episode keys (split order, prefix-feature cache) change with
    any content, as a bag's do."""
    h = hashlib.sha256()
    files = (p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                    for part in p.relative_to(root).parts))
    for file in sorted(files):  # hidden folders (.cache of the hub tools) are not content
        h.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def _vectors(rows, key: str, root: Path, episode: int) -> np.ndarray:
    """Column ``key`` of one episode as an (N, J) float64 array; ragged or non-finite values are one error."""
    try:
        values = np.stack(rows[key].to_numpy()).astype(np.float64)
    except (ValueError, TypeError) as exc:
        raise LeRobotFormatError(f"{root / 'data'}: column {key!r} of episode {episode} is not a table of "
                                 f"equal-length vectors ({exc})") from exc
    if not np.isfinite(values).all():
        raise LeRobotFormatError(f"{root / 'data'}: column {key!r} of episode {episode} holds NaN or inf")
    return values


def load_lerobot_episodes(root: str | Path, cfg: SyncConfig) -> tuple[list[Episode], LoadReport]:
    """A local LeRobotDataset v3.0 as training Episodes (joint radians, frames resized to cfg.image_size)."""
    import pandas as pd
    import pyarrow.parquet as pq

    root = Path(root)
    if not root.is_dir():
        raise LeRobotFormatError(f"--lerobot-dataset {root}: no such directory")
    info = _read_info(root)
    check_compatible(root, info, cfg)
    fps = int(round(float(info["fps"])))
    files = sorted((root / "data").glob("chunk-*/file-*.parquet"))
    if not files:
        raise LeRobotFormatError(f"{root}: no data/chunk-*/file-*.parquet files")
    try:
        frames_df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        tasks_df = pd.read_parquet(root / TASKS_FILE)
        meta_files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
        if not meta_files:
            raise LeRobotFormatError(f"{root}: no meta/episodes/chunk-*/file-*.parquet files")
        episodes_df = pd.concat([pd.read_parquet(f) for f in meta_files], ignore_index=True)
    except (OSError, ValueError) as exc:
        raise LeRobotFormatError(f"{root}: cannot read its parquet tables ({exc})") from exc
    missing = [c for c in (STATE_KEY, ACTION_KEY, "episode_index", "frame_index", "task_index")
               if c not in frames_df]
    if missing:
        raise LeRobotFormatError(f"{root / 'data'}: the frame tables lack the columns {missing}")
    if "task_index" not in tasks_df:
        raise LeRobotFormatError(f"{root / TASKS_FILE}: no column 'task_index'")
    task_of = {int(i): str(t) for t, i in zip(tasks_df.index, tasks_df["task_index"])}
    by_episode = {int(k): g.sort_values("frame_index") for k, g in frames_df.groupby("episode_index")}
    # Decode each camera's video files once, resized; episodes slice them by their timestamps.
    decoded: dict[tuple[str, int, int], np.ndarray] = {}
    for cam in cfg.camera_keys:
        key = camera_feature(cam)
        for col in (f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/to_timestamp"):
            if col not in episodes_df:
                raise LeRobotFormatError(f"{root / 'meta/episodes'}: column {col!r} is missing")
        groups = episodes_df.groupby([f"videos/{key}/chunk_index", f"videos/{key}/file_index"])
        for (chunk, file), rows in groups:
            n = int(round(float(rows[f"videos/{key}/to_timestamp"].max()) * fps))
            path = root / str(info.get("video_path") or VIDEO_PATH).format(video_key=key, chunk_index=int(chunk),
                                                                          file_index=int(file))
            decoded[(cam, int(chunk), int(file))] = _decode_video(path, cfg.image_size, n, fps)
    digest = _fingerprint(root)
    episodes: list[Episode] = []
    report = LoadReport()
    for _, row in episodes_df.sort_values("episode_index").iterrows():
        index = int(row["episode_index"])
        rows = by_episode.get(index)
        if rows is None:
            report.skipped[f"{root}#episode_{index}"] = "no frames"
            continue
        n = len(rows)
        task_index = int(rows["task_index"].iloc[0])
        text = cfg.instruction if cfg.instruction is not None else task_of.get(task_index, "")
        ok, cleaned, message = validate_instruction(text)
        if not ok:
            raise LeRobotFormatError(f"{root / TASKS_FILE}: task {task_index} of episode {index} is not a usable "
                                     f"instruction: {message} (pass --instruction)")
        state = from_lerobot_units(_vectors(rows, STATE_KEY, root, index), cfg.joint_names).astype(np.float32)
        action = from_lerobot_units(_vectors(rows, ACTION_KEY, root, index), cfg.joint_names).astype(np.float32)
        fresh = rows[FRESH_KEY].to_numpy(bool) if FRESH_KEY in rows else np.ones(n, bool)
        valid = rows[VALID_KEY].to_numpy(bool) if VALID_KEY in rows else np.ones(n, bool)
        state[~fresh] = np.nan
        frames = {}
        for cam in cfg.camera_keys:
            key = camera_feature(cam)
            start = int(round(float(row[f"videos/{key}/from_timestamp"]) * fps))
            video = decoded[(cam, int(row[f"videos/{key}/chunk_index"]), int(row[f"videos/{key}/file_index"]))]
            frames[cam] = video[start:start + n]
            if len(frames[cam]) != n:
                raise LeRobotFormatError(f"{root}: episode {index} needs frames {start}..{start + n - 1} of "
                                         f"{key}, its video has {len(video)}")
        frame_index = np.where(fresh[:, None], np.arange(n)[:, None], -1).repeat(len(cfg.camera_keys), axis=1)
        sync_report = SyncReport(name=f"episode_{index:06d}", steps=n,
                                 samples=int(np.count_nonzero(fresh & valid)))
        episodes.append(Episode(
            name=sync_report.name, instruction=cleaned, source=f"{root}#episode_{index}", key=f"{digest}-{index}",
            times_ns=np.round(np.arange(n) * 1e9 / fps).astype(np.int64), state=state, action=action,
            action_valid=valid, frame_index=frame_index.astype(np.int32), frames=frames, report=sync_report))
        report.episodes += 1
        report.read_from_bags += 1
        report.samples += int(episodes[-1].sample_steps.size)
    if not episodes:
        raise LeRobotFormatError(f"--lerobot-dataset {root}: no episode with frames")
    return episodes, report
