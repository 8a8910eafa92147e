"""``meanflow-eval-bag``: replay recorded episodes through a checkpoint, open loop.

Every synchronised step of the bags (same synchronisation as training, taken from the checkpoint's config) is
given to the policy; its chunk is compared with the recorded one (commanded targets, joint units) over the
chunk's non-padded points. Repeated for each NFE of the sweep (``--other-instruction``: once more with another
instruction, to see whether the policy reads it); writes ``eval.json`` and ``eval.png``
(error over time per NFE, error and latency vs NFE, predicted vs recorded first action per joint).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from meanflow_policy.data.cache import ensure_writable_dirs, load_episodes
from meanflow_policy.data.samples import SampleSet
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.tools.common import (add_cpu_threads_argument, add_sync_arguments, apply_cpu_threads,
                                          resolve_device, run_cli, sync_config)
from so101_common.stamps import ns_to_s

LOG = logging.getLogger("meanflow_eval_bag")
EVAL_JSON, EVAL_PNG = "eval.json", "eval.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-eval-bag", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (e.g. OUT/best)")
    p.add_argument("--bags", nargs="+", required=True, type=Path, metavar="DIR",
                   help="episode bags or dataset folders to replay")
    p.add_argument("--out", required=True, type=Path, help="folder for eval.json and eval.png")
    p.add_argument("--nfe", nargs="+", type=int, default=[1, 2, 4, 10], help="NFE values of the sweep")
    p.add_argument("--stride", type=int, default=1, help="evaluate every N-th synchronised step")
    p.add_argument("--first-seconds", type=float, default=0.0, metavar="S",
                   help="replay only each episode's first S seconds (0: all), e.g. where the instruction decides")
    p.add_argument("--other-instruction", default=None, metavar="TEXT",
                   help="also replay the same steps and noise at the first NFE with TEXT instead of each episode's "
                        "instruction (e.g. the other colour): a policy that reads its instruction errs more with "
                        "it (ratio > 1); one that ignores it gives ratio 1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--timing-samples", type=int, default=10,
                   help="single-observation policy.sample() calls timed per NFE")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_cpu_threads_argument(p)
    p.add_argument("--seed", type=int, default=0)
    add_sync_arguments(p)
    return p


def evaluate(policy: MeanFlowPolicy, samples: SampleSet, rows: np.ndarray, nfe: int, batch_size: int,
             seed: int, instruction: str | None = None) -> dict[str, np.ndarray]:
    """Predicted chunks for ``rows`` and their errors against the recorded chunks (joint units); ``instruction``
    replaces the recorded ones (the noise is the same for the same seed)."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    preds, targets, pads = [], [], []
    for i in range(0, len(rows), batch_size):
        batch = samples.batch(rows[i:i + batch_size])
        if instruction is not None:
            batch["instruction"] = [instruction] * len(batch["instruction"])
        preds.append(policy.sample_batch(batch, nfe=nfe, generator=generator).cpu().numpy())
        targets.append(batch["actions"].numpy())
        pads.append(batch["action_is_pad"].numpy())
    pred, target, pad = np.concatenate(preds), np.concatenate(targets), np.concatenate(pads)
    err = np.abs(pred - target)  # (N, C, J)
    valid = ~pad
    per_step = (err.mean(axis=2) * valid).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    per_joint = (err * valid[..., None]).sum(axis=(0, 1)) / max(int(valid.sum()), 1)
    return {"pred": pred, "target": target, "per_step": per_step, "per_joint": per_joint,
            "first": err[:, 0].mean(axis=1), "mae": float((err.mean(axis=2) * valid).sum() / valid.sum())}


def instruction_check(policy: MeanFlowPolicy, samples: SampleSet, rows: np.ndarray, args: argparse.Namespace,
                      recorded: dict[str, np.ndarray]) -> dict[str, object]:
    """The same steps and noise with ``args.other_instruction``: how much worse the chunks fit, and how far they
    moved. Why: a multi-task policy can predict most steps from the state alone and learn to ignore its
    instruction; closed-loop success hides that until a scene where only the instruction decides."""
    other = evaluate(policy, samples, rows, args.nfe[0], args.batch_size, args.seed, args.other_instruction)
    check = {"other_instruction": args.other_instruction, "nfe": args.nfe[0], "mae_rad_recorded": recorded["mae"],
             "mae_rad_other": other["mae"], "ratio": other["mae"] / max(recorded["mae"], 1e-12),
             "chunk_change_rad": float(np.abs(other["pred"] - recorded["pred"]).mean())}
    LOG.info("with %r: chunk error %.4f rad vs %.4f with the recorded instructions (x%.2f); chunks moved %.4f rad",
             args.other_instruction, other["mae"], recorded["mae"], check["ratio"], check["chunk_change_rad"])
    return check


def time_sampling(policy: MeanFlowPolicy, samples: SampleSet, rows: np.ndarray, nfe: int, n: int,
                  seed: int) -> dict[str, float]:
    """Median/p90 of ``policy.sample`` latency on single observations (what the robot loop pays)."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    policy.sample(samples.observation(int(rows[0])), nfe=nfe, generator=generator)  # warm-up
    totals, experts = [], []
    for row in rows[np.linspace(0, len(rows) - 1, max(1, n)).astype(int)]:
        policy.sample(samples.observation(int(row)), nfe=nfe, generator=generator)
        totals.append(policy.last_timing["total_ms"])
        experts.append(policy.last_timing["expert_ms"])
    return {"median_total_ms": float(np.median(totals)), "p90_total_ms": float(np.percentile(totals, 90)),
            "median_expert_ms": float(np.median(experts))}


def plot(path: Path, result: dict, samples: SampleSet, rows: np.ndarray, runs: dict[int, dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    joints = samples.cfg.joint_names
    fig = plt.figure(figsize=(12, 9))
    ax = fig.add_subplot(3, 1, 1)
    x = np.arange(len(rows))
    for nfe, run in runs.items():
        ax.plot(x, run["per_step"], label=f"NFE {nfe}", lw=1)
    ax.set_xlabel("evaluated step (episodes in order)")
    ax.set_ylabel("chunk error (rad)")
    ax.set_title("open-loop chunk error vs recorded targets")
    ax.legend()
    ax = fig.add_subplot(3, 2, 3)
    nfes = list(runs)
    ax.plot(nfes, [result["nfe"][str(n)]["mae_rad"] for n in nfes], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("mean chunk error (rad)")
    ax = fig.add_subplot(3, 2, 4)
    ax.plot(nfes, [result["nfe"][str(n)]["timing"]["median_total_ms"] for n in nfes], "o-", color="tab:orange")
    ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("median latency (ms)")
    first = runs[nfes[0]]
    for j, name in enumerate(joints):
        ax = fig.add_subplot(3, len(joints), 2 * len(joints) + j + 1)
        ax.plot(x, first["target"][:, 0, j], label="recorded", lw=1)
        ax.plot(x, first["pred"][:, 0, j], label=f"NFE {nfes[0]}", lw=1)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
        if j == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    if any(n < 1 for n in args.nfe):
        raise ValueError(f"--nfe values must be >= 1, got {args.nfe}")
    if args.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    if args.first_seconds < 0:
        raise ValueError(f"--first-seconds must be >= 0, got {args.first_seconds}")
    device = resolve_device(args.device)
    apply_cpu_threads(args.cpu_threads)
    ensure_writable_dirs({"--out": args.out, "--cache-dir": args.cache_dir})
    policy = MeanFlowPolicy.load(args.checkpoint, device=device)
    sync = sync_config(policy.config, args)
    episodes, report = load_episodes(args.bags, sync, args.cache_dir, strict=args.strict)
    LOG.info("replaying %s", report.summary())
    samples = SampleSet(episodes, sync)
    rows = np.arange(0, len(samples), args.stride)
    if args.first_seconds > 0:
        rows = rows[samples.sample_step[rows] < round(args.first_seconds * sync.fps)]
    if rows.size == 0:
        raise ValueError(f"no synchronised step to replay (--first-seconds {args.first_seconds}, --stride "
                         f"{args.stride})")
    runs: dict[int, dict] = {}
    result: dict = {"checkpoint": str(args.checkpoint), "objective": policy.config.objective,
                    "episodes": [e.name for e in episodes], "skipped": report.skipped, "steps": int(len(rows)),
                    "chunk_size": sync.chunk_size, "joint_names": list(sync.joint_names), "device": str(device),
                    "nfe": {}}
    for nfe in args.nfe:
        start = time.perf_counter()
        run_ = evaluate(policy, samples, rows, nfe, args.batch_size, args.seed)
        timing = time_sampling(policy, samples, rows, nfe, args.timing_samples, args.seed)
        runs[nfe] = run_
        per_episode = {}
        for i, ep in enumerate(episodes):
            mask = samples.sample_episode[rows] == i
            if mask.any():
                per_episode[ep.name] = float(run_["per_step"][mask].mean())
        result["nfe"][str(nfe)] = {
            "mae_rad": run_["mae"], "first_action_mae_rad": float(run_["first"].mean()),
            "per_joint_mae_rad": dict(zip(sync.joint_names, run_["per_joint"].round(6).tolist())),
            "per_episode_mae_rad": per_episode, "per_step_mae_rad": run_["per_step"].round(6).tolist(),
            "step_time_s": [float(ns_to_s(samples.episodes[e].times_ns[s] - samples.episodes[e].times_ns[0]))
                            for e, s in zip(samples.sample_episode[rows], samples.sample_step[rows])],
            "timing": timing, "eval_seconds": round(time.perf_counter() - start, 3)}
        LOG.info("NFE %d: chunk error %.4f rad, first action %.4f rad, latency median %.1f ms", nfe, run_["mae"],
                 float(run_["first"].mean()), timing["median_total_ms"])
    if args.other_instruction is not None:
        result["instruction_check"] = instruction_check(policy, samples, rows, args, runs[args.nfe[0]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / EVAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    plot(args.out / EVAL_PNG, result, samples, rows, runs)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    code, args, result = run_cli(build_parser(), run, argv)
    if code:
        return code
    summary = {n: {k: v for k, v in r.items() if k in ("mae_rad", "first_action_mae_rad", "timing")}
               for n, r in result["nfe"].items()}
    printed = {"steps": result["steps"], "nfe": summary, "out": str(args.out)}
    if "instruction_check" in result:
        printed["instruction_check"] = result["instruction_check"]
    print(json.dumps(printed, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
