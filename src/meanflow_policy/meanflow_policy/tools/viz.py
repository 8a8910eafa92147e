"""so101-viz: one episode bag in the Rerun viewer, or in an .rrd file to open later with `rerun FILE.rrd`.

Both cameras, one joint-state series per joint, every commanded trajectory chunk drawn at the future times its
points are due, the policy's chunk timing when the bag recorded /meanflow_policy/chunk_timing, and the
instruction of episode.json; the timeline is the bag's receive time. Without --save or --connect a viewer is
spawned (--spawn). A bag that cannot be shown is one error line and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from meanflow_policy.data.bag_reader import BagError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="so101-viz", description=__doc__.split("\n\n")[0])
    p.add_argument("bag", type=Path, metavar="BAG",
                   help="one episode: a rosbag2 directory (episode recorder, so101-sim-demos, ros2 bag record)")
    p.add_argument("--save", type=Path, default=None, metavar="OUT.rrd", help="write the recording to this file")
    p.add_argument("--spawn", action="store_true",
                   help="stream to a Rerun viewer, started unless one already listens on the default port "
                   "(the default when neither --save nor --connect is given)")
    p.add_argument("--connect", default="", metavar="URL",
                   help="stream to a viewer at this gRPC URL, e.g. rerun+http://HOST:9876/proxy")
    p.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality of the logged images; 0: raw pixels")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.jpeg_quality <= 100:
        print(f"so101-viz: --jpeg-quality must be 0..100, got {args.jpeg_quality}", file=sys.stderr)
        return 2
    from meanflow_policy.viz.bag import load_bag, log_bag
    from meanflow_policy.viz.rerun_log import StackLog, open_stream

    try:
        episode = load_bag(args.bag)
    except BagError as exc:
        print(f"so101-viz: {exc}", file=sys.stderr)
        return 2
    spawn = args.spawn or not (args.save or args.connect)
    try:
        stream = open_stream(args.bag.resolve().name, args.save, spawn, args.connect)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"so101-viz: cannot open the recording: {exc}", file=sys.stderr)
        return 2
    log = StackLog(stream, args.jpeg_quality)
    try:
        log_bag(episode, log)
    except BagError as exc:  # an image that cannot be decoded: the partial recording is not kept
        log.close()
        if args.save is not None:
            args.save.unlink(missing_ok=True)
        print(f"so101-viz: {exc}", file=sys.stderr)
        return 2
    problem = log.close()
    if problem:
        print(f"so101-viz: the viewer did not get the recording: {problem}", file=sys.stderr)
        return 2
    for line in episode.raw.warnings:
        print(f"so101-viz: warning: {line}", file=sys.stderr)
    where = ", ".join([str(args.save)] * (args.save is not None) + ["viewer"] * (spawn or bool(args.connect)))
    print(f"so101-viz: {episode.raw.name}: {log.counts.describe()} -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
