"""``so101-export-lerobot``: episode bags -> a LeRobotDataset v3.0 directory (see meanflow_policy.data.lerobot)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC, TRAJECTORY_TOPIC

from meanflow_policy.data.bag_reader import CLOCKS, BagError
from meanflow_policy.data.lerobot import ROBOT_TYPE, export_lerobot
from meanflow_policy.data.sync import ACTION_SOURCES, DatasetError, SyncConfig

LOG = logging.getLogger("so101_export_lerobot")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="so101-export-lerobot", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bags", nargs="+", required=True, type=Path, metavar="DIR",
                   help="episode bags or dataset folders holding them")
    p.add_argument("--out", required=True, type=Path, help="new LeRobotDataset directory")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate = the training grid rate (whole Hz)")
    p.add_argument("--cameras", nargs="+", default=["wrist", "top"], help="camera keys, in policy order")
    p.add_argument("--robot-type", default=ROBOT_TYPE, help="info.json robot_type")
    p.add_argument("--action-source", choices=ACTION_SOURCES, default="trajectory")
    p.add_argument("--clock", choices=CLOCKS, default="bag")
    p.add_argument("--max-image-age", type=float, default=0.1, help="seconds; older frames mark a step stale")
    p.add_argument("--max-state-age", type=float, default=0.1, help="seconds; older states mark a step stale")
    p.add_argument("--instruction", default=None, help="task for every bag (bags without episode.json)")
    p.add_argument("--camera-topic", action="append", default=[], metavar="CAMERA=TOPIC")
    p.add_argument("--joint-states-topic", default=JOINT_STATES_TOPIC)
    p.add_argument("--trajectory-topic", default=TRAJECTORY_TOPIC)
    p.add_argument("--strict", action="store_true", help="a bad episode is fatal instead of skipped")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        topics = []
        for item in args.camera_topic:
            cam, sep, topic = item.partition("=")
            if not sep or not cam or not topic.startswith("/"):
                raise ValueError(f"--camera-topic {item!r}: expected CAMERA=/topic")
            topics.append((cam, topic))
        cfg = SyncConfig(fps=args.fps, camera_keys=tuple(args.cameras), camera_topics=tuple(topics),
                         max_image_age_s=args.max_image_age, max_state_age_s=args.max_state_age,
                         action_source=args.action_source, clock=args.clock, instruction=args.instruction,
                         joint_states_topic=args.joint_states_topic, trajectory_topic=args.trajectory_topic,
                         joint_names=JOINT_NAMES)
        summary = export_lerobot(args.bags, args.out, cfg, robot_type=args.robot_type, strict=args.strict)
    except (DatasetError, BagError, ValueError, FileNotFoundError) as exc:
        LOG.error("%s", exc)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
