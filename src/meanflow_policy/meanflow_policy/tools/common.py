"""Command-line helpers shared by the tools (meanflow-train, meanflow-eval-bag, the benchmarks): devices, CPU
threads, the bag-sync options, and one way to turn bad input into one error line and exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from so101_common.graph import JOINT_STATES_TOPIC, TRAJECTORY_TOPIC

from meanflow_policy.data.bag_reader import CLOCKS, BagError
from meanflow_policy.data.sync import ACTION_SOURCES, DatasetError, SyncConfig
from meanflow_policy.model.configuration import MeanFlowConfig

T = TypeVar("T")
LOG = logging.getLogger("meanflow_cli")


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


def run_json_cli(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], object],
                 argv: Sequence[str] | None) -> int:
    """``run_cli``, then the work's result printed as one JSON line (the tools whose last line is their result)."""
    code, _, result = run_cli(parser, work, argv)
    if result is not None:
        print(json.dumps(result))
    return code
