"""so101-eval-realtime: closed-loop evaluation in which sim time advances while the policy computes.

``so101-eval`` stops the world while the policy runs, so a 100x slower sampler scores the same. Here each chunk
becomes usable only ``latency`` after its observation (injected in ms: deterministic, same seeds -> same result;
or the policy's measured latency); meanwhile the arm executes what it was last given and holds its last target
when that runs out. How the new chunk takes over is the hand-off (so101_common.handoff, shared with the policy
node):

- ``sync``: the arm stops when the next observation is taken (after ``action_steps``) and waits, holding, until
  the chunk is ready; the chunk then runs from its first row (synchronous inference on a real arm).
- ``replace`` / ``blend`` / ``rtc``: asynchronous: the next inference starts ``action_steps`` after the previous
  one started (or as soon as the executed sequence has no more rows left than the last latency), the arm keeps
  moving, and the chunk takes over with that hand-off mode.

With a latency of 0 ms, ``sync`` and ``replace`` execute exactly what ``so101-eval`` does. Per episode: hand-off
count, the largest arm-joint acceleration measured in the 3 control steps after each hand-off (rad/s^2), the
commanded acceleration across it, the largest commanded jump between two control steps, and the steps the arm
held for want of a chunk. The run's folder gets the table, the rows as JSON and realtime.png (so101_sim.realtime_plot:
success and boundary acceleration against the injected latency).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from so101_common.graph import CAMERA_NAMES, GRIPPER_JOINT_NAME, JOINT_NAMES
from so101_common.provenance import provenance
from so101_common.handoff import (DEFAULT_CHUNK_SMOOTHING, DEFAULT_MAX_STEP, DEFAULT_RTC_CORRECTION,
                                  DEFAULT_RTC_GUIDANCE, DEFAULT_RTC_HORIZON, HANDOFF_MODES, CommandStream, rtc_guide,
                                  smooth_chunk)
from so101_sim.env import SimEnv
from so101_sim.evaluate import ExpertEvalPolicy, cached_env, cached_policy, close_envs
from so101_sim.policy_plugins import (SHIPPED_HELP, CheckpointPolicy, PolicyPluginError, resolve_checkpoint)
from so101_sim.rollout import (DEFAULT_ACTION_STEPS, GRIPPER, FrameSink, Policy, add_chunk_smoothing_argument,
                               add_sampling_arguments, check_chunk,
                               latency_summary, resolve_sampling_arguments, wilson_interval)
from so101_sim.tasks import TASKS

HANDOFFS = ("sync", *HANDOFF_MODES)
MEASURED = "measured"
ARM = [i for i, name in enumerate(JOINT_NAMES) if name != GRIPPER_JOINT_NAME]
ACCEL_WINDOW = 3  # control steps after a hand-off in which the measured acceleration is attributed to it


def latency_steps(latency_ms: float, dt: float) -> int:
    """Control steps until a chunk computed in ``latency_ms`` can be used (it applies at the next step boundary)."""
    return max(0, math.ceil(latency_ms / (1e3 * dt) - 1e-9))


@dataclass
class RealtimeEpisode:
    seed: int
    success: bool
    score: float
    steps: int
    chunks: int
    handoff_steps: list[int] = field(default_factory=list)
    boundary_accel_max: float = 0.0  # rad/s^2, measured, arm joints, ACCEL_WINDOW steps after each hand-off
    between_accel_max: float = 0.0  # rad/s^2, the same figure half way between consecutive hand-offs
    boundary_cmd_accel_max: float = 0.0  # rad/s^2, second differences of the commanded targets at b .. b+2
    handoff_jump_max: float = 0.0  # rad, largest change of a commanded target at a hand-off (any joint)
    cmd_jump_max: float = 0.0  # rad, largest change between two consecutive commanded targets in the episode
    held_steps: int = 0  # control steps the arm held its last target because no chunk was ready
    limited: int = 0  # target values limited by max_step at hand-offs
    stale_chunks: int = 0  # chunks that arrived with every row in the past
    chunk_latency_ms: list[float] = field(default_factory=list)  # measured, whatever latency was simulated
    commanded: list[list[float]] = field(default_factory=list)  # target of each control step (0 = start)

    def to_dict(self, with_trajectory: bool = False) -> dict:
        out = asdict(self)
        if not with_trajectory:
            out.pop("commanded")
        return out


def _window_accel(velocities: np.ndarray, start: int, dt: float) -> float:
    """Largest measured arm-joint acceleration in the ACCEL_WINDOW control steps after step ``start``."""
    end = min(start + ACCEL_WINDOW, len(velocities) - 1)
    return max((float(np.abs(velocities[k, ARM] - velocities[k - 1, ARM]).max()) / dt
                for k in range(start + 1, end + 1)), default=0.0)


def _smoothness(commanded: np.ndarray, velocities: np.ndarray, boundaries: list[int], dt: float) -> dict:
    """Acceleration and jump figures of one episode (``commanded``/``velocities`` indexed by control step).

    ``between_accel_max`` is the control for ``boundary_accel_max``: the same window half way between two
    consecutive hand-offs (at least 2 windows apart), where no hand-off acts. What the motion itself reaches there
    (grasps, releases, the plan's own turns) a hand-off cannot remove; what the boundary figure has above it is
    the hand-off's."""
    steps = len(commanded) - 1
    jumps = np.abs(np.diff(commanded, axis=0))
    out = {"cmd_jump_max": float(jumps.max()) if steps else 0.0, "handoff_jump_max": 0.0,
           "boundary_accel_max": 0.0, "boundary_cmd_accel_max": 0.0, "between_accel_max": 0.0}
    for a, b in zip(boundaries, boundaries[1:]):
        if b - a >= 2 * ACCEL_WINDOW:
            out["between_accel_max"] = max(out["between_accel_max"], _window_accel(velocities, (a + b) // 2, dt))
    for b in boundaries:
        if b + 1 > steps:
            continue
        out["handoff_jump_max"] = max(out["handoff_jump_max"], float(jumps[b].max()))
        for k in range(max(b, 1), min(b + ACCEL_WINDOW, steps)):  # second differences centred on b .. b+2
            second = commanded[k + 1, ARM] - 2 * commanded[k, ARM] + commanded[k - 1, ARM]
            out["boundary_cmd_accel_max"] = max(out["boundary_cmd_accel_max"], float(np.abs(second).max()) / dt**2)
        out["boundary_accel_max"] = max(out["boundary_accel_max"], _window_accel(velocities, b, dt))
    return out


def _due(handoff: str, steps: int, last_start: int | None, last_handoff: int, remaining: int,
         action_steps: int, last_delay: int) -> bool:
    """Whether the next inference starts now (none is running).

    sync: ``action_steps`` after the last chunk started executing, or when it is used up. Async: ``action_steps``
    after the last inference started, or as soon as what is left to execute would run out before a chunk
    computed now (at the last latency) arrives.
    """
    if last_start is None:
        return True
    if handoff == "sync":
        return remaining == 0 or steps - last_handoff >= action_steps
    return steps - last_start >= action_steps or remaining <= last_delay


def run_realtime_episode(env: SimEnv, policy: Policy, seed: int, max_steps: int, action_steps: int,
                         handoff: str, latency_ms: float | None, max_step: float = DEFAULT_MAX_STEP,
                         rtc_horizon: int = DEFAULT_RTC_HORIZON, instruction: str | None = None,
                         on_frame: FrameSink | None = None,
                         latency_of: Callable[[], float | None] | None = None,
                         rtc_guidance: bool = DEFAULT_RTC_GUIDANCE, guide_plan: bool = False,
                         rtc_commit: int = 0, rtc_correct: bool = DEFAULT_RTC_CORRECTION,
                         chunk_smoothing: int = DEFAULT_CHUNK_SMOOTHING) -> RealtimeEpisode:
    """One episode from ``seed``; ``latency_ms`` None simulates the latency measured for each chunk.

    ``rtc_guidance`` (``rtc`` only) or ``guide_plan`` (any hand-off): each observation carries ``guide``
    (so101_common.handoff.rtc_guide: the rows the arm will execute while the chunk is computed, at the latency
    expected, then the rest of the plan). With ``rtc_guidance`` it also carries ``steer`` true: a checkpoint policy
    continues the rows (trained with committed rows) or steers every draw onto them; with ``guide_plan`` alone it
    picks the closest of its candidates. The hand-off then corrects what is left of the offset, or with
    ``rtc_correct`` false runs the chunk as generated after the committed rows. ``rtc_commit``: with
    ``rtc_guidance``, at least this many rows of the plan are committed
    (weighted 1), whatever the latency: a policy trained with committed rows continues them instead of starting
    from its observation alone; the arm executes them as planned and the chunk takes over after them.
    ``chunk_smoothing``: passes of so101_common.handoff.smooth_chunk over each chunk's arm joints before it is
    handed over (0: the chunk as the policy made it)."""
    if handoff not in HANDOFFS:
        raise ValueError(f"handoff must be one of {', '.join(HANDOFFS)}, got {handoff!r}")
    if max_steps < 1 or action_steps < 1:
        raise ValueError(f"max_steps and action_steps must be >= 1, got {max_steps}, {action_steps}")
    if latency_ms is not None and not latency_ms >= 0:
        raise ValueError(f"latency must be >= 0 ms, got {latency_ms}")
    env.reset(seed)
    dt = env.cfg.control_dt
    stream = CommandStream(env.commanded())
    commanded, velocities = [env.commanded()], [env.joint_velocities()]
    result = RealtimeEpisode(seed=seed, success=False, score=0.0, steps=0, chunks=0)
    boundaries: list[int] = []
    pending: tuple[np.ndarray, int, int, int] | None = None  # chunk, observation step, ready at, committed rows
    last_start: int | None = None
    last_delay = last_handoff = taken = chunk_len = 0
    steps = 0
    success = False
    while steps < max_steps and not success:
        while True:
            if pending is not None and pending[2] <= steps:
                chunk, observed, _, committed = pending
                pending = None
                # sync: the arm stood still since the observation, so the chunk runs from its first row.
                mode, delay = ("replace", 0) if handoff == "sync" else (handoff, steps - observed)
                done = stream.take_over(mode, chunk, delay, max_step, rtc_horizon, GRIPPER, committed, rtc_correct)
                result.limited += done.limited
                result.stale_chunks += int(done.stale)
                if taken:  # the first chunk takes over from the arm at rest: no hand-off between chunks
                    boundaries.append(steps)
                taken += 1
                last_handoff = steps
                continue
            if pending is not None or not _due(handoff, steps, last_start, last_handoff, stream.remaining,
                                               action_steps, last_delay):
                break
            obs = env.observation(instruction)
            committed = 0
            if chunk_len and (guide_plan or (rtc_guidance and handoff == "rtc")):
                # sync: the arm stops at the observation, so nothing runs while the chunk is computed.
                expected = last_delay if latency_ms is None else latency_steps(latency_ms, dt)
                if handoff == "sync":
                    expected = 0
                elif rtc_guidance and handoff == "rtc":
                    expected = committed = max(expected, rtc_commit)
                obs["guide"] = rtc_guide(stream.sequence, stream.reached, expected, chunk_len, action_steps, GRIPPER)
                obs["steer"] = rtc_guidance and handoff == "rtc"
            started = time.perf_counter()
            chunk = smooth_chunk(check_chunk(policy(obs)), chunk_smoothing, GRIPPER)
            chunk_len = len(chunk)
            wall_ms = (time.perf_counter() - started) * 1e3
            reported = latency_of() if latency_of is not None else None
            measured = float(reported) if reported is not None else wall_ms
            result.chunk_latency_ms.append(measured)
            last_delay = latency_steps(measured if latency_ms is None else latency_ms, dt)
            if handoff == "sync" and last_delay > 0 and stream.remaining > 0:
                stream.truncate()  # the arm stops while the policy computes
                boundaries.append(steps)
            pending = (chunk, steps, steps + last_delay, committed)
            last_start = steps
        if stream.remaining == 0:
            result.held_steps += 1
        env.command(stream.advance())
        env.step()
        steps += 1
        commanded.append(env.commanded())
        velocities.append(env.joint_velocities())
        success = env.success()
        if on_frame is not None:
            on_frame(env.render(CAMERA_NAMES))
    result.success, result.score, result.steps = success, env.score(), steps
    result.chunks = len(result.chunk_latency_ms)
    result.handoff_steps = sorted(set(boundaries))
    cmd = np.asarray(commanded)
    for key, value in _smoothness(cmd, np.asarray(velocities), result.handoff_steps, dt).items():
        setattr(result, key, value)
    result.commanded = cmd.tolist()
    return result


def evaluate_realtime(env: SimEnv, policy: Policy, seeds: list[int], max_steps: int, action_steps: int,
                      handoff: str, latency_ms: float | None, max_step: float = DEFAULT_MAX_STEP,
                      rtc_horizon: int = DEFAULT_RTC_HORIZON, reseed: Callable[[int], None] | None = None,
                      latency_of: Callable[[], float | None] | None = None,
                      log: Callable[[str], None] = lambda message: None,
                      rtc_guidance: bool = DEFAULT_RTC_GUIDANCE, guide_plan: bool = False,
                      rtc_commit: int = 0, rtc_correct: bool = DEFAULT_RTC_CORRECTION,
                      chunk_smoothing: int = DEFAULT_CHUNK_SMOOTHING) -> dict:
    """One real-time episode per seed; the cell's report (rate, interval, smoothness, latency)."""
    episodes: list[RealtimeEpisode] = []
    for seed in seeds:
        if reseed is not None:
            reseed(seed)
        ep = run_realtime_episode(env, policy, seed, max_steps, action_steps, handoff, latency_ms, max_step,
                                  rtc_horizon, latency_of=latency_of, rtc_guidance=rtc_guidance,
                                  guide_plan=guide_plan, rtc_commit=rtc_commit, rtc_correct=rtc_correct,
                                  chunk_smoothing=chunk_smoothing)
        episodes.append(ep)
        log(f"  seed {seed}: {'success' if ep.success else 'failure'} (score {ep.score:.2f}) {ep.steps} steps, "
            f"{len(ep.handoff_steps)} hand-offs, held {ep.held_steps}, accel max {ep.boundary_accel_max:.1f}")
    successes = sum(e.success for e in episodes)
    low, high = wilson_interval(successes, len(episodes))

    def mean(key: str) -> float:
        return float(np.mean([getattr(e, key) for e in episodes]))

    return {"episodes": len(episodes), "successes": successes, "success_rate": successes / len(episodes),
            "ci95": [low, high], "score": mean("score"),
            # per-episode maxima averaged over episodes (one collision must not decide a cell), and the worst
            "boundary_accel_max": mean("boundary_accel_max"),
            "boundary_accel_worst": max(e.boundary_accel_max for e in episodes),
            "boundary_cmd_accel_max": mean("boundary_cmd_accel_max"), "between_accel_max": mean("between_accel_max"),
            "handoff_jump_max": max(e.handoff_jump_max for e in episodes),
            "cmd_jump_max": max(e.cmd_jump_max for e in episodes), "held_steps": mean("held_steps"),
            "limited": sum(e.limited for e in episodes), "stale_chunks": sum(e.stale_chunks for e in episodes),
            "chunk_latency": latency_summary([ms for e in episodes for ms in e.chunk_latency_ms]),
            "results": [e.to_dict() for e in episodes]}


@dataclass(frozen=True)
class Cell:
    """One table cell: a policy at one latency with one hand-off over the seeds (picklable, for worker
    processes)."""

    checkpoint: str | None  # None: the scripted expert
    nfe: int
    candidates: int
    average: int
    latency_ms: float | None  # None: each chunk's measured latency
    handoff: str
    task: str
    seeds: tuple[int, ...]
    max_steps: int
    action_steps: int
    max_step: float
    rtc_horizon: int
    rtc_guidance: bool
    rtc_commit: int
    rtc_correct: bool
    chunk_smoothing: int
    image_size: int
    device: str
    label: str


def run_cell(cell: Cell) -> dict:
    """Evaluate one cell in this process (the main one or a pool worker); returns its report."""
    env = cached_env(cell.task, cell.image_size)
    policy: ExpertEvalPolicy | CheckpointPolicy
    policy = ExpertEvalPolicy(env) if cell.checkpoint is None else cached_policy(cell.checkpoint, cell.device)
    policy.nfe, policy.candidates, policy.average = cell.nfe, cell.candidates, cell.average
    return evaluate_realtime(env, policy, list(cell.seeds), cell.max_steps, cell.action_steps, cell.handoff,
                             cell.latency_ms, cell.max_step, cell.rtc_horizon, reseed=policy.reseed,
                             latency_of=policy.last_latency_ms, log=lambda m: print(m, flush=True),
                             rtc_guidance=cell.rtc_guidance, guide_plan=cell.candidates > 1,
                             rtc_commit=cell.rtc_commit, rtc_correct=cell.rtc_correct,
                             chunk_smoothing=cell.chunk_smoothing)


def _run_cells(cells: list[Cell], workers: int) -> Iterator[tuple[Cell, dict]]:
    """The cells' reports in cell order, computed here (workers 1) or by a pool of one-thread processes."""
    if workers <= 1:
        for cell in cells:
            yield cell, run_cell(cell)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_cell, cell) for cell in cells]
        for cell, future in zip(cells, futures):
            yield cell, future.result()


@dataclass
class PolicySpec:
    """``expert`` or ``CHECKPOINT[@NFE]`` (CHECKPOINT may be ``shipped``) from the command line."""

    text: str
    checkpoint: Path | None
    nfe: int


def parse_policy(text: str) -> PolicySpec:
    if text == "expert":
        return PolicySpec(text, None, 1)
    path, _, nfe = text.partition("@")
    try:
        value = int(nfe) if nfe else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"--policy {text!r}: NFE after '@' must be an integer") from None
    if value < 1 or not path:
        raise argparse.ArgumentTypeError(f"--policy {text!r}: expected expert or CHECKPOINT[@NFE] with NFE >= 1")
    return PolicySpec(text, Path(path), value)


def parse_latencies(text: str) -> list[float | None]:
    """``0,33,100,measured`` -> [0.0, 33.0, 100.0, None]."""
    out: list[float | None] = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        if item == MEASURED:
            out.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--latencies: {item!r} is neither a number of ms nor "
                                             f"'{MEASURED}'") from None
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"--latencies: {item!r} must be >= 0 ms")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("--latencies needs at least one value, e.g. 0,100,200")
    return out


def parse_handoffs(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in HANDOFFS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"--handoffs: {', '.join(bad) or 'nothing'} given; choose from "
                                         f"{','.join(HANDOFFS)}")
    return values


def policy_label(spec: PolicySpec) -> str:
    """``expert``, or the checkpoint's objective and NFE (``meanflow_nfe1``, ``flow_matching_nfe10``)."""
    if spec.checkpoint is None:
        return "expert"
    try:
        objective = json.loads((spec.checkpoint / "config.json").read_text()).get("objective", "policy")
    except (OSError, ValueError, AttributeError):
        objective = spec.checkpoint.name
    return f"{objective}_nfe{spec.nfe}"


TABLE_HEADER = ("| latency (ms) | policy | hand-off | success | 95 % interval | score | boundary accel (rad/s^2) "
                "| between hand-offs (rad/s^2) | commanded accel (rad/s^2) | max jump (rad) | held steps "
                "| chunk ms (median) |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_line(row: dict, report: dict) -> str:
    low, high = report["ci95"]
    return (f"| {row['latency_ms']} | {row['policy']} | {row['handoff']} | {report['successes']}/{report['episodes']}"
            f" = {100 * report['success_rate']:.0f} % | [{100 * low:.0f}, {100 * high:.0f}] % | {report['score']:.2f}"
            f" | {report['boundary_accel_max']:.1f} | {report['between_accel_max']:.1f}"
            f" | {report['boundary_cmd_accel_max']:.1f} "
            f"| {report['cmd_jump_max']:.3f} | {report['held_steps']:.1f} "
            f"| {report['chunk_latency'].get('median_ms', float('nan')):.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-eval-realtime", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", type=parse_policy, default=None,
                        help=f"expert, or CHECKPOINT[@NFE] (CHECKPOINT a directory, or {SHIPPED_HELP}); "
                             "repeatable (default: shipped:sim_pick_place@1, the real-time table's policy)")
    parser.add_argument("--latencies", type=parse_latencies, default=parse_latencies("0,33,100,200,400,800"),
                        help="injected latencies in ms, and/or 'measured' (default 0,33,100,200,400,800)")
    parser.add_argument("--handoffs", type=parse_handoffs, default=list(HANDOFFS),
                        help=f"hand-off modes (default {','.join(HANDOFFS)})")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per cell (seeds seed..seed+N-1)")
    parser.add_argument("--seed", type=int, default=1000, help="first episode seed (held out from the demos)")
    parser.add_argument("--task", default="pick_place", choices=sorted(TASKS))
    parser.add_argument("--max-steps", type=int, default=None, help="control steps per episode (default: the task's)")
    parser.add_argument("--action-steps", type=int, default=DEFAULT_ACTION_STEPS,
                        help="control steps between the starts of two inferences")
    parser.add_argument("--max-step", type=float, default=DEFAULT_MAX_STEP,
                        help="largest commanded change per joint and control step (rad)")
    parser.add_argument("--rtc-horizon", type=int, default=DEFAULT_RTC_HORIZON,
                        help="steps over which rtc pulls the new chunk onto the old plan")
    parser.add_argument("--rtc-guidance", action=argparse.BooleanOptionalAction, default=DEFAULT_RTC_GUIDANCE,
                        help="rtc: give each chunk the rows the arm executes while it is computed (a checkpoint "
                             "trained with --action-prefix-rows continues them; any other steers every draw onto "
                             "them: flow matching by the RTC paper's guided denoising steps, a one-step model by "
                             "noise-space guidance) before the hand-off corrects what is left (default: %(default)s)")
    parser.add_argument("--rtc-commit", type=int, default=0, metavar="ROWS",
                        help="with --rtc-guidance: commit at least ROWS rows of the plan being executed, whatever the "
                             "latency: they run as planned and the chunk takes over after them (a checkpoint trained "
                             "with --action-prefix-rows continues them)")
    parser.add_argument("--rtc-correction", action=argparse.BooleanOptionalAction, default=DEFAULT_RTC_CORRECTION,
                        help="rtc: fade the offset between the plan and the new chunk where it takes over; "
                             "--no-rtc-correction executes the chunk as generated after the committed rows (the RTC "
                             "paper's execution, with --rtc-guidance) (default: %(default)s)")
    add_chunk_smoothing_argument(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--image-size", type=int, default=64, help="rendered camera size (use the demos' size)")
    parser.add_argument("--out", type=Path, default=Path("eval_realtime"), help="directory for table and JSON")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes evaluating cells in parallel, one torch thread each (injected-latency "
                             "results do not depend on it; measured latencies do, when workers share cores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("episodes", "action_steps", "rtc_horizon", "image_size", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    resolve_sampling_arguments(parser, args)
    if not args.max_step > 0:
        parser.error(f"--max-step must be > 0 rad, got {args.max_step}")
    if args.rtc_commit < 0:
        parser.error(f"--rtc-commit must be >= 0 rows, got {args.rtc_commit}")
    specs = args.policy or [parse_policy("shipped:sim_pick_place@1")]
    for spec in specs:
        if spec.checkpoint is not None:
            try:
                spec.checkpoint = resolve_checkpoint(spec.checkpoint)
            except (PolicyPluginError, LookupError) as exc:
                parser.error(f"--policy {spec.text}: {exc}")
            if not spec.checkpoint.is_dir():
                parser.error(f"--policy {spec.text}: {spec.checkpoint} is not a directory")
    max_steps = args.max_steps or TASKS[args.task].max_steps
    seeds = tuple(range(args.seed, args.seed + args.episodes))
    labels: dict[str, str] = {}
    for spec in specs:
        if spec.checkpoint is not None:
            try:  # load once here: a bad checkpoint is one error before any episode (and cached for workers=1)
                cached_policy(str(spec.checkpoint), args.device)
            except (ValueError, FileNotFoundError, OSError, PolicyPluginError) as exc:
                print(f"so101-eval-realtime: --policy {spec.text}: cannot load checkpoint: {exc}", file=sys.stderr)
                return 2
        labels[spec.text] = policy_label(spec)
    cells = [Cell(None if spec.checkpoint is None else str(spec.checkpoint), spec.nfe,
                  1 if spec.checkpoint is None else args.candidates, 1 if spec.checkpoint is None else args.average,
                  latency, handoff, args.task, seeds, max_steps,
                  args.action_steps, args.max_step, args.rtc_horizon, args.rtc_guidance, args.rtc_commit,
                  args.rtc_correction, args.chunk_smoothing, args.image_size,
                  args.device, labels[spec.text])
             for spec in specs for latency in args.latencies for handoff in args.handoffs]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    lines: list[str] = []
    try:
        for cell, report in _run_cells(cells, args.workers):
            row = {"latency_ms": MEASURED if cell.latency_ms is None else cell.latency_ms, "policy": cell.label,
                   "handoff": cell.handoff, "candidates": cell.candidates, "average": cell.average,
                   "rtc_guidance": cell.rtc_guidance, "rtc_correction": cell.rtc_correct,
                   "chunk_smoothing": cell.chunk_smoothing, "success_rate": report["success_rate"],
                   "episodes": report["episodes"], "boundary_accel_max": report["boundary_accel_max"],
                   "between_accel_max": report["between_accel_max"]}
            rows.append(row)
            lines.append(table_line(row, report))
            print(lines[-1], flush=True)
            name = f"{cell.label}_{row['latency_ms']}ms_{cell.handoff}.json"
            (args.out / name).write_text(json.dumps({**row, **report, "task": args.task, "seed": args.seed,
                                                     "max_step": args.max_step, "rtc_commit": args.rtc_commit,
                                                     "action_steps": args.action_steps}, indent=2))
    except KeyboardInterrupt:
        print("so101-eval-realtime: interrupted", file=sys.stderr)
        return 130
    finally:
        close_envs()
    table = "\n".join([TABLE_HEADER, *lines])
    source = provenance()
    footer = (f"\n{args.task}, {args.episodes} episodes per cell from seed {args.seed}; commit {source['commit']}, "
              f"{source['machine']}, {source['date_utc']}")
    (args.out / "table.md").write_text(table + "\n" + footer + "\n")
    run = {"rows": rows, "task": args.task, "episodes": args.episodes, "seed": args.seed, **source}
    (args.out / "rows.json").write_text(json.dumps(run, indent=2))
    if any(row["latency_ms"] != MEASURED for row in rows):
        from so101_sim.realtime_plot import PLOT_FILE, plot_realtime, title_of  # matplotlib: here, not in workers

        plot_realtime(rows, args.out / PLOT_FILE, title_of(run))
    print(table)
    print(json.dumps({"rows": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
