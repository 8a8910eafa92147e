"""Chunk hand-off: how a new action chunk takes over from the one the arm is executing (numpy only, no ROS).

The policy node and the sim's real-time evaluation share this core. Time is counted in control steps. A chunk
computed from the observation of step ``s`` holds the targets of steps ``s + 1 .. s + T`` (row k at s + k + 1).
While the policy computes, the arm keeps executing the old command sequence (and holds its last row when it runs
out), so a new chunk arrives ``delay`` steps after its observation: its first ``delay`` rows are already in the
past. :func:`hand_off` turns (old sequence, where execution is, new chunk, delay) into the command sequence from
the next step on:

- ``replace``: the latency-compensated switch: skip the ``delay`` rows already elapsed, then the new chunk as is.
- ``blend``: over the overlap with the rest of the old sequence, a weighted average whose weight on the new chunk
  ramps linearly from 1/(n+1) to n/(n+1) (LeRobot's async aggregation, with a ramp instead of a fixed weight);
  after the overlap, the new chunk.
- ``rtc`` ("RTC-lite", model-free): the new chunk plus a correction that makes it continue the committed plan:
  at the next step the correction is the offset between the old plan's and the new chunk's target, and it fades
  to zero with a minimum-jerk profile (no slope or curvature at either end) over ``rtc_horizon`` steps, or more
  when the offset is large (an arm that held while the new chunk moved on): the fade's peak acceleration,
  5.77 offset / horizon^2, stays within ``max_step / 8`` per step^2. A sequence shorter than the horizon is
  extended by holding its last row. The first command is exactly the old plan's; past the horizon the new chunk
  runs unchanged. Joints named in ``rtc_exempt`` (the gripper: an open/close decision that must not come late)
  are not corrected: they switch as in ``replace``. Matching the old plan's velocity as well (a Hermite fade) was
  tried and dropped: with the model's chunks it cost success (docs/notes/realtime_experiments.md). This is not the
  RTC paper's inpainting (the model generating the chunk conditioned on the committed prefix); it is the correction such
  guidance aims at, applied after the fact. With ``committed`` rows (a policy given the plan's next rows as
  committed, rtc_guide) the rows not yet past run as planned and the correction starts where the chunk takes over
  after them, as if the chunk had taken that long to compute. Without the correction (``rtc_correct`` false)
  ``rtc`` is the RTC paper's execution: the committed rows, then the new chunk as the model generated it (which
  guidance made continue them).

Whatever the mode, no command moves a joint by more than ``max_step`` rad from the one before it (the first
command from the last one sent): larger steps are limited and counted, and the sequence is extended until it
reaches its last row, so a hand-off can never jerk the arm and still ends where the new chunk does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HANDOFF_MODES = ("replace", "blend", "rtc")
# rad per control step (7.5 rad/s at 30 Hz): above every step the scripted demos take (the gripper's up to 0.18)
DEFAULT_MAX_STEP = 0.25
# Steps over which rtc fades its correction (at least). Short: the correction must be over before the next
# hand-off, or the arm lags the policy for good (measured: docs/notes/realtime_experiments.md).
DEFAULT_RTC_HORIZON = 4
# Whether rtc first steers each chunk onto what the arm executes while it is computed (rtc_guide; a checkpoint
# policy's noise-space guidance). Off: with the shipped policy it succeeds as often as the correction alone, within
# the noise of 50 episodes, at 3-5x the expert time (docs/realtime.md, "rtc guidance").
DEFAULT_RTC_GUIDANCE = False
# Whether rtc fades the offset between the plan and the new chunk (above). Off is the RTC paper's execution, for a
# policy whose guided chunks already continue the plan: with the flow-matching pair at 284 ms it kept replace's
# success (95 / 96 of 100) at 0.49x its boundary acceleration, where the correction on top cost 10 successes
# (docs/notes/realtime_experiments.md, "The RTC paper's guided denoising"). On: the correction is what smooths
# unguided chunks.
DEFAULT_RTC_CORRECTION = True

# Chunks a policy draws per inference when it is given the plan being executed (rtc_guide), and how many of those
# closest to it are averaged into the chunk used (coherent sampling). One-step sampling makes the extra draws
# nearly free: one batched expert pass on a prefix computed once. Measured on the shipped multi-task policy (mean
# score, seeds 1000-1049; docs/results.md, "Coherent sampling"): one draw 0.79; the closest of 4 0.86, of 8 0.83, of
# 32 0.76; the mean of the 2 closest of 8 0.89 (the closest draws share a mode; their mean keeps it and loses their
# jitter); over three seed blocks one draw 0.81, the mean of the 2 closest of 8 0.85.
DEFAULT_CANDIDATES = 8
DEFAULT_AVERAGE = 2


def resolve_average(average: int | None, candidates: int) -> int:
    """The candidates to average: ``average``, or by default ``DEFAULT_AVERAGE`` (at most ``candidates``, so that
    one candidate means one plain draw); a count outside 1..candidates is refused."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if average is None:
        return min(DEFAULT_AVERAGE, candidates)
    if not 1 <= average <= candidates:
        raise ValueError(f"average must be within 1..candidates ({candidates}), got {average}")
    return average


class HandoffError(ValueError):
    """Inputs a hand-off cannot use (unknown mode, wrong shapes, non-finite values, negative delay)."""


# Passes of the [1, 2, 1] / 4 filter that smooth_chunk runs along a chunk's rows by default: 0, every chunk as the
# policy made it (every result before the thirty-fourth session).
DEFAULT_CHUNK_SMOOTHING = 0


def smooth_chunk(chunk: np.ndarray, passes: int, exempt: Sequence[int] = ()) -> np.ndarray:
    """``chunk`` (T, J) low-pass filtered along time: ``passes`` passes of the binomial kernel [1, 2, 1] / 4 (about a
    Gaussian of sigma sqrt(passes / 2) steps), each end padded by point reflection, so a chunk that moves at constant
    velocity comes back unchanged and its ends keep their place and slope. Joints in ``exempt`` (the gripper: an
    open/close decision, not a path) are left as they are. Why: a one-step policy's chunk carries row-to-row jitter
    that a position-controlled arm turns into acceleration everywhere, not only where chunks hand over
    (docs/realtime.md, "Chunk smoothing")."""
    if passes < 0:
        raise HandoffError(f"chunk smoothing passes must be >= 0, got {passes}")
    out = np.array(chunk, dtype=np.float64)
    if out.ndim != 2:
        raise HandoffError(f"chunk must be (steps, joints), got shape {out.shape}")
    if passes == 0 or len(out) < 3:
        return out
    keep = [j for j in range(out.shape[1]) if j not in set(exempt)]
    x = out[:, keep]
    for _ in range(passes):
        padded = np.concatenate([2 * x[:1] - x[1:2], x, 2 * x[-1:] - x[-2:-1]])
        x = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    out[:, keep] = x
    return out


@dataclass(frozen=True)
class Handoff:
    """The command sequence from the next control step on (one row per step) and what the hand-off did."""

    commands: np.ndarray
    skipped: int  # rows of the new chunk already in the past (``delay``, at most the chunk length)
    overlap: int  # rows mixed with the old plan (blend) or pulled onto it (rtc; 0 without the correction)
    limited: int  # joint values changed by the max_step limit
    stale: bool  # every row of the new chunk was in the past: its last row is the target


# The rtc fade's peak acceleration (minimum jerk: 5.77 offset / horizon^2) is kept within max_step / this.
RTC_ACCEL_DIVISOR = 8.0


def rtc_horizon_for(offset: np.ndarray, max_step: float, rtc_horizon: int) -> int:
    """Steps over which an rtc correction of ``offset`` fades: ``rtc_horizon``, or more for a large offset."""
    needed = np.sqrt(5.77 * float(np.max(np.abs(offset))) * RTC_ACCEL_DIVISOR / max_step)
    return max(rtc_horizon, int(np.ceil(needed - 1e-9)))


def rtc_correction(offset: np.ndarray, n: int, horizon: int) -> np.ndarray:
    """(n, J) correction that starts at ``offset`` and fades to zero at ``horizon`` steps with a minimum-jerk
    profile (flat at both ends: no velocity or acceleration step where it starts or ends)."""
    tau = np.minimum(np.arange(n) / horizon, 1.0)[:, None]
    return offset[None, :] * (1.0 - (10 * tau**3 - 15 * tau**4 + 6 * tau**5))


def rtc_guide(sequence: np.ndarray, reached: int, delay: int, chunk_size: int, execute: int,
              exempt: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """What real-time chunking asks of a chunk whose computation starts now (RTC's soft prefix mask).

    Target: the next ``chunk_size`` rows of the sequence being executed (``reached`` of its rows commanded; beyond
    its end the arm holds its last row): row k is the target of the step the chunk's row k is for. Weights, per row
    and joint: 1 over the ``delay`` rows the arm executes while the chunk is computed, then decaying exponentially
    to 0 at row ``chunk_size - execute`` (the last row the next chunk may still overlap), 0 from there on, and 0 for
    the ``exempt`` joints (the gripper: its open/close decision is the new chunk's, as in the hand-off).
    """
    sequence = _check("current sequence", sequence, 2)
    if chunk_size < 1 or delay < 0 or execute < 1 or reached < 0:
        raise HandoffError(f"rtc_guide needs chunk_size, execute >= 1 and delay, reached >= 0, got {chunk_size}, "
                           f"{execute}, {delay}, {reached}")
    rest = sequence[min(reached, len(sequence)):]
    if len(rest) == 0:
        rest = sequence[-1:]
    target = np.concatenate([rest, np.repeat(rest[-1:], max(0, chunk_size - len(rest)), axis=0)])[:chunk_size]
    rows = np.zeros(chunk_size)
    d = min(delay, chunk_size)
    rows[:d] = 1.0
    free = max(d, chunk_size - execute)
    c = (free - np.arange(d, free)) / (free - d + 1)
    rows[d:free] = c * np.expm1(c) / np.expm1(1.0)
    weights = np.repeat(rows[:, None], sequence.shape[1], axis=1)
    weights[:, list(exempt)] = 0.0
    return target, weights


def limit_steps(commands: np.ndarray, last: np.ndarray, max_step: float) -> tuple[np.ndarray, int]:
    """Each row at most ``max_step`` per joint from the row before (the first from ``last``); returns the
    limited rows and how many values were changed.

    Rows are appended (each a ``max_step`` closer) until the last row is reached: the arm holds the last row of
    a sequence, and must hold the target, not wherever the limit left it.
    """
    out = []
    prev = np.asarray(last, dtype=np.float64)
    limited = 0
    for row in commands:
        step = row - prev
        clipped = np.clip(step, -max_step, max_step)
        limited += int(np.count_nonzero(clipped != step))
        prev = prev + clipped
        out.append(prev)
    extra = int(np.ceil(np.max(np.abs(commands[-1] - prev)) / max_step - 1e-9))
    for _ in range(extra):
        prev = prev + np.clip(commands[-1] - prev, -max_step, max_step)
        out.append(prev)
    return np.asarray(out), limited


def _check(name: str, arr: object, ndim: int) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != ndim or a.size == 0:
        raise HandoffError(f"{name} must be a non-empty {ndim}-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise HandoffError(f"{name} contains NaN or inf")
    return a


def hand_off(mode: str, current: np.ndarray, reached: int, new: np.ndarray, delay: int,
             last_command: np.ndarray | None = None, max_step: float = DEFAULT_MAX_STEP,
             rtc_horizon: int = DEFAULT_RTC_HORIZON, rtc_exempt: Sequence[int] = (), committed: int = 0,
             rtc_correct: bool = DEFAULT_RTC_CORRECTION) -> Handoff:
    """The commands from the next step on when ``new`` takes over.

    ``current`` (n, J) is the sequence being executed, one row per step, of which ``reached`` rows were already
    commanded (beyond its end the arm holds its last row). ``new`` (T, J) was computed from an observation
    ``delay`` steps ago. ``last_command`` is the last target sent (default: ``current[reached - 1]``, or its last
    row once it is used up). ``rtc_exempt``: joint indices rtc does not correct (the gripper). ``committed``
    (rtc): the first rows of ``new`` were given to the policy as committed (rtc_guide): those not yet past are
    executed from the current sequence, and the correction starts where ``new`` takes over after them;
    ``rtc_correct`` false leaves ``new`` uncorrected after them.
    """
    if mode not in HANDOFF_MODES:
        raise HandoffError(f"unknown hand-off mode {mode!r}; expected one of {', '.join(HANDOFF_MODES)}")
    current = _check("current sequence", current, 2)
    new = _check("new chunk", new, 2)
    if new.shape[1] != current.shape[1]:
        raise HandoffError(f"new chunk has {new.shape[1]} joints, the current sequence {current.shape[1]}")
    if reached < 0 or delay < 0:
        raise HandoffError(f"reached and delay must be >= 0, got {reached}, {delay}")
    if committed < 0:
        raise HandoffError(f"committed must be >= 0, got {committed}")
    if not max_step > 0 or rtc_horizon < 1:
        raise HandoffError(f"max_step must be > 0 and rtc_horizon >= 1, got {max_step}, {rtc_horizon}")
    if last_command is None:
        if reached == 0:
            raise HandoffError("last_command is needed when no row of the current sequence was commanded")
        last_command = current[min(reached, len(current)) - 1]
    last = _check("last command", last_command, 1)
    if last.shape[0] != new.shape[1]:
        raise HandoffError(f"last command has {last.shape[0]} joints, the new chunk {new.shape[1]}")

    stale = delay >= len(new)
    ahead = new[-1:].copy() if stale else new[delay:].copy()
    skipped = min(delay, len(new))
    old_rest = current[reached:]
    overlap = 0
    if mode == "blend" and len(old_rest):
        overlap = min(len(old_rest), len(ahead))
        w = (np.arange(1, overlap + 1) / (overlap + 1))[:, None]
        ahead[:overlap] = (1 - w) * old_rest[:overlap] + w * ahead[:overlap]
    elif mode == "rtc":
        # Committed rows still ahead run as planned (held at its last row once the plan is used up).
        keep = min(max(0, committed - delay), len(ahead) - 1)
        planned = np.concatenate([old_rest, np.repeat((old_rest[-1:] if len(old_rest) else last[None, :]),
                                                      keep + 1, axis=0)])
        ahead[:keep] = planned[:keep]
        if rtc_correct:
            # The old plan's target for the step the new chunk takes over at, or the held position once it is used
            # up.
            offset = planned[keep] - ahead[keep]
            offset[list(rtc_exempt)] = 0.0
            overlap = rtc_horizon_for(offset, max_step, rtc_horizon)
            # A sequence shorter than the horizon is followed by a hold of its last row: the correction fades out
            # over that hold, so the arm still ends on the new chunk's target.
            if len(ahead) - keep <= overlap:
                ahead = np.concatenate([ahead, np.repeat(ahead[-1:], overlap + 1 - len(ahead) + keep, axis=0)])
            ahead[keep:] += rtc_correction(offset, len(ahead) - keep, overlap)
    commands, limited = limit_steps(ahead, last, max_step)
    return Handoff(commands=commands, skipped=skipped, overlap=overlap, limited=limited, stale=stale)


class CommandStream:
    """The command sequence being executed, one target per control step; holds its last row when used up.

    The sim's real-time evaluation advances it once per control step. (The policy node does not step: it samples
    the trajectory it published on the new chunk's time grid, meanflow_policy.ros.runtime.Handoffs.)
    """

    def __init__(self, start: np.ndarray) -> None:
        self.sequence = _check("start position", start, 1)[None, :].copy()
        self.reached = 1  # the start position counts as commanded
        self.last = self.sequence[0].copy()

    @property
    def remaining(self) -> int:
        """Rows not yet commanded (0: the arm holds ``last``)."""
        return max(0, len(self.sequence) - self.reached)

    def advance(self) -> np.ndarray:
        """The target of the next control step."""
        if self.reached < len(self.sequence):
            self.last = self.sequence[self.reached].copy()
            self.reached += 1
        return self.last.copy()

    def truncate(self) -> None:
        """Stop after the current row: the arm holds the last command (synchronous inference waits this way)."""
        self.sequence = self.last[None, :].copy()
        self.reached = 1

    def take_over(self, mode: str, new: np.ndarray, delay: int, max_step: float = DEFAULT_MAX_STEP,
                  rtc_horizon: int = DEFAULT_RTC_HORIZON, rtc_exempt: Sequence[int] = (),
                  committed: int = 0, rtc_correct: bool = DEFAULT_RTC_CORRECTION) -> Handoff:
        """Hand off to ``new`` (computed ``delay`` steps ago; ``committed``, ``rtc_correct``: see hand_off); the
        stream then executes the result."""
        result = hand_off(mode, self.sequence, self.reached, new, delay, self.last, max_step, rtc_horizon,
                          rtc_exempt, committed, rtc_correct)
        self.sequence = result.commands
        self.reached = 0
        return result
