"""Closed-loop episodes with any policy: a callable observation -> action chunk (chunk_size, 6) in radians.

Each chunk is executed the way the policy node publishes it to joint_trajectory_controller: point i is the
target at (i + 1) control periods after the observation, followed by the shared TrajectoryFollower. The next
observation is taken after ``action_steps`` control steps; the new chunk replaces the rest of the old one.
Simulated time stands still while the policy computes (in-process), so the measured latency is reported,
not simulated.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from so101_common.graph import CAMERA_NAMES, GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_common.handoff import (DEFAULT_AVERAGE, DEFAULT_CANDIDATES, DEFAULT_CHUNK_SMOOTHING, resolve_average,
                                  rtc_guide, smooth_chunk)
from so101_sim.env import SimEnv

GRIPPER = [JOINT_NAMES.index(GRIPPER_JOINT_NAME)]  # a guide leaves it free (so101_common.handoff)

Policy = Callable[[dict], np.ndarray]
# Control steps executed from each chunk before the next observation (half of a 20-step chunk), everywhere the sim
# runs a policy (so101-eval, recovery collection, real-time evaluation): the states a recovery round collects are
# those the evaluation reaches. Other values measured no better (docs/notes/multitask_training.md, "Executed steps
# per chunk").
DEFAULT_ACTION_STEPS = 10
FrameSink = Callable[[dict[str, np.ndarray]], None]


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--candidates`` / ``--average`` (coherent sampling), the same in every tool that runs a checkpoint policy in
    the sim; resolve them with :func:`resolve_sampling_arguments`."""
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help="chunks a checkpoint policy draws per inference, keeping those that best continue the "
                        "plan being executed (1: a single draw per chunk; default %(default)s)")
    parser.add_argument("--average", type=int, default=None,
                        help="how many of the candidates closest to the plan are averaged into the chunk used "
                        f"(1: the closest alone; default {DEFAULT_AVERAGE}, at most --candidates)")


def _passes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 passes, got {value}")
    return value


def add_chunk_smoothing_argument(parser: argparse.ArgumentParser) -> None:
    """``--chunk-smoothing PASSES`` (so101_common.handoff.smooth_chunk), the same in so101-eval and
    so101-eval-realtime."""
    parser.add_argument("--chunk-smoothing", type=_passes, default=DEFAULT_CHUNK_SMOOTHING, metavar="PASSES",
                        help="passes of the [1, 2, 1]/4 filter along each chunk's rows (arm joints; the gripper as "
                             "made) before the arm executes it: a one-step policy's row-to-row jitter removed "
                             "(0: off; default %(default)s)")


def resolve_sampling_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.average`` resolved against ``args.candidates``; a bad pair is one parser error (exit 2)."""
    try:
        args.average = resolve_average(args.average, args.candidates)
    except ValueError as exc:
        parser.error(f"--candidates / --average: {exc}")


class PolicyOutputError(ValueError):
    """The policy returned something that is not a finite (chunk, 6) array."""


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    sim_seconds: float
    chunks: int
    chunk_latency_ms: list[float] = field(default_factory=list)
    # The task's partial credit at the end (success = 1.0) and, for tasks whose instruction decides what to do,
    # whether the policy moved the object(s) the instruction names (None where it does not apply).
    score: float = 0.0
    instruction_followed: bool | None = None
    # Whether a DwellWatch (so101_sim.dwell) watched the run, and the control step at which it first saw the policy
    # dwell at a grasp (None: never).
    dwell_watched: bool = False
    dwell_step: int | None = None
    # Whether a HoldWatch watched the run, and the control step at which it first saw the policy hold an object
    # over its place without lowering it (None: never).
    hold_watched: bool = False
    hold_step: int | None = None
    # Where each object was first caught (so101_sim.dwell.GraspWatch); None: not watched.
    grasps: list[dict] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_chunk(chunk: object) -> np.ndarray:
    arr = np.asarray(chunk, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(JOINT_NAMES) or arr.shape[0] < 1:
        raise PolicyOutputError(f"policy returned shape {arr.shape}; expected (chunk_size, {len(JOINT_NAMES)})")
    if not np.all(np.isfinite(arr)):
        raise PolicyOutputError("policy returned NaN or inf in its action chunk")
    return arr


def run_episode(env: SimEnv, policy: Policy, seed: int, max_steps: int, action_steps: int,
                instruction: str | None = None, on_frame: FrameSink | None = None,
                latency_of: Callable[[], float | None] | None = None, guide_plan: bool = False,
                after_step: Callable[[], None] | None = None,
                chunk_smoothing: int = DEFAULT_CHUNK_SMOOTHING) -> EpisodeResult:
    """Reset to ``seed`` and run until success or ``max_steps`` control steps.

    ``on_frame`` receives the rendered camera images after every control step (for videos).
    ``latency_of`` returns the policy's own latency figure for the last call (e.g. from
    ``policy.last_timing``); without it the wall time of the call is used. ``guide_plan``: every observation
    after the first carries ``guide``, the unexecuted rest of the last chunk (so101_common.handoff.rtc_guide), for
    a policy that draws several chunks and keeps the one that continues it. ``after_step`` is called after every
    control step (a watch such as so101_sim.dwell.DwellWatch; it may raise to end the run there).
    ``chunk_smoothing``: passes of so101_common.handoff.smooth_chunk over each chunk before it runs (0: as made).
    """
    if max_steps < 1 or action_steps < 1:
        raise ValueError(f"max_steps and action_steps must be >= 1, got {max_steps}, {action_steps}")
    env.reset(seed)
    dt = env.cfg.control_dt
    latencies: list[float] = []
    success = False
    steps = 0
    obs = env.observation(instruction)
    if on_frame is not None:
        on_frame(obs["images"])
    chunk = None
    while steps < max_steps and not success:
        started = time.perf_counter()
        if guide_plan and chunk is not None:
            obs["guide"] = rtc_guide(chunk, action_steps, 0, len(chunk), action_steps, GRIPPER)
        chunk = smooth_chunk(check_chunk(policy(obs)), chunk_smoothing, GRIPPER)
        wall_ms = (time.perf_counter() - started) * 1e3
        reported = latency_of() if latency_of is not None else None
        latencies.append(float(reported) if reported is not None else wall_ms)
        env.set_trajectory(JOINT_NAMES, dt * np.arange(1, len(chunk) + 1), chunk)
        for _ in range(min(action_steps, len(chunk), max_steps - steps)):
            env.step()
            steps += 1
            if after_step is not None:
                after_step()
            success = env.success()
            if on_frame is not None:
                on_frame(env.render(CAMERA_NAMES))
            if success:
                break
        if not success and steps < max_steps:
            obs = env.observation(instruction)
    return EpisodeResult(seed=seed, success=success, steps=steps, sim_seconds=steps * dt, chunks=len(latencies),
                         chunk_latency_ms=latencies, score=env.score(),
                         instruction_followed=env.instruction_followed())


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (sane at 0 % and 100 %, unlike the normal one)."""
    if n <= 0:
        raise ValueError("no episodes")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {"count": 0}
    arr = np.asarray(latencies_ms)
    return {"count": int(arr.size), "mean_ms": float(arr.mean()), "median_ms": float(np.median(arr)),
            "p90_ms": float(np.percentile(arr, 90)), "max_ms": float(arr.max())}
