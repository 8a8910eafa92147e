"""Training throughput: the backbone in every step vs the frozen backbone's cached prefix features.

``python -m meanflow_policy.tools.bench_train`` (``make bench-train``) writes synthetic episodes (two instructions) to a
temporary folder and times training steps (data gather + loss + backward + AdamW) of the same policy three ways:
``joint`` (the backbone trained with the expert, as the sim recipe does), ``frozen`` (frozen backbone, run in every
step) and ``frozen_cached`` (``--freeze-backbone``: the expert alone on cached prefix features). The last line is
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from meanflow_policy.model.configuration import (BACKBONE_PRESETS, MIXED_PRECISIONS, OBJECTIVES, TINY_BACKBONE,
                                                 TINY_SMOLLM2_PRESET, MeanFlowConfig, TrainConfig)
from meanflow_policy.data.cache import load_episodes
from meanflow_policy.data.samples import SampleSet, compute_stats
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.train.feature_cache import load_prefix_features
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.tools.common import add_cpu_threads_argument, apply_cpu_threads
from meanflow_policy.train.trainer import BatchSource, make_loader

_INSTRUCTIONS = ("reach the yellow square", "put the red cube in the left box")


def steps_per_s(policy: MeanFlowPolicy, samples: BatchSource, batch_size: int, steps: int, warmup: int,
                mixed_precision: str = "float32") -> float:
    """Training steps per second, batch gathering included, after ``warmup`` untimed steps; the forward pass in
    ``mixed_precision`` as the trainer runs it (TrainConfig.mixed_precision)."""
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator(device=policy.device).manual_seed(0)
    batches = iter(make_loader(samples, batch_size, seed=0))
    policy.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        batch = next(batches)
        with torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bfloat16"):
            loss, _ = policy.compute_loss(batch, generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if policy.device.type == "cuda":
        torch.cuda.synchronize(policy.device)
    return steps / (time.perf_counter() - start)


def write_synthetic_bags(folder: Path, episodes: int, duration_s: float) -> Path:
    """Synthetic reach episodes (two instructions) as rosbag2 episodes in ``folder``."""
    from meanflow_policy.data.demo_bags import synthetic_episode, write_bag  # needs the ROS message packages

    for i in range(episodes):
        write_bag(folder / f"episode_{i}", synthetic_episode(i, duration_s, height=96, width=128),
                  instruction=_INSTRUCTIONS[i % len(_INSTRUCTIONS)])
    return folder


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per synthetic episode")
    p.add_argument("--objective", choices=OBJECTIVES, default=MeanFlowConfig.objective)
    p.add_argument("--preset", choices=BACKBONE_PRESETS, default=TINY_BACKBONE,
                   help="tiny (64 px), tiny-smollm2 (tiny with the frozen pretrained SmolLM2, 64 px) or "
                        "smolvlm2-500m (the real architecture, random weights, 512 px)")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--tiny-patch-size", type=int, default=MeanFlowConfig.tiny_patch_size)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=TrainConfig.mixed_precision,
                   help="precision of every variant's matrix products (meanflow-train --mixed-precision)")
    p.add_argument("--bags", default="", help="time on these episode bags (a folder of episodes) instead of "
                   "writing synthetic ones")
    add_cpu_threads_argument(p)
    args = p.parse_args(argv)
    if args.batch_size < 2:
        p.error(f"--batch-size must be >= 2 (the policy normalises features with batch statistics), "
                f"got {args.batch_size}")
    apply_cpu_threads(args.cpu_threads)
    device = torch.device(args.device)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="meanflow_bench_train_") as tmp:
        root = Path(tmp)
        bags = Path(args.bags) if args.bags else write_synthetic_bags(root / "bags", args.episodes, args.duration)
        if args.preset in (TINY_BACKBONE, TINY_SMOLLM2_PRESET):
            base = MeanFlowConfig.tiny(backbone=args.preset, objective=args.objective,
                                       tiny_patch_size=args.tiny_patch_size)
        else:
            base = MeanFlowConfig(backbone=args.preset, image_size=512, objective=args.objective)
        if args.image_size:
            base = MeanFlowConfig.from_dict({**base.to_dict(), "image_size": args.image_size})
        sync = SyncConfig.from_policy_config(base)
        episodes, _ = load_episodes([bags], sync, root / "cache")
        samples = SampleSet(episodes, sync)
        stats = compute_stats(episodes)
        for name, train_backbone in (("joint", True), ("frozen", False), ("frozen_cached", False)):
            torch.manual_seed(0)
            config = MeanFlowConfig.from_dict({**base.to_dict(), "train_backbone": train_backbone})
            policy = MeanFlowPolicy(config).to(device)
            policy.set_stats(stats)
            data: BatchSource = samples
            if name == "frozen_cached":
                start = time.perf_counter()
                data, report = load_prefix_features(policy, samples, root / "cache", batch_size=args.batch_size)
                cache_s = time.perf_counter() - start
                print(f"prefix-feature cache for {len(samples)} samples: {cache_s:.2f} s ({report.summary()})")
            rates[name] = steps_per_s(policy, data, args.batch_size, args.steps, args.warmup, args.mixed_precision)
            print(f"{name:>14}: {rates[name]:.2f} steps/s = {rates[name] * args.batch_size:.0f} samples/s")
    load = os.getloadavg()[0]
    result = {"steps_per_s": {k: round(v, 3) for k, v in rates.items()},
              "ratio_cached_over_joint": round(rates["frozen_cached"] / rates["joint"], 2),
              "ratio_cached_over_frozen": round(rates["frozen_cached"] / rates["frozen"], 2),
              "preset": args.preset, "image_size": base.image_size,
              "tiny_patch_size": args.tiny_patch_size, "objective": args.objective,
              "mixed_precision": args.mixed_precision,
              "batch": args.batch_size, "device": str(device), "cpu_threads": torch.get_num_threads(),
              "cache_build_s": round(cache_s, 2), "samples": len(samples), "load_avg_1min": round(load, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
