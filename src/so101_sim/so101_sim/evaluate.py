"""so101-eval: closed-loop evaluation of a Mean-Flow checkpoint in the sim, in-process (no DDS).

The checkpoint is loaded through a policy plugin (so101_sim.policy_plugins; meanflow_policy provides it), so
this package does not import the policy package.

Prints the success rate with its 95 % Wilson interval and per-chunk latency, writes a JSON report and a GIF
of the first episodes (wrist | top view); ``--sweep-nfe 1,2,5,10`` evaluates each NFE on the same seeds and
prints a table. ``--tasks all`` evaluates one (multi-task) checkpoint on every task, in ``--workers`` processes,
and ends with one JSON line: per-task score and success, the mean score over the paper's three tasks, the
instruction-following rate over the tasks whose instruction decides, and the median chunk latency; summary.json,
summary.md and summary.png (success per task with its interval, chunk-latency histograms) go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from so101_common.graph import CAMERA_NAMES
from so101_common.phrasings import HELD_OUT_PARAPHRASES, UNRELATED
from so101_common.provenance import provenance
from so101_sim.dwell import DwellWatch, GraspWatch, HoldWatch
from so101_sim.env import SimEnv
from so101_sim.expert import ExpertChunkPolicy, ScriptedExpert
from so101_sim.policy_plugins import (SHIPPED_HELP, CheckpointPolicy, PolicyPluginError, load_checkpoint_policy,
                                      resolve_checkpoint)
from so101_sim.rollout import (DEFAULT_ACTION_STEPS, EpisodeResult, Policy, add_chunk_smoothing_argument,
                               add_sampling_arguments, latency_summary,
                               resolve_sampling_arguments, run_episode, wilson_interval)
from so101_sim.scene import SceneConfig
from so101_sim.tasks import LANGUAGE_DECIDED, PAPER_TASKS, TASKS
from so101_sim.trace import EpisodeTrace


class ExpertEvalPolicy(ExpertChunkPolicy):
    """The scripted expert with the evaluator's policy interface (NFE, candidates and noise seed do not apply)."""

    nfe = 1
    candidates = 1
    average = 1
    input_size = 0

    def reseed(self, seed: int) -> None:
        """Deterministic: nothing to seed."""

    def last_latency_ms(self) -> float | None:
        return None


class GifRecorder:
    """Collects wrist|top frames of one episode and writes them as a looping GIF at ``fps / every``."""

    def __init__(self, path: Path, fps: float, every: int = 2) -> None:
        self.path, self.fps, self.every = path, fps, every
        self.frames: list[np.ndarray] = []
        self._count = 0

    def __call__(self, images: dict[str, np.ndarray]) -> None:
        if self._count % self.every == 0:
            self.frames.append(np.concatenate([images[c] for c in CAMERA_NAMES], axis=1))
        self._count += 1

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(self.path, np.stack(self.frames), duration=1000.0 * self.every / self.fps, loop=0)
        return self.path


def evaluate(env: SimEnv, policy: Policy, seeds: list[int], max_steps: int, action_steps: int,
             video_dir: Path | None = None, video_episodes: int = 0, label: str = "",
             reseed: Callable[[int], None] | None = None, latency_of: Callable[[], float | None] | None = None,
             log: Callable[[str], None] = lambda message: print(message, flush=True),
             instruction: str | None = None, guide_plan: bool = False, trace_dir: Path | None = None,
             chunk_smoothing: int = 0) -> dict:
    """Run one closed-loop episode per seed; returns the report (rate, Wilson 95 % interval, latency).

    ``instruction`` replaces the task's own sentence (e.g. a paraphrase); the task still scores the episode.
    ``guide_plan``: observations carry the rest of the last chunk (so101_sim.rollout.run_episode).
    ``trace_dir``: each failed episode's step-by-step trace (so101_sim.trace) goes there as a CSV.
    ``chunk_smoothing``: passes of so101_common.handoff.smooth_chunk over each chunk (so101_sim.rollout.run_episode).
    """
    results: list[EpisodeResult] = []
    videos: list[str] = []
    expert = ScriptedExpert(env)  # the grasp point (its IK) and jaw axes of the watches and the traces
    ik = expert.ik
    for i, seed in enumerate(seeds):
        if reseed is not None:
            reseed(seed)
        recorder = None
        if video_dir is not None and i < video_episodes:
            recorder = GifRecorder(video_dir / f"{label}episode_{i:02d}_seed{seed}.gif", env.cfg.fps)
        watch = DwellWatch(env, ik=ik)
        hold = HoldWatch(env, ik=ik)
        grasps = GraspWatch(env, expert=expert)
        trace = None if trace_dir is None else EpisodeTrace(env, ik=ik)
        hooks: list[Callable[[], object]] = [watch, hold, grasps] if trace is None else [watch, hold, grasps, trace]
        result = run_episode(env, policy, seed, max_steps, action_steps, instruction=instruction,
                             on_frame=recorder, latency_of=latency_of, guide_plan=guide_plan,
                             after_step=partial(_call_each, hooks), chunk_smoothing=chunk_smoothing)
        result.dwell_watched, result.dwell_step, result.grasps = True, watch.first_step, grasps.grasps
        result.hold_watched, result.hold_step = True, hold.first_step
        traced = ""
        if trace is not None and trace_dir is not None and not result.success:
            traced = f" -> trace {trace.write(trace_dir / f'{label}seed{seed}.csv')}"
        if recorder is not None:
            videos.append(str(recorder.write()))
        results.append(result)
        followed = "" if result.instruction_followed is None else \
            f", instruction {'followed' if result.instruction_followed else 'NOT followed'}"
        dwelt = "" if result.dwell_step is None else f", dwelt at a grasp by step {result.dwell_step}"
        if result.hold_step is not None:
            dwelt += f", held an object over its place by step {result.hold_step}"
        log(f"{label}episode {i} seed {seed}: {'success' if result.success else 'failure'} (score {result.score:.2f}"
            f"{followed}{dwelt}) after {result.steps} steps ({result.sim_seconds:.1f} s sim), {result.chunks} chunks"
            f"{traced}")
    return summarize(results, videos, max_steps, action_steps)


def _call_each(hooks: list[Callable[[], object]]) -> None:
    for hook in hooks:
        hook()


def summarize(results: list[EpisodeResult], videos: list[str], max_steps: int, action_steps: int) -> dict:
    """The report of a set of episodes (one task and NFE), however they were split across workers."""
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, len(results))
    latencies = [ms for r in results for ms in r.chunk_latency_ms]
    judged = [r.instruction_followed for r in results if r.instruction_followed is not None]
    return {"episodes": len(results), "successes": successes, "success_rate": successes / len(results),
            "ci95": [low, high], "score": float(np.mean([r.score for r in results])),
            "instruction_followed_rate": sum(judged) / len(judged) if judged else None,
            # None for episodes evaluated before dwells were watched (pooled by so101-results-table)
            "dwelt": sum(r.dwell_step is not None for r in results) if all(r.dwell_watched for r in results) else None,
            "held_over_place": (sum(r.hold_step is not None for r in results)
                                if all(r.hold_watched for r in results) else None),
            **grasp_summary(results),
            "chunk_latency": latency_summary(latencies), "max_steps": max_steps,
            "action_steps": action_steps, "videos": videos, "results": [r.to_dict() for r in results]}


# A grasp further than this from the object's centre along the jaws' faces is counted as off-centre: the expert
# itself stacks the toy 75-85 % of the time from 1 cm and never from 1.5 cm (docs/notes/multitask_training.md,
# round 29).
OFF_CENTRE_GRASP_M = 0.01


def grasp_summary(results: list[EpisodeResult]) -> dict:
    """How many first grasps the episodes made and how many of those were off-centre (``OFF_CENTRE_GRASP_M``);
    None for episodes evaluated before grasps were watched."""
    if any(r.grasps is None for r in results):
        return {"grasps": None, "grasps_off_centre": None}
    made = [g for r in results for g in r.grasps or []]
    return {"grasps": len(made), "grasps_off_centre": sum(g["along_faces_m"] > OFF_CENTRE_GRASP_M for g in made)}


@dataclass(frozen=True)
class EvalJob:
    """Episodes of one task at one NFE: everything a worker process needs to run them (picklable)."""

    task: str
    nfe: int
    seeds: tuple[int, ...]
    checkpoint: str | None  # None: the scripted expert
    device: str
    image_size: int
    max_steps: int
    action_steps: int
    instruction: str | None
    video_dir: str | None
    video_episodes: int
    candidates: int = 1
    average: int = 1
    trace_dir: str | None = None
    input_size: int = 0  # camera size the policy reads (px; 0: its trained size)
    chunk_smoothing: int = 0  # passes of so101_common.handoff.smooth_chunk over each chunk


# Per process: the loaded policies and one env per (task, image size), reused by every job or cell the process
# runs (so101-eval here, so101-eval-realtime's cells too).
_POLICIES: dict[tuple[str, str], CheckpointPolicy] = {}
_ENVS: dict[tuple[str, int], SimEnv] = {}


def cached_env(task: str, image_size: int) -> SimEnv:
    """This process's env for ``task`` at ``image_size`` px (built on first use)."""
    if (task, image_size) not in _ENVS:
        _ENVS[(task, image_size)] = SimEnv(SceneConfig(image_height=image_size, image_width=image_size), task=task)
    return _ENVS[(task, image_size)]


def cached_policy(checkpoint: str, device: str) -> CheckpointPolicy:
    """This process's loaded ``checkpoint`` (loaded on first use: a bad one raises here, before any episode)."""
    if (checkpoint, device) not in _POLICIES:
        _POLICIES[(checkpoint, device)] = load_checkpoint_policy(Path(checkpoint), device)
    return _POLICIES[(checkpoint, device)]


def run_job(job: EvalJob) -> tuple[list[EpisodeResult], list[str]]:
    """Run a job's episodes in this process (the main one or a pool worker); returns results and GIF paths."""
    env = cached_env(job.task, job.image_size)
    policy: ExpertEvalPolicy | CheckpointPolicy
    policy = ExpertEvalPolicy(env) if job.checkpoint is None else cached_policy(job.checkpoint, job.device)
    policy.nfe, policy.candidates, policy.average = job.nfe, job.candidates, job.average
    policy.input_size = job.input_size
    video_dir = None if job.video_dir is None else Path(job.video_dir)
    report = evaluate(env, policy, list(job.seeds), job.max_steps, job.action_steps, video_dir, job.video_episodes,
                      label=f"nfe{job.nfe}_", reseed=policy.reseed, latency_of=policy.last_latency_ms,
                      log=lambda message: print(f"[{job.task}] {message}", flush=True), instruction=job.instruction,
                      guide_plan=policy.candidates > 1,
                      trace_dir=None if job.trace_dir is None else Path(job.trace_dir),
                      chunk_smoothing=job.chunk_smoothing)
    return [EpisodeResult(**r) for r in report["results"]], report["videos"]


def close_envs() -> None:
    """Release the renderers of this process's envs."""
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()


def split_job(job: EvalJob, parts: int) -> list[EvalJob]:
    """The job's seeds in ``parts`` contiguous pieces (GIFs stay with the first seeds); each seed's result does
    not depend on the piece it runs in (the policy's noise is reseeded per episode)."""
    pieces = [p for p in np.array_split(np.asarray(job.seeds), max(1, min(parts, len(job.seeds)))) if len(p)]
    jobs = []
    for i, piece in enumerate(pieces):
        videos = max(0, job.video_episodes - sum(len(p) for p in pieces[:i]))
        jobs.append(replace(job, seeds=tuple(int(s) for s in piece), video_episodes=videos))
    return jobs


def run_jobs(jobs: list[EvalJob], workers: int) -> list[tuple[list[EpisodeResult], list[str]]]:
    """Run jobs in this process (workers == 1) or split over a pool of ``workers`` processes; results come back
    in job order."""
    if workers <= 1:
        return [run_job(job) for job in jobs]
    pieces = [split_job(job, workers) for job in jobs]
    flat = [p for ps in pieces for p in ps]
    # Longest first, so the pool does not end on one long job.
    order = sorted(range(len(flat)), key=lambda i: -len(flat[i].seeds) * flat[i].max_steps)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker: the workers share the cores
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {i: pool.submit(run_job, flat[i]) for i in order}
        done = [futures[i].result() for i in range(len(flat))]
    out, k = [], 0
    for ps in pieces:
        results = [r for d in done[k:k + len(ps)] for r in d[0]]
        videos = [v for d in done[k:k + len(ps)] for v in d[1]]
        out.append((results, videos))
        k += len(ps)
    return out


def _parse_nfe_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep-nfe expects integers like 1,2,5,10, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--sweep-nfe needs NFE values >= 1, got {text!r}")
    return values


def _summary_line(nfe: int, report: dict) -> str:
    lat = report["chunk_latency"]
    low, high = report["ci95"]
    return (f"| {nfe} | {report['successes']}/{report['episodes']} | {100 * report['success_rate']:.1f} % | "
            f"[{100 * low:.1f}, {100 * high:.1f}] % | {report['score']:.3f} | "
            f"{lat.get('median_ms', float('nan')):.1f} | {lat.get('p90_ms', float('nan')):.1f} |")


TABLE_HEADER = ("| NFE | successes | success rate | 95 % interval | mean score | chunk latency median (ms) "
                "| p90 (ms) |\n"
                "|---|---|---|---|---|---|---|")


def _parse_tasks(text: str) -> list[str]:
    """--tasks: comma-separated names, ``paper`` (the paper's three) or ``all`` (every registered task)."""
    if text == "all":
        return list(TASKS)
    if text == "paper":
        return list(PAPER_TASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--tasks: unknown task(s) {unknown or [text]}; registered: {sorted(TASKS)}, "
                                         "or 'paper' / 'all'")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-eval", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help=f"policy checkpoint directory, or {SHIPPED_HELP}")
    source.add_argument("--expert", action="store_true",
                        help="evaluate the scripted expert through the same closed loop (reference, no model)")
    parser.add_argument("--nfe", type=int, default=1, help="network evaluations per chunk (default 1)")
    add_sampling_arguments(parser)
    add_chunk_smoothing_argument(parser)
    parser.add_argument("--sweep-nfe", type=_parse_nfe_list, default=None, help="evaluate each NFE, e.g. 1,2,5,10")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task and NFE (seeds seed..seed+N-1)")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed")
    parser.add_argument("--task", default="pick_place", choices=sorted(TASKS), help="the task to evaluate")
    parser.add_argument("--tasks", type=_parse_tasks, default=None,
                        help="several tasks instead of --task: comma-separated, 'paper' (pick_place, stacking, "
                        "sorting) or 'all'; reports go to OUT/<task>/ and the last line summarises them all")
    parser.add_argument("--instruction", default=None,
                        help="say this instead of the task's own instruction (e.g. a paraphrase); --task only")
    parser.add_argument("--paraphrases", type=int, default=0, metavar="N",
                        help="also evaluate each task with N of its held-out paraphrases (so101_common.phrasings: "
                        "synonyms, word order, polite, typo; never used in training), at the first NFE")
    parser.add_argument("--unrelated", action="store_true",
                        help=f"also evaluate each task with an instruction that names no task ({UNRELATED[0]!r}): "
                        "how often the policy does the task anyway")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="control steps per episode (30 Hz; default: the task's, 360 for pick_place)")
    parser.add_argument("--action-steps", type=int, default=DEFAULT_ACTION_STEPS,
                        help="control steps executed from each chunk before the next observation")
    parser.add_argument("--image-size", type=int, default=128,
                        help="rendered camera size (use the demos' size; the policy resizes)")
    parser.add_argument("--policy-image-size", type=int, default=0, metavar="PX",
                        help="size the checkpoint policy reads its camera images at (px; 0: its trained size; a "
                        "smaller one is cheaper, node parameter image_size)")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="directory for JSON and GIFs")
    parser.add_argument("--video-episodes", type=int, default=2, help="GIFs of the first N episodes per task and NFE")
    parser.add_argument("--trace-failures", action="store_true",
                        help="write each failed episode's step-by-step trace (grasp point, gripper, each object's "
                        "distance, held, in a box) as OUT[/<task>]/traces/nfe<N>_seed<S>.csv")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes running episodes in parallel, one torch thread each (results do not depend "
                        "on it; latency does, when workers share cores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.nfe < 1:
        parser.error(f"--nfe must be >= 1, got {args.nfe}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    resolve_sampling_arguments(parser, args)
    if not 0 <= args.paraphrases <= 4:
        parser.error(f"--paraphrases must be 0..4 (held-out paraphrases per task), got {args.paraphrases}")
    if args.instruction is not None and (args.tasks is not None or not args.instruction.strip()):
        parser.error("--instruction needs a non-empty sentence and one --task (not --tasks)")
    if args.checkpoint is not None:
        try:
            args.checkpoint = resolve_checkpoint(args.checkpoint)
        except (PolicyPluginError, LookupError) as exc:
            parser.error(f"--checkpoint {args.checkpoint}: {exc}")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory")
    nfes = args.sweep_nfe or [args.nfe]
    multi = args.tasks is not None
    tasks = args.tasks or [args.task]
    checkpoint = None if args.expert else str(args.checkpoint)
    if checkpoint is not None:
        # Load once here: a bad checkpoint is one error before any episode, and a single process reuses it.
        try:
            policy = cached_policy(checkpoint, args.device)
        except (ValueError, FileNotFoundError, OSError, PolicyPluginError) as exc:
            print(f"so101-eval: cannot load checkpoint: {exc}", file=sys.stderr)
            return 2
        try:
            policy.input_size = args.policy_image_size
        except ValueError as exc:
            parser.error(f"--policy-image-size {args.policy_image_size}: {exc}")
    seeds = tuple(range(args.seed, args.seed + args.episodes))
    task_dir = {t: args.out / t if multi else args.out for t in tasks}
    jobs = [EvalJob(task=t, nfe=n, seeds=seeds, checkpoint=checkpoint, device=args.device,
                    image_size=args.image_size, max_steps=args.max_steps or TASKS[t].max_steps,
                    action_steps=args.action_steps, instruction=args.instruction,
                    video_dir=str(task_dir[t] / "videos"), video_episodes=args.video_episodes,
                    candidates=1 if args.expert else args.candidates, average=1 if args.expert else args.average,
                    trace_dir=str(task_dir[t] / "traces") if args.trace_failures else None,
                    input_size=0 if args.expert else args.policy_image_size, chunk_smoothing=args.chunk_smoothing)
            for t in tasks for n in nfes]
    variants = {t: _variant_sentences(t, args.paraphrases, args.unrelated) for t in tasks}
    variant_jobs = [(kind, replace(job, instruction=sentence, video_dir=None, video_episodes=0))
                    for job in jobs if job.nfe == nfes[0] for kind, sentence in variants[job.task].items()]
    for directory in task_dir.values():
        directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        outputs = run_jobs(jobs + [job for _, job in variant_jobs], args.workers)
    except KeyboardInterrupt:
        print("so101-eval: interrupted", file=sys.stderr)
        return 130
    finally:
        close_envs()
    wall = time.perf_counter() - started
    reports: dict[str, dict[int, dict]] = {t: {} for t in tasks}
    variant_reports: dict[str, dict[str, dict]] = {t: {} for t in tasks}
    for (kind, job), (results, videos) in zip(variant_jobs, outputs[len(jobs):]):
        report = {**summarize(results, videos, job.max_steps, job.action_steps), "task": job.task, "kind": kind,
                  "instruction": job.instruction, "nfe": job.nfe, "candidates": job.candidates,
                  "average": job.average, "chunk_smoothing": job.chunk_smoothing, "seed": args.seed}
        (task_dir[job.task] / f"instruction_{kind}_nfe{job.nfe}.json").write_text(json.dumps(report, indent=2))
        variant_reports[job.task][kind] = report
        print(f"{job.task} said {kind} ({job.instruction!r}): success {report['successes']}/{report['episodes']}, "
              f"mean score {report['score']:.3f}{_followed_text(report)}")
    for job, (results, videos) in zip(jobs, outputs[:len(jobs)]):
        report = summarize(results, videos, job.max_steps, job.action_steps)
        report.update({"checkpoint": "expert" if args.expert else checkpoint, "nfe": job.nfe,
                       "candidates": job.candidates, "average": job.average,
                       "chunk_smoothing": job.chunk_smoothing, "task": job.task,
                       "instruction": job.instruction or TASKS[job.task].instruction, "seed": args.seed,
                       "image_size": args.image_size, "policy_image_size": job.input_size})
        path = task_dir[job.task] / f"eval_nfe{job.nfe}.json"
        path.write_text(json.dumps(report, indent=2))
        reports[job.task][job.nfe] = report
        low, high = report["ci95"]
        lat = report["chunk_latency"]
        print(f"{job.task + ' ' if multi else ''}NFE {job.nfe}: success {report['successes']}/{report['episodes']} = "
              f"{100 * report['success_rate']:.1f} % (95 % CI {100 * low:.1f}-{100 * high:.1f} %), "
              f"mean score {report['score']:.3f}{_followed_text(report)}, "
              f"dwelt at a grasp in {report['dwelt']} episodes, held an object over its place in "
              f"{report['held_over_place']}, {report['grasps_off_centre']} of {report['grasps']} "
              f"grasps more than {100 * OFF_CENTRE_GRASP_M:g} cm off-centre, "
              f"chunk latency median {lat.get('median_ms', float('nan')):.1f} ms, "
              f"p90 {lat.get('p90_ms', float('nan')):.1f} ms -> {path}")
    wording = wording_summary(reports, variant_reports, nfes[0]) if variant_jobs else None
    if multi:
        last = multitask_summary(reports, nfes)
        if wording is not None:
            last["instructions"] = wording
        table = multitask_table(reports, nfes)
        print(table)
        (args.out / "summary.md").write_text(table + "\n")
        (args.out / "summary.json").write_text(json.dumps(
            {"summary": last, "checkpoint": reports[tasks[0]][nfes[0]]["checkpoint"], "seed": args.seed,
             "image_size": args.image_size, "policy_image_size": jobs[0].input_size, "candidates": jobs[0].candidates,
             "average": jobs[0].average, "chunk_smoothing": args.chunk_smoothing, "workers": args.workers,
             "wall_seconds": wall, **provenance(),
             "reports": {t: {str(n): {k: v for k, v in r.items() if k != "results"} for n, r in by_nfe.items()}
                         for t, by_nfe in reports.items()}}, indent=2))
        from so101_sim.eval_plot import plot_summary  # matplotlib: only here, not in every worker process

        source = "scripted expert" if checkpoint is None else "/".join(Path(checkpoint).parts[-2:])
        plot_summary(reports, args.out / "summary.png",
                     f"{source}: {args.episodes} episodes per task from seed {args.seed}")
        print(json.dumps(last), flush=True)
        return 0
    by_nfe = reports[args.task]
    if len(nfes) > 1:
        table = "\n".join([TABLE_HEADER, *(_summary_line(n, by_nfe[n]) for n in nfes)])
        print(table)
        (args.out / "sweep.json").write_text(json.dumps(
            {str(n): {k: v for k, v in r.items() if k != "results"} for n, r in by_nfe.items()}, indent=2))
        (args.out / "sweep.md").write_text(table + "\n")
    last = _last_line(nfes, by_nfe)
    if wording is not None:
        last["instructions"] = wording
    print(json.dumps(last), flush=True)
    return 0


def _variant_sentences(task: str, paraphrases: int, unrelated: bool) -> dict[str, str]:
    """kind -> sentence: the first ``paraphrases`` held-out paraphrases of the task's instruction, and the first
    unrelated instruction."""
    held_out = HELD_OUT_PARAPHRASES.get(TASKS[task].instruction, {})
    chosen = dict(list(held_out.items())[:paraphrases])
    if unrelated:
        chosen["unrelated"] = UNRELATED[0]
    return chosen


def wording_summary(reports: dict[str, dict[int, dict]], variants: dict[str, dict[str, dict]], nfe: int) -> dict:
    """Per task: success and score with the task's own sentence, with each other wording, the paraphrases' mean
    and their success relative to the own sentence's (issue: a paraphrase should work as well as the original)."""
    out = {}
    for task, by_kind in variants.items():
        own = reports[task][nfe]
        paraphrased = [r for kind, r in by_kind.items() if kind != "unrelated"]
        entry: dict = {"own": {"instruction": own["instruction"], "score": own["score"],
                               "success_rate": own["success_rate"]},
                       "by_kind": {kind: {"instruction": r["instruction"], "score": r["score"],
                                          "success_rate": r["success_rate"],
                                          "instruction_followed_rate": r["instruction_followed_rate"]}
                                   for kind, r in by_kind.items()}}
        if paraphrased:
            rate = float(np.mean([r["success_rate"] for r in paraphrased]))
            entry["paraphrase_success_rate"] = rate
            entry["paraphrase_score"] = float(np.mean([r["score"] for r in paraphrased]))
            entry["paraphrase_relative_success"] = rate / own["success_rate"] if own["success_rate"] else None
        out[task] = entry
    return out


def _followed_text(report: dict) -> str:
    rate = report["instruction_followed_rate"]
    return "" if rate is None else f", instruction followed {100 * rate:.1f} %"


def _last_line(nfes: list[int], reports: dict[int, dict]) -> dict:
    """The machine-readable summary printed last: one NFE as scalars, a sweep as maps keyed by NFE."""
    rate = {str(n): reports[n]["success_rate"] for n in nfes}
    score = {str(n): reports[n]["score"] for n in nfes}
    followed = {str(n): reports[n]["instruction_followed_rate"] for n in nfes}
    chunk = {str(n): reports[n]["chunk_latency"].get("median_ms") for n in nfes}
    episodes = reports[nfes[0]]["episodes"]
    if len(nfes) == 1:
        n = str(nfes[0])
        return {"success_rate": rate[n], "score": score[n], "instruction_followed_rate": followed[n],
                "episodes": episodes, "nfe": nfes[0], "chunk_ms_median": chunk[n]}
    return {"success_rate": rate, "score": score, "instruction_followed_rate": followed, "episodes": episodes,
            "nfe": nfes, "chunk_ms_median": chunk}


def _one_nfe_summary(reports: dict[str, dict[int, dict]], nfe: int) -> dict:
    """Per-task results at one NFE; the mean score over the paper's tasks evaluated (all tasks if none of them
    was); instruction following pooled over the episodes of the language-decided tasks."""
    cells = {t: by_nfe[nfe] for t, by_nfe in reports.items()}
    tasks = {t: {"score": r["score"], "success_rate": r["success_rate"], "episodes": r["episodes"],
                 "ci95": r["ci95"], "instruction_followed_rate": r["instruction_followed_rate"],
                 "dwelt": r["dwelt"], "held_over_place": r.get("held_over_place"),
                 "chunk_ms_median": r["chunk_latency"].get("median_ms")}
             for t, r in cells.items()}
    paper = [t for t in PAPER_TASKS if t in cells] or list(cells)
    judged = [e["instruction_followed"] for t, r in cells.items() if t in LANGUAGE_DECIDED for e in r["results"]
              if e["instruction_followed"] is not None]
    latencies = [ms for r in cells.values() for e in r["results"] for ms in e["chunk_latency_ms"]]
    dwelt = [r["dwelt"] for r in cells.values()]
    held = [r.get("held_over_place") for r in cells.values()]
    return {"tasks": tasks, "mean_score": float(np.mean([cells[t]["score"] for t in paper])),
            "mean_score_over": paper, "instruction_following": sum(judged) / len(judged) if judged else None,
            "dwelt": None if None in dwelt else sum(dwelt), "held_over_place": None if None in held else sum(held),
            "chunk_ms_median": float(np.median(latencies)) if latencies else None}


def multitask_summary(reports: dict[str, dict[int, dict]], nfes: list[int]) -> dict:
    """The last line of a multi-task evaluation: one NFE flat, a sweep keyed by NFE."""
    if len(nfes) == 1:
        return {**_one_nfe_summary(reports, nfes[0]), "nfe": nfes[0]}
    return {"nfe": nfes, "by_nfe": {str(n): _one_nfe_summary(reports, n) for n in nfes}}


def multitask_table(reports: dict[str, dict[int, dict]], nfes: list[int]) -> str:
    """Markdown: one row per task and NFE (score, success with interval, instruction following, latency)."""
    lines = ["| task | NFE | mean score | success | 95 % interval | instruction followed | chunk median (ms) |",
             "|---|---|---|---|---|---|---|"]
    for t, by_nfe in reports.items():
        for n in nfes:
            r = by_nfe[n]
            low, high = r["ci95"]
            rate = r["instruction_followed_rate"]
            followed = "-" if rate is None else f"{100 * rate:.0f} %"
            lines.append(f"| {t} | {n} | {r['score']:.3f} | {r['successes']}/{r['episodes']} | "
                         f"{100 * low:.1f}-{100 * high:.1f} % | {followed} | "
                         f"{r['chunk_latency'].get('median_ms', float('nan')):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
