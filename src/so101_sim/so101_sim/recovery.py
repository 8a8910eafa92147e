"""so101-sim-recovery: recovery demonstrations from the states a trained policy actually visits (DAgger-style).

Per seed: reset, run the policy closed loop (exactly as ``so101-eval``) on the chosen task for a handover step
drawn from the seed, then let the scripted expert plan what is left of the task from that state and record only
the expert's part as an episode bag, in the demos' format (the task's instruction in episode.json). Behaviour
cloning from start-state demos never shows the policy how to get out of a state it drifted into (hovering beside
the cube, closing too high, one cube sorted and the other forgotten); these episodes do. A seed is skipped when the
policy already succeeded or left a state the expert cannot handle (ScriptedExpert.takeover_problem: an object in
the wrong box, fallen or tipped over, ...); episodes the expert fails are dropped, like demos.

``--mode dwell`` hands over only where the policy dwells at a grasp: the grasp point has stayed within a small ball
for a while, near the object the task needs next, below carry height, nothing in the jaws (the failures of the
multi-task policy: hovering over a cube, each chunk planning a slow start that the next one postpones again, or
descending onto it off-centre and rising again). The expert's part from there says "align and go on down".

``--mode offcentre`` hands over while the policy descends onto the object off-centre along the jaws' faces, before
they close (stacking's failure: the toy caught ~2 cm towards its head tilts in the jaws); the expert's part
re-aligns at that height and goes on down. ``--mode waver`` hands over where the wrist turns back and forth over
the object (the toy lying where the two jaw directions need a roll near +-90 deg); the expert keeps the nearer one.
``--mode hold`` hands over where the policy holds an object over its place at carry height without lowering it
(sorting's failure: the second cube held over its box until the episode ends); the expert lowers it and lets go.

``--mode latency`` records what real-time chunking needs to learn (meanflow-train --action-prefix-rows): at a
random step the arm goes on with ``--latency-steps`` rows of the policy's current chunk, as it does while the next
chunk is computed, and the expert plans the rest from where those rows leave it. The episode starts at the
observation the next chunk would be computed from: its first rows are the committed ones, a policy's own (not what
the observation predicts: a stale draw), and what follows continues them. Trained with these rows as its
committed input, the expert learns to read them.

``--mode rollout`` records the policy's own successful episodes instead (self-imitation: filtered behaviour
cloning): the policy runs the whole episode; when it succeeds, the commands it sent are replayed from the same
reset and recorded as an episode, kept if the replay succeeds too. Training on them keeps what the policy already
does well (its retries that worked, the chunks coherent sampling chose) in the data that a fine-tune sees.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from so101_sim.demos import DemoResult, SeedSkipped, add_expert_arguments, expert_config, generate, record_plan
from so101_sim.dwell import Dwell, DwellWatch, Hold, HoldWatch, OffCentre, OffCentreWatch, Waver, WaverWatch
from so101_sim.env import SimEnv
from so101_sim.expert import ExpertConfig, ScriptedExpert, TakeoverError
from so101_sim.policy_plugins import SHIPPED_HELP, PolicyPluginError, load_checkpoint_policy, resolve_checkpoint
from so101_common.handoff import smooth_chunk
from so101_sim.rollout import (DEFAULT_ACTION_STEPS, GRIPPER, EpisodeResult, Policy, add_chunk_smoothing_argument,
                               add_sampling_arguments, resolve_sampling_arguments, run_episode)
from so101_sim.tasks import TASKS, task_class

RECOVERY_FILE = "recovery.json"
MODES = ("takeover", "dwell", "offcentre", "waver", "hold", "latency", "rollout")


@dataclass(frozen=True)
class HandoverRange:
    """Control steps of policy execution before the expert takes over, drawn uniformly per seed."""

    first: int = 24
    last: int = 300

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last:
            raise ValueError(f"handover steps need 1 <= first <= last, got {self.first}..{self.last}")

    def draw(self, seed: int) -> int:
        return int(np.random.default_rng(seed).integers(self.first, self.last + 1))


def default_handover_last(task: str) -> int:
    """Latest default handover step: five sixths of the task's evaluation length (pick-place: 300 of 360)."""
    return task_class(task).max_steps * 5 // 6


@dataclass
class _PolicyRecorder:
    """How a recorder runs the policy closed loop: as so101-eval does (with several candidates it sees the last
    chunk), reseeded per seed."""

    policy: Policy
    _: KW_ONLY
    action_steps: int = DEFAULT_ACTION_STEPS
    reseed: Callable[[int], None] | None = None
    guide_plan: bool = False
    chunk_smoothing: int = 0  # passes of so101_common.handoff.smooth_chunk over each chunk, as so101-eval
    expert: ExpertConfig = field(default_factory=ExpertConfig)

    def _run(self, env: SimEnv, seed: int, max_steps: int, after_step: Callable[[], None] | None = None,
             policy: Policy | None = None) -> EpisodeResult:
        """The closed-loop run; ``after_step`` is called after every control step (it may raise to end the run
        there); ``policy`` wraps the recorder's (it calls it)."""
        if self.reseed is not None:
            self.reseed(seed)
        return run_episode(env, policy or self.policy, seed, max_steps=max_steps, action_steps=self.action_steps,
                           guide_plan=self.guide_plan, after_step=after_step, chunk_smoothing=self.chunk_smoothing)

    def _expert_from_here(self, env: SimEnv, seed: int, path: Path, started: float, where: str) -> DemoResult:
        """The scripted expert finishes the task from the env's state; its part is recorded as the episode."""
        try:
            plan = ScriptedExpert(env, self.expert).plan()
        except TakeoverError as exc:
            raise SeedSkipped(f"no recovery {where}: {exc}") from None
        return record_plan(env, plan, seed, path, started)


@dataclass
class RecoveryRecorder(_PolicyRecorder):
    """Records one recovery episode per seed with ``policy``; keeps the handover step of each written episode."""

    handover: HandoverRange
    handovers: dict[str, int] = field(default_factory=dict, init=False)

    def __call__(self, env: SimEnv, seed: int, path: Path) -> DemoResult:
        started = time.perf_counter()
        step = self.handover.draw(seed)
        result = self._run(env, seed, step)
        if result.success:
            raise SeedSkipped(f"the policy succeeded by step {result.steps} (handover at {step})")
        demo = self._expert_from_here(env, seed, path, started, f"at step {step}")
        self.handovers[path.name] = step
        return demo


@dataclass
class LatencyRecorder(_PolicyRecorder):
    """Records, per seed, ``delay`` committed rows of the policy's chunk at a random step, then the expert's plan
    from where they leave the arm (see the module's ``--mode latency``). Keeps the handover step of each episode."""

    handover: HandoverRange
    delay: int
    handovers: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.delay < 1:
            raise ValueError(f"--latency-steps must be >= 1, got {self.delay}")

    def __call__(self, env: SimEnv, seed: int, path: Path) -> DemoResult:
        started = time.perf_counter()
        step = self.handover.draw(seed)
        commands: list[np.ndarray] = []
        plan: dict[str, Any] = {}

        def remembering(observation: dict) -> np.ndarray:
            plan["chunk"], plan["from"] = self.policy(observation), len(commands)
            return plan["chunk"]

        result = self._run(env, seed, step, after_step=lambda: commands.append(env.commanded()), policy=remembering)
        if result.success:
            raise SeedSkipped(f"the policy succeeded by step {result.steps} (handover at {step})")
        chunk = smooth_chunk(np.asarray(plan["chunk"]), self.chunk_smoothing, GRIPPER)  # the rows the arm runs
        reached = step - plan["from"]  # rows of the current chunk executed so far
        rows = chunk[reached:reached + self.delay]
        committed = np.concatenate([rows, np.repeat(chunk[-1:], self.delay - len(rows), axis=0)])
        before = np.asarray(commands)

        def replay(targets: np.ndarray) -> None:
            env.reset(seed)
            for target in targets:
                env.command(target)
                env.step()

        replay(np.concatenate([before, committed]))
        try:
            rest = ScriptedExpert(env, self.expert).plan()
        except TakeoverError as exc:
            raise SeedSkipped(f"no recovery after {self.delay} committed rows at step {step}: {exc}") from None
        replay(before)
        demo = record_plan(env, np.concatenate([committed, rest]), seed, path, started)
        self.handovers[path.name] = step
        return demo


class _Seen(Exception):
    """Raised from a control step to end the policy's run where a watch fires (WatchRecorder)."""


WatchRule = Dwell | OffCentre | Waver | Hold


def _expert_watch(env: SimEnv, rule: OffCentre, expert: ExpertConfig) -> Callable[[], bool]:
    return OffCentreWatch(env, rule, ScriptedExpert(env, expert))


# Per rule: how the skip and takeover messages name what its watch recognises, and the watch of one episode.
_WATCHES: dict[type, tuple[str, Callable[[SimEnv, Any, ExpertConfig], Callable[[], bool]]]] = {
    Dwell: ("dwell at a grasp", lambda env, rule, _: DwellWatch(env, rule)),
    OffCentre: ("off-centre descent", _expert_watch),
    Waver: ("wrist turning back over the object", lambda env, rule, _: WaverWatch(env, rule)),
    Hold: ("object held over its place", lambda env, rule, _: HoldWatch(env, rule)),
}


@dataclass
class WatchRecorder(_PolicyRecorder):
    """Records a recovery episode per seed where a per-step watch of the policy's run fires for ``rule``: the expert
    takes over at that step; seeds where it never fires are skipped. Keeps that step of each written episode.
    ``Dwell``: the policy dwells at a grasp (the expert aligns and goes on down); ``OffCentre``: it descends
    off-centre onto the object (the expert re-aligns at that height); ``Waver``: its wrist turns back and forth over
    the object (the expert keeps the jaw direction nearer the roll it finds); ``Hold``: it holds an object over its
    place without lowering it (the expert lowers it there and lets go)."""

    max_steps: int
    rule: WatchRule
    handovers: dict[str, int] = field(default_factory=dict, init=False)

    @property
    def what(self) -> str:
        return _WATCHES[type(self.rule)][0]

    def __call__(self, env: SimEnv, seed: int, path: Path) -> DemoResult:
        started = time.perf_counter()
        watch = _WATCHES[type(self.rule)][1](env, self.rule, self.expert)

        def stop_where_seen() -> None:
            if watch():
                raise _Seen

        try:
            result = self._run(env, seed, self.max_steps, after_step=stop_where_seen)
        except _Seen:
            handover = env.steps
        else:
            raise SeedSkipped(f"no {self.what} ({'succeeded' if result.success else 'failed'} after {result.steps} "
                              "steps)")
        demo = self._expert_from_here(env, seed, path, started, f"at the {self.what} (step {handover})")
        self.handovers[path.name] = handover
        return demo


@dataclass
class RolloutRecorder(_PolicyRecorder):
    """Records the policy's own successful episodes: the commands of a closed-loop success, replayed and recorded."""

    max_steps: int
    steps: dict[str, int] = field(default_factory=dict, init=False)

    def __call__(self, env: SimEnv, seed: int, path: Path) -> DemoResult:
        started = time.perf_counter()
        commands: list[np.ndarray] = []
        # The target each control step ends at, as env.command sends it.
        result = self._run(env, seed, self.max_steps, after_step=lambda: commands.append(env.commanded()))
        if not result.success:
            raise SeedSkipped(f"the policy did not succeed in {result.steps} steps (score {result.score:.2f})")
        env.reset(seed)
        # The last ``steps`` targets are the episode's (reset's settling steps come first).
        demo = record_plan(env, np.asarray(commands[-result.steps:]), seed, path, started)
        self.steps[path.name] = result.steps
        return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-sim-recovery", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help=f"policy checkpoint to roll out (loaded through the policy plugin), or {SHIPPED_HELP}")
    parser.add_argument("--episodes", type=int, required=True, help="number of recovery episodes to write")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (new or empty)")
    parser.add_argument("--task", default="pick_place", choices=sorted(TASKS),
                        help="task the policy runs and the expert finishes (its instruction goes into episode.json)")
    parser.add_argument("--seed", type=int, default=3000,
                        help="first seed (keep clear of the evaluation seeds); each attempt uses the next one")
    parser.add_argument("--nfe", type=int, default=1, help="network evaluations per chunk of the policy")
    add_sampling_arguments(parser)
    add_chunk_smoothing_argument(parser)
    parser.add_argument("--action-steps", type=int, default=DEFAULT_ACTION_STEPS,
                        help="control steps executed from each chunk")
    parser.add_argument("--handover-first", type=int, default=HandoverRange.first,
                        help="earliest control step at which the expert takes over")
    parser.add_argument("--handover-last", type=int, default=None,
                        help="latest control step at which the expert takes over (default: 5/6 of the task's "
                             "evaluation steps: 300, sorting 600)")
    parser.add_argument("--image-size", type=int, default=128, help="camera images are SIZE x SIZE pixels")
    parser.add_argument("--max-tries", type=int, default=0, help="seeds to try at most (0: 4x --episodes)")
    parser.add_argument("--mode", choices=MODES, default="takeover",
                        help="takeover: the expert finishes from where the policy is at a random step (recovery); "
                             "dwell: only where the policy dwells at a grasp (see --dwell-steps); offcentre: only "
                             "where it descends onto the object off-centre (see --offcentre-cm); waver: only where its "
                             "wrist turns back over the object (see --waver-rad); hold: only where it holds an "
                             "object over its place without lowering it (see --hold-steps); latency: the policy's "
                             "chunk goes on for --latency-steps rows at a random step, then the expert continues them "
                             "(committed rows for --action-prefix-rows); rollout: record the "
                             "policy's own successful episodes (self-imitation)")
    parser.add_argument("--dwell-steps", type=int, default=Dwell.steps,
                        help=f"--mode dwell: control steps the grasp point stays within {Dwell.radius * 100:g} cm and "
                             f"the gripper within {Dwell.grip_rad:g} rad, within {Dwell.reach * 100:g} cm of the next "
                             "object, nothing held, before the expert takes over")
    parser.add_argument("--offcentre-cm", type=float, default=OffCentre.offset * 100,
                        help="--mode offcentre: how far (cm) the grasp point may be from the object's centre along the "
                             "jaws' faces while it descends with open jaws before the expert takes over")
    parser.add_argument("--waver-rad", type=float, default=Waver.swing,
                        help="--mode waver: how far (rad) the wrist roll may turn back over the object, jaws open, "
                             "before the expert takes over")
    parser.add_argument("--hold-steps", type=int, default=Hold.steps,
                        help=f"--mode hold: control steps an object may be held within {Hold.reach * 100:g} cm of "
                             f"its place, less than {Hold.drop * 100:g} cm below carry height, before the expert takes "
                             "over")
    parser.add_argument("--latency-steps", type=int, default=6,
                        help="--mode latency: rows of the policy's chunk the arm goes on with before the expert's plan "
                             "(the control steps a chunk takes to compute: 6 = 200 ms at 30 Hz)")
    parser.add_argument("--device", default="cpu")
    add_expert_arguments(parser)
    args = parser.parse_args(argv)
    expert = expert_config(parser, args)
    if min(args.episodes, args.nfe, args.action_steps) < 1:
        parser.error("--episodes, --nfe and --action-steps must be >= 1")
    for option, value in (("--dwell-steps", args.dwell_steps), ("--hold-steps", args.hold_steps),
                          ("--latency-steps", args.latency_steps)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    if not args.offcentre_cm > 0:
        parser.error(f"--offcentre-cm must be > 0, got {args.offcentre_cm}")
    if not args.waver_rad > 0:
        parser.error(f"--waver-rad must be > 0, got {args.waver_rad}")
    resolve_sampling_arguments(parser, args)
    try:
        args.checkpoint = resolve_checkpoint(args.checkpoint)
    except (PolicyPluginError, LookupError) as exc:
        parser.error(f"--checkpoint {args.checkpoint}: {exc}")
    if not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory")

    started = time.perf_counter()
    try:
        last = default_handover_last(args.task) if args.handover_last is None else args.handover_last
        handover = HandoverRange(args.handover_first, last)
        policy = load_checkpoint_policy(args.checkpoint, args.device)
        policy.nfe, policy.candidates, policy.average = args.nfe, args.candidates, args.average
        recorder: RecoveryRecorder | LatencyRecorder | WatchRecorder | RolloutRecorder
        # How every recorder runs the policy: as so101-eval does.
        run: dict[str, Any] = {"action_steps": args.action_steps, "reseed": policy.reseed,
                               "guide_plan": args.candidates > 1, "chunk_smoothing": args.chunk_smoothing}
        steps = task_class(args.task).max_steps
        rules: dict[str, WatchRule] = {"dwell": Dwell(steps=args.dwell_steps),
                                       "offcentre": OffCentre(offset=args.offcentre_cm / 100),
                                       "waver": Waver(swing=args.waver_rad), "hold": Hold(steps=args.hold_steps)}
        if args.mode == "rollout":
            recorder = RolloutRecorder(policy, steps, **run)
        elif args.mode == "latency":
            recorder = LatencyRecorder(policy, handover, args.latency_steps, expert=expert, **run)
        elif args.mode in rules:
            recorder = WatchRecorder(policy, steps, rules[args.mode], expert=expert, **run)
        else:
            recorder = RecoveryRecorder(policy, handover, expert=expert, **run)
        results = generate(args.out, args.episodes, args.seed, task=args.task, image_size=args.image_size,
                           record=recorder, max_tries=args.max_tries or 4 * args.episodes)
    except (ValueError, FileExistsError, FileNotFoundError, OSError, PolicyPluginError) as exc:
        print(f"so101-sim-recovery: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("so101-sim-recovery: interrupted; finished episodes are kept and indexed", file=sys.stderr)
        return 130
    (args.out / RECOVERY_FILE).write_text(json.dumps({
        "checkpoint": str(args.checkpoint), "task": args.task, "nfe": args.nfe, "candidates": args.candidates,
        "average": args.average, "chunk_smoothing": args.chunk_smoothing, "action_steps": args.action_steps,
        "first_seed": args.seed, "mode": args.mode,
        **({} if isinstance(recorder, RolloutRecorder)
           else {"expert_blend_s": expert.t_blend, "fixed_jaw_clearance_m": expert.fixed_jaw_clearance}),
        **({"policy_steps": recorder.steps} if isinstance(recorder, RolloutRecorder)
           else {"handover_step": recorder.handovers}),
        **({"handover_range": [handover.first, handover.last]}
           if isinstance(recorder, RecoveryRecorder | LatencyRecorder) else {}),
        **({"latency_steps": recorder.delay} if isinstance(recorder, LatencyRecorder) else {}),
        **({args.mode: asdict(recorder.rule)} if isinstance(recorder, WatchRecorder) else {})},
        indent=2) + "\n")
    wall = time.perf_counter() - started
    print(f"wrote {len(results)} recovery episodes to {args.out} in {wall:.1f} s "
          f"({wall / max(1, len(results)):.2f} s/episode)")
    return 0 if len(results) == args.episodes else 1


if __name__ == "__main__":
    sys.exit(main())
