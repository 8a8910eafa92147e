"""``meanflow-train``: train the Mean-Flow policy from rosbag2 demonstrations (no ROS install needed).

Bags -> synchronised samples (cached once) -> train/val split by episode -> stats of the training split ->
``meanflow_policy.training.train``. Every ``--val-every`` steps: validation loss and the one-step action error
(joint units, radians) on the held-out episodes; ``best/`` (lowest one-step action error) and ``last/``
checkpoints; ``log.json``/``log.csv`` and ``loss.png`` at the end. ``--resume`` continues from ``last/``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from so101_common.graph import JOINT_STATES_TOPIC, TRAJECTORY_TOPIC

from meanflow_policy.bag_reader import CLOCKS, BagError
from meanflow_policy.configuration import OBJECTIVES, SMOLVLM2_500M_PRESET, MeanFlowConfig
from meanflow_policy.dataset import (
    ACTION_SOURCES,
    DatasetError,
    SampleSet,
    SyncConfig,
    compute_stats,
    ensure_writable_dirs,
    load_episodes,
    split_episodes,
)
from meanflow_policy.modeling import MeanFlowPolicy
from meanflow_policy.training import FINAL_DIR, TrainConfig, train

T = TypeVar("T")
LOG = logging.getLogger("meanflow_train")
PRESETS = ("tiny", "smolvlm2")
BEST_DIR, LAST_DIR = "best", "last"
PROGRESS_FILE = "progress.json"
DATASET_FILE = "dataset.json"
LOG_JSON, LOG_CSV, LOSS_PNG = "log.json", "log.csv", "loss.png"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "so101_meanflow" / "dataset"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bags", nargs="+", required=True, type=Path, metavar="DIR",
                   help="episode bags or dataset folders holding them (rosbag2, mcap or sqlite3)")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoints, logs, plot)")
    p.add_argument("--preset", choices=PRESETS, default="tiny",
                   help="tiny: in-code random backbone, 64 px (CPU); smolvlm2: SmolVLM2-500M architecture, 512 px")
    p.add_argument("--backbone", default=None,
                   help="local SmolVLM2 directory (or cached hub id) to load instead of the preset's backbone")
    p.add_argument("--objective", choices=OBJECTIVES, default="meanflow")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size (pixels)")
    p.add_argument("--train-backbone", action="store_true",
                   help="train the backbone too (meant for the random tiny preset; the paper freezes a pretrained "
                        "SmolVLM2)")
    p.add_argument("--tiny-patch-size", type=int, default=8,
                   help="vision patch size of the tiny preset (8: 16 tokens per 64 px image, 4: 64 tokens)")
    p.add_argument("--image-shift", type=int, default=0, metavar="PX",
                   help="random-shift augmentation: each training image moves by up to PX pixels (0: off)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (including resumed ones)")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="stop early, saving as at the end, once this much training time has passed (0: none)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps, at most 200")
    p.add_argument("--ema-decay", type=float, default=0.0)
    p.add_argument("--val-every", type=int, default=200, help="validate and checkpoint every K steps")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes held out for validation")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches per evaluation (at most)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last (weights and step count)")
    p.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights, config and normalisation stats (model "
                        "options on this command line are ignored); steps count from 0 in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_cpu_threads_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=30.0, help="synchronisation rate = chunk point rate (Hz)")
    p.add_argument("--chunk-size", type=int, default=20)
    add_sync_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def add_cpu_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is much faster on a CPU shared with other jobs")


def apply_cpu_threads(n: int) -> None:
    if n < 0:
        raise ValueError(f"--cpu-threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)


def add_sync_arguments(p: argparse.ArgumentParser) -> None:
    """Options of bag reading and synchronisation, shared by meanflow-train and meanflow-eval-bag."""
    p.add_argument("--action-source", choices=ACTION_SOURCES, default="trajectory",
                   help="trajectory: replayed commanded targets; next_state: the next joint state")
    p.add_argument("--clock", choices=CLOCKS, default="bag", help="bag receive time or message header stamps")
    p.add_argument("--max-image-age", type=float, default=0.1, help="seconds; older frames make a step stale")
    p.add_argument("--max-state-age", type=float, default=0.1, help="seconds; older joint states make a step stale")
    p.add_argument("--instruction", default=None, help="instruction for every bag (needed for bags without "
                                                       "episode.json; overrides recorded ones)")
    p.add_argument("--camera-topic", action="append", default=[], metavar="CAMERA=TOPIC",
                   help="read a camera from another topic, e.g. top=/overhead/image_raw")
    p.add_argument("--joint-states-topic", default=JOINT_STATES_TOPIC, help="sensor_msgs/JointState topic")
    p.add_argument("--trajectory-topic", default=TRAJECTORY_TOPIC,
                   help="trajectory_msgs/JointTrajectory topic of the commanded targets")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="preprocessed-episode cache")
    p.add_argument("--strict", action="store_true", help="a bad episode is fatal instead of skipped")


def sync_config(config: MeanFlowConfig, args: argparse.Namespace) -> SyncConfig:
    """The synchronisation a policy config and the command line's sync options ask for."""
    return SyncConfig.from_policy_config(
        config, max_image_age_s=args.max_image_age, max_state_age_s=args.max_state_age,
        action_source=args.action_source, clock=args.clock, instruction=args.instruction,
        camera_topics=_camera_topics(args.camera_topic), joint_states_topic=args.joint_states_topic,
        trajectory_topic=args.trajectory_topic)


def _camera_topics(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        cam, sep, topic = item.partition("=")
        if not sep or not cam or not topic.startswith("/"):
            raise ValueError(f"--camera-topic {item!r}: expected CAMERA=/topic")
        out.append((cam, topic))
    return tuple(out)


def policy_config(args: argparse.Namespace) -> MeanFlowConfig:
    """The model configuration the command line asks for."""
    common = dict(objective=args.objective, fps=args.fps, chunk_size=args.chunk_size, backbone_seed=args.seed,
                  train_backbone=args.train_backbone, image_shift_px=args.image_shift)
    if args.preset == "tiny":
        if args.backbone:
            raise ValueError("--backbone needs --preset smolvlm2 (the tiny preset has its own in-code backbone)")
        config = MeanFlowConfig.tiny(tiny_patch_size=args.tiny_patch_size, **common)
    else:
        config = MeanFlowConfig(backbone=args.backbone or SMOLVLM2_500M_PRESET, image_size=512, **common)
    if args.image_size:
        config = MeanFlowConfig.from_dict({**config.to_dict(), "image_size": args.image_size})
    return config


class Prefetcher:
    """Assemble the next batches in a background thread while the model trains on the current one."""

    def __init__(self, batches: Iterable[dict], depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(batches),), daemon=True)
        self._thread.start()

    def _fill(self, it: Iterator[dict]) -> None:
        try:
            for batch in it:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("batch", batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer thread
            self._queue.put(("error", exc))

    def __iter__(self) -> Iterator[dict]:
        while True:
            kind, item = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()


class Validator:
    """Validation on held-out episodes: loss, one-step action error; writes last/ and best/ checkpoints."""

    def __init__(self, val: SampleSet | None, batch_size: int, max_batches: int, out: Path, step_offset: int,
                 seed: int, best_so_far: float) -> None:
        self.out = out
        self.step_offset = step_offset
        self.seed = seed
        self.best = best_so_far
        self.val = val
        self.rows: list[np.ndarray] = []  # the same held-out samples every time; gathered when needed
        if val is not None:
            rows = np.random.default_rng(seed).permutation(len(val))[: batch_size * max_batches]
            self.rows = [np.sort(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    @torch.no_grad()
    def __call__(self, policy: MeanFlowPolicy, step: int) -> dict[str, float]:
        step += self.step_offset
        metrics: dict[str, float] = {}
        if self.val is not None:
            generator = torch.Generator(device=policy.device).manual_seed(self.seed)
            loss_sum, err_sum, first_sum, n_valid, n_samples = 0.0, 0.0, 0.0, 0, 0
            for rows in self.rows:
                batch = self.val.batch(rows)
                loss, _ = policy.compute_loss(batch, generator=generator)
                b = batch["state"].shape[0]
                loss_sum += float(loss) * b
                pred = policy.sample_batch(batch, nfe=1, generator=generator).cpu()
                err = (pred - batch["actions"]).abs()
                valid = ~batch["action_is_pad"]
                err_sum += float(err[valid].sum()) / err.shape[-1]
                n_valid += int(valid.sum())
                first_sum += float(err[:, 0].mean(dim=-1).sum())
                n_samples += b
            metrics = {"loss": loss_sum / n_samples, "action_mae_rad": err_sum / n_valid,
                       "first_action_mae_rad": first_sum / n_samples}
            LOG.info("step %d: val loss %.4f, one-step action error %.4f rad (first action %.4f rad)", step,
                     metrics["loss"], metrics["action_mae_rad"], metrics["first_action_mae_rad"])
        tmp = self.out / (LAST_DIR + ".saving")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save(tmp)
        _swap_in(tmp, self.out / LAST_DIR)
        improved = bool(metrics) and metrics["action_mae_rad"] < self.best
        if improved:
            self.best = metrics["action_mae_rad"]
            _replace_dir(self.out / LAST_DIR, self.out / BEST_DIR)
        (self.out / PROGRESS_FILE).write_text(json.dumps({"step": step, "best_action_mae_rad": self.best}) + "\n")
        return metrics


def _swap_in(new: Path, dst: Path) -> None:
    """Replace directory ``dst`` by ``new``; a crash leaves either the old or the new one under its name."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy directory ``src`` over ``dst`` (checkpoints: best/ from last/)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _swap_in(tmp, dst)


def write_logs(out: Path, history: list[dict]) -> None:
    """log.json, log.csv (one row per logged step or validation) and the loss-curve plot."""
    (out / LOG_JSON).write_text(json.dumps(history, indent=2) + "\n")
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / LOG_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in history if "loss" in r]
    val_rows = [r for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="val loss")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val_rows], [r["val_action_mae_rad"] for r in val_rows], "s--", color="tab:red",
                 label="val one-step action error (rad)")
        ax2.set_ylabel("action error (rad)")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    ax.set_title("meanflow-train")
    fig.tight_layout()
    fig.savefig(out / LOSS_PNG, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """The whole training run; returns a summary dict (also printed as JSON by ``main``)."""
    out: Path = args.out
    device = resolve_device(args.device)
    apply_cpu_threads(args.cpu_threads)
    ensure_writable_dirs({"--out": out, "--cache-dir": args.cache_dir})
    previous: list[dict] = []
    step_offset, best = 0, float("inf")
    if args.resume and args.init_from is not None:
        raise ValueError("--resume and --init-from exclude each other: resume continues OUT/last, "
                         "--init-from starts a new run from another checkpoint")
    if args.resume:
        progress_file = out / PROGRESS_FILE
        if not (out / LAST_DIR).is_dir() or not progress_file.is_file():
            raise ValueError(f"--resume: {out} has no {LAST_DIR}/ checkpoint and {PROGRESS_FILE} to resume from")
        progress = json.loads(progress_file.read_text())
        step_offset, best = int(progress["step"]), float(progress["best_action_mae_rad"])
        policy = MeanFlowPolicy.load(out / LAST_DIR, device=device)
        config = policy.config
        if (out / LOG_JSON).is_file():
            previous = [r for r in json.loads((out / LOG_JSON).read_text()) if r["step"] <= step_offset]
        LOG.info("resuming from %s at step %d (optimizer moments restart)", out / LAST_DIR, step_offset)
    elif args.init_from is not None:
        policy = MeanFlowPolicy.load(args.init_from, device=device)
        config = policy.config
        LOG.info("fine-tuning %s (%s objective) from step 0 into %s", args.init_from, config.objective, out)
    else:
        config = policy_config(args)
        policy = None
    remaining = args.steps - step_offset
    if remaining <= 0:
        LOG.info("nothing to do: %s already trained %d of %d steps", out, step_offset, args.steps)
        return {"steps": step_offset, "out": str(out)}

    sync = sync_config(config, args)
    cache = args.cache_dir
    start = time.perf_counter()
    episodes, report = load_episodes(args.bags, sync, cache, strict=args.strict)
    LOG.info("dataset: %s (%.1f s, cache %s)", report.summary(), time.perf_counter() - start, cache)
    train_eps, val_eps = split_episodes(episodes, args.val_fraction, args.seed)
    if not val_eps:
        LOG.warning("only %d episode(s): no held-out episode, validation metrics are skipped", len(episodes))
    train_set = SampleSet(train_eps, sync)
    val_set = SampleSet(val_eps, sync) if val_eps else None
    stats = compute_stats(train_eps)
    if policy is None:
        torch.manual_seed(args.seed)
        policy = MeanFlowPolicy(config).to(device)
        policy.set_stats(stats)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_FILE).write_text(json.dumps({
        "train_episodes": [{"name": e.name, "source": e.source, "key": e.key, "samples": int(e.sample_steps.size)}
                           for e in train_eps],
        "val_episodes": [{"name": e.name, "source": e.source, "key": e.key, "samples": int(e.sample_steps.size)}
                         for e in val_eps],
        "stats": stats, "sync": sync.cache_key(), "load_report": report.__dict__,
    }, indent=2, default=str) + "\n")
    LOG.info("train: %d episodes / %d samples; val: %d episodes / %d samples; device %s", len(train_eps),
             len(train_set), len(val_eps), len(val_set) if val_set else 0, device)

    warmup = args.warmup_steps if args.warmup_steps is not None else min(200, max(1, args.steps // 20))
    cfg = TrainConfig(steps=remaining, lr=args.lr, warmup_steps=0 if step_offset else warmup,
                      ema_decay=args.ema_decay, log_every=args.log_every, val_every=args.val_every,
                      seed=args.seed + step_offset, progress=not args.no_progress, time_limit_s=args.time_limit)
    validator = Validator(val_set, args.batch_size, args.val_batches, out, step_offset, args.seed, best)
    batches = Prefetcher(train_set.batches(args.batch_size, seed=args.seed + step_offset))
    if not step_offset:
        policy.eval()
        previous = [{"step": 0, **{f"val_{k}": v for k, v in validator(policy, 0).items()}}]
    start = time.perf_counter()
    try:
        history = train(policy, batches, cfg, out, val_fn=validator)
    finally:
        batches.close()
    elapsed = time.perf_counter() - start
    _swap_in(out / FINAL_DIR, out / LAST_DIR)
    history = previous + [{**row, "step": row["step"] + step_offset} for row in history]
    write_logs(out, history)
    train_rows = [r for r in history if "loss" in r]
    done = max(r["step"] for r in history)
    if done < args.steps:
        LOG.warning("stopped by --time-limit %.0f s at step %d of %d", args.time_limit, done, args.steps)
    summary = {"steps": done, "seconds": round(elapsed, 2), "steps_per_s": round((done - step_offset) / elapsed, 3),
               "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
               "best_val_action_mae_rad": None if validator.best == float("inf") else validator.best,
               "best": str(out / BEST_DIR) if (out / BEST_DIR).is_dir() else None, "last": str(out / LAST_DIR),
               "train_samples": len(train_set), "val_samples": len(val_set) if val_set else 0}
    return summary


def run_cli(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], T],
            argv: Sequence[str] | None) -> tuple[int, argparse.Namespace, T | None]:
    """Parse, log to stderr, run; bad input (bags, datasets, values, files) is one error line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    try:
        return 0, args, work(args)
    except (DatasetError, BagError, ValueError, FileNotFoundError) as exc:
        LOG.error("%s", exc)
        return 2, args, None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code, _, summary = run_cli(build_parser(), run, argv)
    except KeyboardInterrupt:
        LOG.warning("interrupted; resume with --resume (from the last validation checkpoint)")
        return 130
    if code == 0:
        print(json.dumps(summary, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
