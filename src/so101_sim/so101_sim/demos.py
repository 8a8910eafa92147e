"""so101-sim-demos: scripted demonstrations written as episode bags in exactly the teleop recorder's format.

Per control step (the dataset rate) the bag gets both camera images and /joint_states at the step's time,
then the expert's command for that step as a one-point JointTrajectory on the trajectory topic (target
reached one control period later). Replaying those commands through so101_common.trajectory's
TrajectoryFollower gives exactly the targets the sim executed. Message times are the episode's wall-clock
start plus simulated time.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from rclpy.serialization import serialize_message

from so101_common.episode_bag import EpisodeMetadata, EpisodeWriter, update_index
from so101_common.graph import CAMERA_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC, camera_image_topic
from so101_sim.env import SimEnv
from so101_sim.expert import MAX_FIXED_JAW_CLEARANCE, ExpertConfig, ScriptedExpert
from so101_sim.ik import IKError
from so101_common.stamps import NS_PER_S
from so101_sim.messages import image_msg, joint_state_msg, trajectory_msg
from so101_sim.scene import SceneConfig
from so101_sim.tasks import TASKS

ROBOT_NAME = "so101_sim"
TOPIC_TYPES: dict[str, str] = {
    **{camera_image_topic(c): "sensor_msgs/msg/Image" for c in CAMERA_NAMES},
    JOINT_STATES_TOPIC: "sensor_msgs/msg/JointState",
    TRAJECTORY_TOPIC: "trajectory_msgs/msg/JointTrajectory",
}


@dataclass
class DemoResult:
    path: Path
    seed: int
    success: bool
    steps: int
    seconds: float


def _write_observation(writer: EpisodeWriter, env: SimEnv, stamp_ns: int) -> None:
    for camera, rgb in env.render().items():
        writer.write(camera_image_topic(camera), stamp_ns, serialize_message(image_msg(stamp_ns, camera, rgb)))
    effort = env.data.actuator_force[env.scene.actuator]
    msg = joint_state_msg(stamp_ns, env.joint_positions(), env.joint_velocities(), effort)
    writer.write(JOINT_STATES_TOPIC, stamp_ns, serialize_message(msg))


def record_demo(env: SimEnv, seed: int, path: Path, expert: ExpertConfig | None = None) -> DemoResult:
    """Run the expert for ``seed`` and write the episode to ``path`` (a new directory)."""
    started = time.perf_counter()
    env.reset(seed)
    return record_plan(env, ScriptedExpert(env, expert).plan(), seed, path, started)


def add_expert_arguments(parser: argparse.ArgumentParser) -> None:
    """``--expert-blend`` and ``--fixed-jaw-clearance``, the same in every tool that records the scripted expert;
    read them with :func:`expert_config`."""
    parser.add_argument("--expert-blend", type=float, default=ExpertConfig.t_blend, metavar="S",
                        help="seconds by which the expert's consecutive moves overlap (0: each move comes to rest "
                        "before the next, as in every demo until 2026-12-03; default %(default)s)")
    parser.add_argument("--fixed-jaw-clearance", type=float, default=ExpertConfig.fixed_jaw_clearance, metavar="M",
                        help="gap in metres between the fixed jaw's pad and the object during the descent; the arm "
                        "moves back while the jaws close (0: the pad slides down the object's face, as in every "
                        "demo until 2026-12-04; default %(default)s)")


def expert_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ExpertConfig:
    """The expert's configuration from :func:`add_expert_arguments`' options; a bad value is one parser error."""
    if not args.expert_blend >= 0.0:
        parser.error(f"--expert-blend must be >= 0 seconds, got {args.expert_blend}")
    if not 0.0 <= args.fixed_jaw_clearance <= MAX_FIXED_JAW_CLEARANCE:
        parser.error(f"--fixed-jaw-clearance must be in [0, {MAX_FIXED_JAW_CLEARANCE}] m, got "
                     f"{args.fixed_jaw_clearance}")
    return ExpertConfig(t_blend=args.expert_blend, fixed_jaw_clearance=args.fixed_jaw_clearance)


def record_plan(env: SimEnv, plan: np.ndarray, seed: int, path: Path, started: float) -> DemoResult:
    """Execute ``plan`` (T, 6) from the env's current state, writing every step to the episode at ``path``.

    The bag's clock starts at the current sim time, so a plan that takes over mid-episode (recovery demos)
    is an episode of its own. ``started`` is the perf_counter time the caller's work began (for the report).
    """
    dt = env.cfg.control_dt
    t0 = env.time
    # Sim runs faster than real time: date the episode back by its simulated length so every message time
    # lies between the metadata's start and stop times, as in a live recording.
    start_ns = time.time_ns() - int(round((len(plan) + 1) * dt * NS_PER_S))
    meta = EpisodeMetadata(instruction=env.task.instruction, robot=ROBOT_NAME, task=env.task.name, seed=seed,
                           start_time_ns=start_ns)
    writer = EpisodeWriter(path, meta)
    try:
        for topic, msgtype in TOPIC_TYPES.items():
            writer.add_topic(topic, msgtype)
        base_ns = meta.start_time_ns
        for target in plan:
            stamp_ns = base_ns + int(round((env.time - t0) * NS_PER_S))
            _write_observation(writer, env, stamp_ns)
            env.command(target)
            writer.write(TRAJECTORY_TOPIC, stamp_ns, serialize_message(trajectory_msg(stamp_ns, [dt], target[None])))
            env.step()
        _write_observation(writer, env, base_ns + int(round((env.time - t0) * NS_PER_S)))
        success = env.success()
    except BaseException:
        writer.discard()
        raise
    writer.close(success=success)
    return DemoResult(path, seed, success, len(plan), time.perf_counter() - started)


def _log(message: str) -> None:
    print(message, flush=True)


class SeedSkipped(Exception):
    """This seed yields no episode (e.g. the policy already succeeded before a recovery could start)."""


Recorder = Callable[[SimEnv, int, Path], DemoResult]


def generate(out: Path, episodes: int, seed: int = 0, task: str = "pick_place", image_size: int = 128,
             keep_failures: bool = False, log: Callable[[str], None] = _log, record: Recorder = record_demo,
             max_tries: int | None = None) -> list[DemoResult]:
    """Write ``episodes`` episodes under ``out`` (seeds from ``seed`` on) with ``record``; failures are dropped
    and replaced by further seeds unless ``keep_failures`` (at most ``max_tries`` seeds, default 2x as many)."""
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    out.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out.iterdir() if p.is_dir()]
    if existing:
        raise FileExistsError(f"{out} already holds {len(existing)} entries (e.g. {existing[0]}); use an empty dir")
    env = SimEnv(SceneConfig(image_height=image_size, image_width=image_size), task=task)
    results: list[DemoResult] = []
    tried = 0
    budget = max_tries if max_tries is not None else 2 * episodes
    try:
        while len(results) < episodes and tried < budget:
            s = seed + tried
            tried += 1
            try:
                result = record(env, s, out / f"episode_{len(results):04d}")
            except IKError as exc:
                log(f"seed {s}: expert could not plan ({exc}), seed skipped")
                continue
            except SeedSkipped as exc:
                log(f"seed {s}: {exc}, seed skipped")
                continue
            if not result.success and not keep_failures:
                log(f"seed {s}: expert failed, episode dropped")
                shutil.rmtree(result.path)
                continue
            results.append(result)
            log(f"seed {s}: {'success' if result.success else 'FAILED'} {result.steps} steps "
                f"{result.seconds:.1f} s -> {result.path}")
    finally:
        env.close()
        update_index(out)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-sim-demos", description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes to write")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; each attempt uses the next one")
    parser.add_argument("--task", default="pick_place", choices=sorted(TASKS), help="task to demonstrate")
    parser.add_argument("--image-size", type=int, default=128, help="camera images are SIZE x SIZE pixels")
    parser.add_argument("--keep-failures", action="store_true",
                        help="keep episodes the expert failed (metadata success=false) instead of dropping them")
    add_expert_arguments(parser)
    args = parser.parse_args(argv)
    expert = expert_config(parser, args)
    started = time.perf_counter()
    try:
        results = generate(args.out, args.episodes, args.seed, args.task, args.image_size, args.keep_failures,
                           record=partial(record_demo, expert=expert))
    except (ValueError, FileExistsError) as exc:
        print(f"so101-sim-demos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("so101-sim-demos: interrupted; finished episodes are kept and indexed", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started
    ok = sum(r.success for r in results)
    print(f"wrote {len(results)} episodes ({ok} successful) to {args.out} in {wall:.1f} s "
          f"({wall / max(1, len(results)):.2f} s/episode)")
    return 0 if len(results) == args.episodes else 1


if __name__ == "__main__":
    sys.exit(main())
