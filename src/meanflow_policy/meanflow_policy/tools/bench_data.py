"""Benchmark of the bag -> training data path: preprocessing, cached loading, loader and training throughput.

``python -m meanflow_policy.tools.bench_data`` writes synthetic episodes at camera resolution into a temporary folder,
then prints: cold preprocessing (read, synchronise, decode, resize, cache) in samples/s, a warm (cached) load,
the loader's samples/s with and without the background prefetcher, and tiny-preset training steps/s, so the
loader/training ratio shows whether training ever waits for data.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.data.cache import load_episodes
from meanflow_policy.data.samples import SampleSet, compute_stats
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.data.demo_bags import synthetic_episode, write_bag
from meanflow_policy.data.prefetch import Prefetcher
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.tools.common import add_cpu_threads_argument, apply_cpu_threads
from meanflow_policy.train.trainer import TrainConfig, train


def _loader_rate(batches, n_batches: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per episode")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--image-sizes", type=int, nargs="+", default=[64, 224], help="cached image sizes to load")
    p.add_argument("--device", default="cpu")
    add_cpu_threads_argument(p)
    args = p.parse_args(argv)
    apply_cpu_threads(args.cpu_threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="meanflow_bench_data_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for i in range(args.episodes):
            write_bag(root / "bags" / f"episode_{i}", synthetic_episode(i, args.duration, height=args.height,
                                                                        width=args.width), instruction="reach")
        print(f"wrote {args.episodes} episodes of {args.duration:.0f} s, 2 cameras {args.width}x{args.height} "
              f"@30 Hz in {time.perf_counter() - start:.1f} s")
        for size in args.image_sizes:
            sync = SyncConfig(image_size=size)
            start = time.perf_counter()
            episodes, report = load_episodes([root / "bags"], sync, root / "cache")
            cold = time.perf_counter() - start
            start = time.perf_counter()
            episodes, warm_report = load_episodes([root / "bags"], sync, root / "cache")
            warm = time.perf_counter() - start
            assert warm_report.from_cache == len(episodes)
            samples = SampleSet(episodes, sync)
            plain = _loader_rate(samples.batches(args.batch_size), 50, args.batch_size)
            fetcher = Prefetcher(samples.batches(args.batch_size))
            prefetched = _loader_rate(fetcher, 50, args.batch_size)
            fetcher.close()
            print(f"image {size}px: preprocessing {report.samples / cold:.0f} samples/s ({cold:.2f} s cold), "
                  f"cached load {warm:.3f} s; loader {plain:.0f} samples/s, with prefetch {prefetched:.0f} "
                  f"samples/s (batch {args.batch_size})")
        config = MeanFlowConfig.tiny()
        sync = SyncConfig.from_policy_config(config)
        episodes, _ = load_episodes([root / "bags"], sync, root / "cache")
        samples = SampleSet(episodes, sync)
        policy = MeanFlowPolicy(config).to(args.device)
        policy.set_stats(compute_stats(episodes))
        loader = _loader_rate(samples.batches(args.batch_size), 50, args.batch_size)
        history = train(policy, samples.batches(args.batch_size),
                        TrainConfig(steps=args.train_steps + 2, warmup_steps=1, log_every=1, progress=False),
                        root / "run")
        step_s = [r["step_s"] for r in history if "step_s" in r][2:]
        rate = len(step_s) / sum(step_s)
        print(f"training tiny preset on {args.device} ({torch.get_num_threads()} CPU threads): {rate:.2f} steps/s "
              f"= {rate * args.batch_size:.0f} samples/s (batch {args.batch_size}); loader {loader:.0f} samples/s "
              f"= {loader / (rate * args.batch_size):.0f}x what training consumes")


if __name__ == "__main__":
    main()
