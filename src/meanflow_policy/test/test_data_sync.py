"""Exact synchronisation of real rosbag2 episodes: which frame, state and targets land in which sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meanflow_policy.data.bag_reader import EPISODE_FILE, BagError
from meanflow_policy.data.cache import load_episode
from meanflow_policy.data.samples import SampleSet
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.data.demo_bags import DemoContent, write_bag
from so101_common import episode_bag
from so101_common.graph import JOINT_NAMES

T0 = 5_000_000_000
MS = 1_000_000
S0 = 0.1 * np.arange(6)  # joint state at t=0
P1 = np.array([0.3, -0.5, 0.8, 0.2, -0.4, 0.9])
P2 = np.array([-0.2, 0.4, -0.6, 0.7, 0.5, 0.1])
# 10 Hz grid, 50 ms freshness: the grid starts at 10 ms (first wrist frame) and ends at 1000 ms (last state).
CFG = SyncConfig(fps=10.0, image_size=8, max_image_age_s=0.05, max_state_age_s=0.05, chunk_size=4)


def _uniform(value: int) -> np.ndarray:
    return np.full((12, 16, 3), value, dtype=np.uint8)


def handmade_content(drop_wrist_frame: int | None = 6) -> DemoContent:
    """wrist frame k at 10+100k ms (value 10+k), top frame k at 50k ms (value 100+k), states every 20 ms
    (state m = 0.01 m + S0), one trajectory received at 200 ms: P1 at +0.2 s, P2 at +0.4 s."""
    c = DemoContent()
    c.images["wrist"] = [(T0 + (10 + 100 * k) * MS, _uniform(10 + k)) for k in range(10) if k != drop_wrist_frame]
    c.images["top"] = [(T0 + 50 * k * MS, _uniform(100 + k)) for k in range(20)]
    c.states = [(T0 + 20 * m * MS, JOINT_NAMES, S0 + 0.01 * m) for m in range(51)]
    c.trajectories = [(T0 + 200 * MS, 0, JOINT_NAMES, [(0.2, P1), (0.4, P2)])]
    return c


def expected_target(t_ms: float) -> np.ndarray:
    """What the controller tracked: hold S0 until 200 ms, then S0 -> P1 by 400 ms, P1 -> P2 by 600 ms."""
    if t_ms <= 200:
        return S0
    if t_ms <= 400:
        return S0 + (t_ms - 200) / 200 * (P1 - S0)
    if t_ms <= 600:
        return P1 + (t_ms - 400) / 200 * (P2 - P1)
    return P2


def check_handmade(ep) -> None:
    n = 10
    assert len(ep.times_ns) == n
    np.testing.assert_array_equal(ep.times_ns, T0 + (10 + 100 * np.arange(n)) * MS)
    # wrist frame 6 is missing: step 6 sees frame 5 (100 ms old) -> dropped; step 9 has no next target.
    np.testing.assert_array_equal(ep.sample_steps, [0, 1, 2, 3, 4, 5, 7, 8])
    assert ep.report.dropped_stale == {"joint_states": 0, "wrist": 1, "top": 0}
    assert ep.report.samples == 8 and ep.report.dropped_no_action == 1
    np.testing.assert_array_equal(ep.action_valid, [True] * 9 + [False])
    for k in ep.sample_steps:
        wrist = ep.frames["wrist"][ep.frame_index[k, 0]]
        top = ep.frames["top"][ep.frame_index[k, 1]]
        assert wrist.shape == (8, 8, 3) and top.shape == (8, 8, 3)
        assert np.all(wrist == 10 + k), f"step {k}: wrist frame {wrist[0, 0, 0] - 10}"
        assert np.all(top == 100 + 2 * k), f"step {k}: top frame {top[0, 0, 0] - 100}"
        np.testing.assert_allclose(ep.state[k], S0 + 0.05 * k, atol=1e-6)  # state m = 5k (10 ms old)
    for k in range(9):
        np.testing.assert_allclose(ep.action[k], expected_target(110 + 100 * k), atol=1e-6, err_msg=f"action {k}")


def test_episode_alignment_is_exact(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "ep", handmade_content(), instruction="  stack the blocks ")
    ep = load_episode(bag, CFG, tmp_path / "cache")
    assert ep.instruction == "stack the blocks"
    check_handmade(ep)
    samples = SampleSet([ep], CFG)
    assert len(samples) == 8
    batch = samples.batch(np.arange(8))
    assert tuple(batch["images"].shape) == (8, 2, 8, 8, 3) and batch["images"].dtype.is_floating_point is False
    steps = [0, 1, 2, 3, 4, 5, 7, 8]
    assert [int(v) for v in batch["images"][:, 0, 0, 0, 0]] == [10 + k for k in steps]
    # chunk of step 7: a7, a8, then two pads repeating a8
    actions, pad = batch["actions"][6].numpy(), batch["action_is_pad"][6].numpy()
    np.testing.assert_array_equal(pad, [False, False, True, True])
    np.testing.assert_allclose(actions[0], expected_target(810), atol=1e-6)
    np.testing.assert_allclose(actions[2:], np.stack([expected_target(910)] * 2), atol=1e-6)
    # chunk of step 0 spans the trajectory's ramp, no pads
    assert not batch["action_is_pad"][0].any()
    np.testing.assert_allclose(batch["actions"][0].numpy(),
                               np.stack([expected_target(t) for t in (110, 210, 310, 410)]), atol=1e-6)
    # chunk of step 5 ends at a8 (no pad); step 8: a8, then the invalid last action and two steps past the end
    assert not batch["action_is_pad"][5].any()
    np.testing.assert_array_equal(batch["action_is_pad"][7].numpy(), [False, True, True, True])


def test_plain_sqlite3_bag_gives_the_same_samples(tmp_path: Path) -> None:
    """Any rosbag2 works: sqlite3 storage, no episode.json, instruction from the override."""
    bag = write_bag(tmp_path / "plain", handmade_content(), instruction=None, storage="sqlite3")
    assert any(p.suffix == ".db3" for p in bag.iterdir()) and not (bag / "episode.json").exists()
    with pytest.raises(BagError, match="no episode.json.*--instruction"):
        load_episode(bag, CFG, tmp_path / "cache")
    ep = load_episode(bag, SyncConfig(**{**CFG.__dict__, "instruction": "wave"}), tmp_path / "cache")
    assert ep.instruction == "wave"
    check_handmade(ep)


def test_next_state_actions(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "ep", handmade_content(drop_wrist_frame=None), instruction="reach")
    ep = load_episode(bag, SyncConfig(**{**CFG.__dict__, "action_source": "next_state"}), tmp_path / "cache")
    np.testing.assert_array_equal(ep.sample_steps, np.arange(9))
    for k in range(9):  # a_k = joint state at the next grid time (110 + 100 k ms -> state m = 5k + 5)
        np.testing.assert_allclose(ep.action[k], S0 + 0.05 * (k + 1), atol=1e-6)


def test_header_clock_uses_message_stamps(tmp_path: Path) -> None:
    """Bag times lag the header stamps by 30 ms (transport); with clock=header the stamps decide the frame."""
    content = handmade_content(drop_wrist_frame=None)
    lagged = DemoContent(images={cam: [(t + 30 * MS, img) for t, img in frames]
                                 for cam, frames in content.images.items()},
                         states=content.states, trajectories=content.trajectories)
    bag = write_bag(tmp_path / "ep", lagged, instruction="reach")
    header = load_episode(bag, SyncConfig(**{**CFG.__dict__, "clock": "header"}), tmp_path / "cache")
    for k in header.sample_steps:
        assert header.frames["wrist"][header.frame_index[k, 0]][0, 0, 0] == 10 + k
    by_bag = load_episode(bag, CFG, tmp_path / "cache")
    # on receive time the grid starts at 40 ms and step k at 40+100k sees wrist frame k (30 ms old): frame k
    np.testing.assert_array_equal(by_bag.times_ns[:2], T0 + np.array([40, 140]) * MS)
    assert header.key != by_bag.key


def test_episode_file_name_is_the_recorders() -> None:
    """bag_reader repeats the name to stay importable without rosbags; it must not drift."""
    assert EPISODE_FILE == episode_bag.EPISODE_FILE
