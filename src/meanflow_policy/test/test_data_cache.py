"""The preprocessing cache (content-keyed, reused without touching bags), the episode split and the stats."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import meanflow_policy.data.cache as dataset
from meanflow_policy.data.cache import install_entry, load_episodes
from meanflow_policy.data.samples import SampleSet, compute_stats, split_episodes
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.units import MIN_STD
from meanflow_policy.data.demo_bags import DemoContent, synthetic_episode, write_bag
from so101_common.graph import JOINT_NAMES

CFG = SyncConfig(fps=30.0, image_size=16, chunk_size=20)


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bags")
    for i in range(4):
        write_bag(root / f"episode_{i}", synthetic_episode(seed=i, duration_s=1.5, height=24, width=32),
                  instruction=f"reach {i}")
    return root


def test_second_run_reads_no_bag(bags: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, report = load_episodes([bags], CFG, tmp_path / "cache")
    assert (report.episodes, report.read_from_bags, report.from_cache) == (4, 4, 0)
    assert len(list((tmp_path / "cache").glob("ep-*"))) == 4

    def no_bag_reading(*args, **kwargs):
        raise AssertionError("a bag was read although the cache is valid")

    monkeypatch.setattr(dataset, "read_episode", no_bag_reading)
    monkeypatch.setattr(dataset, "read_frames", no_bag_reading)
    second, report = load_episodes([bags], CFG, tmp_path / "cache")
    assert (report.episodes, report.read_from_bags, report.from_cache) == (4, 0, 4)
    for a, b in zip(first, second):
        assert a.key == b.key and a.instruction == b.instruction
        np.testing.assert_array_equal(a.action, b.action)
        np.testing.assert_array_equal(a.frames["top"], b.frames["top"])
    # a cached episode is memory-mapped, not loaded: epochs read frames straight from disk
    assert isinstance(second[0].frames["wrist"], np.memmap)

    # another chunk size is the same cache; another image size is another one
    _, report = load_episodes([bags], SyncConfig(fps=30.0, image_size=16, chunk_size=5), tmp_path / "cache")
    assert report.from_cache == 4
    with pytest.raises(AssertionError, match="a bag was read"):
        load_episodes([bags], SyncConfig(fps=30.0, image_size=8), tmp_path / "cache")


def test_a_cached_episode_holds_one_file_descriptor_per_camera(bags: Path, tmp_path: Path) -> None:
    """Every memory map holds a descriptor: with all seven arrays mapped, 2,900 episodes reached the usual limit of
    20,000 and training died ("Too many open files"); only the frames, too large for memory, stay mapped."""
    load_episodes([bags], CFG, tmp_path / "cache")
    before = len(os.listdir("/proc/self/fd"))
    episodes, _ = load_episodes([bags], CFG, tmp_path / "cache")
    assert len(os.listdir("/proc/self/fd")) - before == len(episodes) * len(CFG.camera_keys)
    assert not isinstance(episodes[0].action, np.memmap) and isinstance(episodes[0].frames["top"], np.memmap)


def test_an_entry_another_process_finished_first_is_kept(bags: Path, tmp_path: Path) -> None:
    """Two training runs filling one cache: the loser of the race keeps the winner's entry (which a reader may
    have memory-mapped) instead of deleting it, and leaves no temporary folder."""
    cache = tmp_path / "cache"
    (first,), _ = load_episodes([bags / "episode_1"], CFG, cache)
    folder = cache / f"ep-{first.key}"
    marker = folder / "written_by_the_other_process"
    marker.write_text("x")
    again = dataset._build_episode(bags / "episode_1", CFG, first.key, folder)
    assert marker.is_file()
    np.testing.assert_array_equal(again.frames["top"], first.frames["top"])
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]


def test_cache_key_follows_content(bags: Path, tmp_path: Path) -> None:
    """Same size and mtime do not matter: changing the bytes of episode.json changes the key and the data."""
    episodes, _ = load_episodes([bags / "episode_0"], CFG, tmp_path / "cache")
    meta_file = bags / "episode_0" / "episode.json"
    original = meta_file.read_text()
    stat = meta_file.stat()
    try:
        meta = json.loads(original)
        meta["instruction"] = "reach 9"  # same length as "reach 0"
        meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.utime(meta_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert meta_file.stat().st_size == stat.st_size
        again, report = load_episodes([bags / "episode_0"], CFG, tmp_path / "cache")
        assert report.read_from_bags == 1 and again[0].key != episodes[0].key
        assert again[0].instruction == "reach 9"
    finally:
        meta_file.write_text(original)


def test_a_shared_cache_keeps_a_finished_entry_and_rebuilds_an_unreadable_one(bags: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    episodes, _ = load_episodes([bags / "episode_0"], CFG, cache)
    folder = cache / f"ep-{episodes[0].key}"
    meta = (folder / "episode.json").read_text()
    # Another training built the same entry and finishes after this one: this one stays, files and all (it is
    # memory-mapped by its readers).
    other = tmp_path / "other"
    other.mkdir()
    (other / "episode.json").write_text("{}")
    install_entry(other, folder, "episode.json", broken=False, what="cache entry")
    assert (folder / "episode.json").read_text() == meta and (folder / "state.npy").is_file()
    # An entry that cannot be read is renamed away and rebuilt from the bag.
    (folder / "state.npy").unlink()
    again, report = load_episodes([bags / "episode_0"], CFG, cache)
    assert report.read_from_bags == 1 and np.array_equal(again[0].state, episodes[0].state)
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # no temporary or stale folder left


def test_split_and_stats_use_training_episodes_only(tmp_path: Path) -> None:
    root = tmp_path / "bags"
    constants = [0.1, 0.2, 0.3, 0.7, 0.9]
    for i, v in enumerate(constants):
        # the arm holds a constant pose v (state and commanded target) for 1 s
        c = DemoContent(images={cam: [(10**9 + k * 33_333_333, np.full((8, 8, 3), 50, np.uint8)) for k in range(31)]
                                for cam in ("wrist", "top")},
                        states=[(10**9 + k * 10_000_000, JOINT_NAMES, [v + 0.01 * k] * 6) for k in range(101)],
                        trajectories=[(10**9, 0, JOINT_NAMES, [(0.05, [v] * 6)])])
        write_bag(root / f"ep{i}", c, instruction="hold")
    episodes, _ = load_episodes([root], CFG, tmp_path / "cache")
    train, val = split_episodes(episodes, val_fraction=0.2, seed=3)
    assert len(train) == 4 and len(val) == 1
    assert not {e.key for e in train} & {e.key for e in val}
    again_train, again_val = split_episodes(list(reversed(episodes)), val_fraction=0.2, seed=3)
    assert [e.key for e in again_val] == [e.key for e in val]  # deterministic whatever the order
    stats = compute_stats(train)
    states = np.concatenate([e.state[e.sample_steps] for e in train])
    np.testing.assert_allclose(stats["state"]["mean"], states.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["state"]["std"], states.std(axis=0), rtol=1e-4)
    # actions: every valid target; each episode's target is its constant, so the action mean is theirs
    train_values = [float(e.action[0, 0]) for e in train]
    assert sorted(round(v, 6) for v in train_values) == sorted(
        v for v in constants if v not in [round(float(e.action[0, 0]), 6) for e in val])
    counts = [int(e.action_valid.sum()) for e in train]
    np.testing.assert_allclose(stats["action"]["mean"][0], np.average(train_values, weights=counts), rtol=1e-5)
    assert set(stats) == {"state", "action"} and len(stats["action"]["std"]) == 6


def test_stats_floor_the_std_of_joints_that_never_move(tmp_path: Path) -> None:
    c = DemoContent(images={cam: [(10**9 + k * 33_333_333, np.zeros((8, 8, 3), np.uint8)) for k in range(31)]
                            for cam in ("wrist", "top")},
                    states=[(10**9 + k * 10_000_000, JOINT_NAMES, [0.2] * 6) for k in range(101)],
                    trajectories=[(10**9, 0, JOINT_NAMES, [(0.05, [0.2] * 6)])])
    write_bag(tmp_path / "still", c, instruction="stay")
    episodes, _ = load_episodes([tmp_path / "still"], CFG, tmp_path / "cache")
    stats = compute_stats(episodes)
    assert stats["state"]["std"] == [MIN_STD] * 6 and stats["action"]["std"] == [MIN_STD] * 6


def test_batches_cover_every_sample_once_per_epoch(bags: Path, tmp_path: Path) -> None:
    episodes, report = load_episodes([bags], CFG, tmp_path / "cache")
    samples = SampleSet(episodes, CFG)
    assert len(samples) == report.samples
    seen = []
    for batch in samples.batches(batch_size=7, shuffle=True, seed=1, infinite=False):
        assert batch["images"].shape[1:] == (2, 16, 16, 3) and batch["actions"].shape[1:] == (20, 6)
        assert len(batch["instruction"]) == batch["state"].shape[0]
        seen.append(batch["state"].numpy())
    all_states = np.concatenate(seen)
    assert len(all_states) == len(samples)
    expected = np.concatenate([e.state[e.sample_steps] for e in episodes])
    np.testing.assert_array_equal(np.sort(all_states, axis=0), np.sort(expected, axis=0))
