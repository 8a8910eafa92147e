"""so101-eval: closed-loop evaluation of a Mean-Flow checkpoint in the sim, in-process (no DDS).

Prints the success rate with its 95 % Wilson interval and per-chunk latency, writes a JSON report and a GIF
of the first episodes (wrist | top view); ``--sweep-nfe 1,2,5,10`` evaluates each NFE on the same seeds and
prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from so101_common.graph import CAMERA_NAMES, JOINT_NAMES
from so101_sim.env import SimEnv
from so101_sim.expert import ExpertChunkPolicy
from so101_sim.rollout import EpisodeResult, Policy, latency_summary, run_episode, wilson_interval
from so101_sim.scene import SceneConfig
from so101_sim.tasks import TASKS


class CheckpointPolicy:
    """A meanflow_policy checkpoint as an observation -> chunk callable with a fixed NFE and seeded noise."""

    def __init__(self, checkpoint: Path, device: str = "cpu") -> None:
        import torch

        from meanflow_policy.model.policy import MeanFlowPolicy

        self._torch = torch
        self.policy = MeanFlowPolicy.load(checkpoint, device=device)
        cfg = self.policy.config
        if tuple(cfg.joint_names) != tuple(JOINT_NAMES) or int(cfg.action_dim) != len(JOINT_NAMES):
            raise ValueError(f"checkpoint {checkpoint} acts on joints {list(cfg.joint_names)} "
                             f"(action_dim {cfg.action_dim}); the sim arm has {list(JOINT_NAMES)}")
        unknown = [c for c in cfg.camera_keys if c not in CAMERA_NAMES]
        if unknown:
            raise ValueError(f"checkpoint {checkpoint} wants cameras {unknown}; the sim has {list(CAMERA_NAMES)}")
        self.nfe = 1
        self.generator = torch.Generator().manual_seed(0)

    @property
    def chunk_size(self) -> int:
        return int(self.policy.config.chunk_size)

    def reseed(self, seed: int) -> None:
        self.generator = self._torch.Generator().manual_seed(seed)

    def __call__(self, observation: dict) -> np.ndarray:
        return self.policy.sample(observation, nfe=self.nfe, generator=self.generator)

    def last_latency_ms(self) -> float | None:
        return self.policy.last_timing.get("total_ms")


class ExpertEvalPolicy(ExpertChunkPolicy):
    """The scripted expert with the evaluator's policy interface (NFE and noise seed do not apply)."""

    nfe = 1

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
             log: Callable[[str], None] = lambda message: print(message, flush=True)) -> dict:
    """Run one closed-loop episode per seed; returns the report (rate, Wilson 95 % interval, latency)."""
    results: list[EpisodeResult] = []
    videos: list[str] = []
    for i, seed in enumerate(seeds):
        if reseed is not None:
            reseed(seed)
        recorder = None
        if video_dir is not None and i < video_episodes:
            recorder = GifRecorder(video_dir / f"{label}episode_{i:02d}_seed{seed}.gif", env.cfg.fps)
        result = run_episode(env, policy, seed, max_steps, action_steps, on_frame=recorder, latency_of=latency_of)
        if recorder is not None:
            videos.append(str(recorder.write()))
        results.append(result)
        followed = "" if result.instruction_followed is None else \
            f", instruction {'followed' if result.instruction_followed else 'NOT followed'}"
        log(f"{label}episode {i} seed {seed}: {'success' if result.success else 'failure'} (score {result.score:.2f}"
            f"{followed}) after {result.steps} steps ({result.sim_seconds:.1f} s sim), {result.chunks} chunks")
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, len(results))
    latencies = [ms for r in results for ms in r.chunk_latency_ms]
    judged = [r.instruction_followed for r in results if r.instruction_followed is not None]
    return {"episodes": len(results), "successes": successes, "success_rate": successes / len(results),
            "ci95": [low, high], "score": float(np.mean([r.score for r in results])),
            "instruction_followed_rate": sum(judged) / len(judged) if judged else None,
            "chunk_latency": latency_summary(latencies), "max_steps": max_steps,
            "action_steps": action_steps, "videos": videos, "results": [r.to_dict() for r in results]}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-eval", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="meanflow_policy checkpoint directory")
    source.add_argument("--expert", action="store_true",
                        help="evaluate the scripted expert through the same closed loop (reference, no model)")
    parser.add_argument("--nfe", type=int, default=1, help="network evaluations per chunk (default 1)")
    parser.add_argument("--sweep-nfe", type=_parse_nfe_list, default=None, help="evaluate each NFE, e.g. 1,2,5,10")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per NFE (seeds seed..seed+N-1)")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed")
    parser.add_argument("--task", default="pick_place", choices=sorted(TASKS))
    parser.add_argument("--max-steps", type=int, default=None,
                        help="control steps per episode (30 Hz; default: the task's, 360 for pick_place)")
    parser.add_argument("--action-steps", type=int, default=10,
                        help="control steps executed from each chunk before the next observation")
    parser.add_argument("--image-size", type=int, default=128,
                        help="rendered camera size (use the demos' size; the policy resizes)")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="directory for JSON and GIFs")
    parser.add_argument("--video-episodes", type=int, default=2, help="GIFs of the first N episodes per NFE")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.nfe < 1:
        parser.error(f"--nfe must be >= 1, got {args.nfe}")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint} is not a directory")
    nfes = args.sweep_nfe or [args.nfe]
    if args.max_steps is None:
        args.max_steps = TASKS[args.task].max_steps

    env = SimEnv(SceneConfig(image_height=args.image_size, image_width=args.image_size), task=args.task)
    if args.expert:
        policy = ExpertEvalPolicy(env)
    else:
        try:
            policy = CheckpointPolicy(args.checkpoint, args.device)
        except (ValueError, FileNotFoundError, OSError) as exc:
            env.close()
            print(f"so101-eval: cannot load checkpoint: {exc}", file=sys.stderr)
            return 2
    seeds = list(range(args.seed, args.seed + args.episodes))
    args.out.mkdir(parents=True, exist_ok=True)
    reports: dict[int, dict] = {}
    try:
        for nfe in nfes:
            policy.nfe = nfe
            started = time.perf_counter()
            report = evaluate(env, policy, seeds, args.max_steps, args.action_steps, args.out / "videos",
                              args.video_episodes, label=f"nfe{nfe}_", reseed=policy.reseed,
                              latency_of=policy.last_latency_ms)
            report.update({"checkpoint": "expert" if args.expert else str(args.checkpoint), "nfe": nfe,
                           "task": args.task, "seed": args.seed, "image_size": args.image_size,
                           "wall_seconds": time.perf_counter() - started})
            path = args.out / f"eval_nfe{nfe}.json"
            path.write_text(json.dumps(report, indent=2))
            reports[nfe] = report
            low, high = report["ci95"]
            lat = report["chunk_latency"]
            print(f"NFE {nfe}: success {report['successes']}/{report['episodes']} = "
                  f"{100 * report['success_rate']:.1f} % (95 % CI {100 * low:.1f}-{100 * high:.1f} %), "
                  f"mean score {report['score']:.3f}{_followed_text(report)}, "
                  f"chunk latency median {lat['median_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms -> {path}")
    except KeyboardInterrupt:
        print("so101-eval: interrupted", file=sys.stderr)
        return 130
    finally:
        env.close()
    if len(nfes) > 1:
        table = "\n".join([TABLE_HEADER, *(_summary_line(n, reports[n]) for n in nfes)])
        print(table)
        (args.out / "sweep.json").write_text(json.dumps(
            {str(n): {k: v for k, v in r.items() if k != "results"} for n, r in reports.items()}, indent=2))
        (args.out / "sweep.md").write_text(table + "\n")
    print(json.dumps(_last_line(nfes, reports)), flush=True)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
