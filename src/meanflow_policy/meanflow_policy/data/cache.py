"""The episode cache: each bag is synchronised once (images decoded and resized) into ``.npy`` files + JSON, in a
folder named by a hash of the bag's bytes and of the sync settings, so epochs and later runs never re-read bags.
Entries are written to a temporary folder and renamed into place; an unreadable entry is rebuilt. Trainings may share
a cache: an entry another process finished meanwhile is used, never deleted under a reader.
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

from meanflow_policy.data.bag_reader import BagError, find_bags, read_episode, read_frames
from meanflow_policy.data.sync import DatasetError, Episode, SyncConfig, SyncReport, synchronise
from meanflow_policy.images import resize_image

LOG = logging.getLogger(__name__)
_EPISODE_META = "episode.json"
CACHE_SPACE_MARGIN = 64 * 2**20  # bytes left free on the cache's disk after an entry


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

    def load(name: str, mmap: bool = False) -> np.ndarray:
        return np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)

    report = SyncReport(**meta["report"])
    report.from_cache = True
    # Only the frames stay memory-mapped: each map holds a file descriptor, and 7 per episode ran a 3,000-episode
    # dataset into the usual 20,000-descriptor limit; the small arrays are read into memory (the samples copy them
    # anyway).
    return Episode(name=meta["name"], instruction=meta["instruction"], source=meta["source"], key=meta["key"],
                   times_ns=load("times_ns"), state=load("state"), action=load("action"),
                   action_valid=load("action_valid"), frame_index=load("frame_index"),
                   frames={cam: load(f"frames_{cam}", mmap=True) for cam in cfg.camera_keys}, report=report)


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
        install_entry(tmp, folder, _EPISODE_META, replace, "cache entry")
    except OSError as exc:
        raise DatasetError(f"--cache-dir {folder.parent}: writing the cache of episode {raw.name} failed "
                           f"({exc.strerror or exc}); the partial entry was removed: free some space or pass "
                           f"--cache-dir on a larger disk") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    episode = _load_cached(folder, cfg)
    episode.report.from_cache = False
    return episode


def install_entry(tmp: Path, folder: Path, meta_name: str, broken: bool, what: str) -> None:
    """Move the finished cache entry ``tmp`` to ``folder``. Several processes may share a cache: an entry another
    one finished meanwhile is kept and used (it may be being read); ``broken``: the entry found there could not be
    read and is renamed away in one step (no reader sees it half deleted), then replaced."""
    if broken:
        stale = folder.with_name(folder.name + f".stale{os.getpid()}")
        try:
            os.replace(folder, stale)
        except FileNotFoundError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, folder)  # fails on a finished entry (a non-empty folder)
    except OSError:
        if not (folder / meta_name).is_file():
            raise
        LOG.info("%s %s was written by another process meanwhile; using it", what, folder)


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


