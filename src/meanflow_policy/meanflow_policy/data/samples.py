"""Training samples of cached episodes: train/validation split, normalisation stats, vectorised batches."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from so101_common.phrasings import draw_phrasings
from meanflow_policy.data.sync import DatasetError, Episode, SyncConfig
from meanflow_policy.units import MIN_STD


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


# Shortest window over which an idle start is judged: over one or two steps even a real, slow start (0.02 rad per
# step is 0.6 rad/s) looks idle, and every sample of a one-step-chunk run (ablation Table IV) would be left out.
IDLE_MIN_WINDOW_S = 0.3


def idle_horizon(chunk_size: int, fps: float) -> int:
    """Steps ahead over which ``idle_start`` judges motion: half a chunk (what so101-eval executes per
    observation), at least ``IDLE_MIN_WINDOW_S``."""
    return max(chunk_size // 2, round(IDLE_MIN_WINDOW_S * fps), 1)


def idle_steps(episode: Episode, horizon: int, tolerance_rad: float) -> np.ndarray:
    """(steps,) bool: whether the step's next ``horizon`` commands keep every joint within ``tolerance_rad`` of the
    step's own command (a "stay here" label). ``horizon``: ``idle_horizon``."""
    if horizon < 1:
        raise ValueError(f"idle_start: horizon must be >= 1 step, got {horizon} (a window of one command never moves)")
    action = np.asarray(episode.action)
    n = len(action)
    idle = np.ones(n, dtype=bool)
    for k in range(1, horizon + 1):  # window row k against row 0, for every start at once
        idle[:n - k] &= np.abs(action[k:] - action[:n - k]).max(axis=1) <= tolerance_rad
    return idle


def idle_pauses(episode: Episode, horizon: int, tolerance_rad: float) -> np.ndarray:
    """(steps,) bool: the idle steps (``idle_steps``) before the episode's last move: its idle start and its
    pauses, not its still end (once the task is done, "stay" is the right label: a stacked toy must rest 0.5 s)."""
    idle = idle_steps(episode, horizon, tolerance_rad)
    moving = np.flatnonzero(~idle)
    return idle & (np.arange(len(idle)) < (moving[-1] if moving.size else 0))


def idle_start(episode: Episode, horizon: int, tolerance_rad: float) -> int:
    """First step whose next ``horizon`` commands move some joint more than ``tolerance_rad`` (the episode's length
    when none does): the steps before it are an idle start.

    Why: an episode that begins at rest (an operator who has not moved yet, or a scripted expert taking over a
    recovery episode with a slow re-alignment) labels its first states "stay here"; the state holds no velocity, so
    a policy that reaches such a state again is told to stay, observes the same state and stalls for good.
    ``horizon``: ``idle_horizon``."""
    idle = idle_steps(episode, horizon, tolerance_rad)
    return int(np.argmin(idle)) if not idle.all() else len(idle)


class SampleSet:
    """All samples of some episodes; ``batch(rows)`` gathers a training batch with vectorised numpy.

    ``phrasing_seed`` (None: off) replaces each sample's recorded instruction by one of its task's training
    phrasings (so101_common/phrasings.py), drawn from the seed and the batch's rows: the same batch gets the
    same phrasings, so a resumed run sees exactly the data the uninterrupted one would have.

    ``idle_start_rad`` > 0 leaves out each episode's idle start (``idle_start``): the leading samples whose next
    ``idle_horizon`` commands stay within that many radians; with ``idle_anywhere`` every such sample before the
    episode's last move (``idle_pauses``: a policy's own pauses in self-imitation episodes too)."""

    def __init__(self, episodes: Sequence[Episode], cfg: SyncConfig, phrasing_seed: int | None = None,
                 idle_start_rad: float = 0.0, idle_anywhere: bool = False) -> None:
        if not episodes:
            raise DatasetError("no episodes given")
        if idle_start_rad < 0:
            raise ValueError(f"idle_start_rad must be >= 0, got {idle_start_rad}")
        self.episodes = list(episodes)
        self.cfg = cfg
        self.chunk_size = cfg.chunk_size
        self.phrasing_seed = phrasing_seed
        lengths = np.array([len(e.times_ns) for e in self.episodes])
        self._offset = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._length = lengths
        self._state = np.concatenate([np.asarray(e.state) for e in self.episodes])
        self._action = np.concatenate([np.asarray(e.action) for e in self.episodes])
        self._valid = np.concatenate([np.asarray(e.action_valid) for e in self.episodes])
        self._frame_index = np.concatenate([np.asarray(e.frame_index) for e in self.episodes])
        steps = [e.sample_steps for e in self.episodes]
        every = sum(s.size for s in steps)
        if idle_start_rad > 0:
            horizon = idle_horizon(self.chunk_size, cfg.fps)
            if idle_anywhere:
                steps = [s[~idle_pauses(e, horizon, idle_start_rad)[s]] for e, s in zip(self.episodes, steps)]
            else:
                steps = [s[s >= idle_start(e, horizon, idle_start_rad)] for e, s in zip(self.episodes, steps)]
        self.sample_episode = np.concatenate([np.full(len(s), i) for i, s in enumerate(steps)]).astype(np.int64)
        self.sample_step = np.concatenate(steps).astype(np.int64)
        self.idle_samples = int(every - self.sample_step.size)  # left out as idle
        # Each episode's first kept step: where its start (start_weighted_rows) begins.
        self._first_step = np.array([s[0] if s.size else 0 for s in steps], dtype=np.int64)
        if len(self) == 0:
            raise DatasetError("the episodes contain no samples" + (
                f" that move (every one starts idle: commands within {idle_start_rad} rad)" if idle_start_rad else ""))

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
        recorded = [self.episodes[e].instruction for e in ep]
        instructions = recorded
        if self.phrasing_seed is not None:
            rng = np.random.default_rng([self.phrasing_seed, *rows.tolist()])
            instructions = draw_phrasings(recorded, rng)
        out = {
            "state": torch.from_numpy(self._state[g].astype(np.float32)),
            "actions": torch.from_numpy(actions.astype(np.float32)),
            "action_is_pad": torch.from_numpy(pad),
            "instruction": instructions,
            "recorded_instruction": recorded,  # the sentence of the demo (the phrasing's label)
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

    def start_weighted_rows(self, window_s: float, repeat: int) -> np.ndarray:
        """Every sample row, those of each episode's first ``window_s`` seconds ``repeat`` times (for a sampler).

        Why: after its first second an episode's state and images already show where the arm is heading, so only
        its start makes a policy read the instruction that decides it; at one draw per sample that start is ~10 %
        of the data (a recovery episode's start is its hand-over: the correction). The window counts from each
        episode's first kept sample (after an idle start is dropped)."""
        if repeat < 1 or window_s < 0:
            raise ValueError(f"need repeat >= 1 and window_s >= 0, got {repeat}, {window_s}")
        start = self.sample_step - self._first_step[self.sample_episode] < round(window_s * self.cfg.fps)
        return np.repeat(np.arange(len(self)), np.where(start, repeat, 1))

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
