"""End-to-end benchmark of the policy node: image stamp -> trajectory, against the bare model on the same input.

The policy node runs as its own process (as on the robot); this process plays the robot: it publishes camera
images and joint states over DDS and times the chunks coming back. Image sets go out one at a time, the next
after the previous one's chunk, so every chunk is caused by one known set; the node, with a high ``rate_hz``,
starts a chunk as soon as a new set is in.

    python -m meanflow_policy.tools.bench_node            # tiny preset, 640x480 images, nfe 1 and 10

The last line printed is one JSON object: ``e2e_ms_nfe1``, ``e2e_ms_nfe10`` (median image stamp -> trajectory
header stamp, which the node sets at publish) and ``overhead_ms``: the median over chunks, at the first nfe, of e2e
minus that same chunk's model time (prefix_ms + expert_ms, measured inside the node and sent on its timing topic),
i.e. everything the node adds to the bare model, DDS delivery of both images included. ``node_only_ms_*`` leaves
out the image delivery (node total_ms minus model time). ``bare_ms_*`` is ``policy.sample`` timed in this
process; it is only a reference, as the load of a shared machine differs between the two measurements.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor

from so101_common.dds import claim_private_domain, require_loopback
from so101_common.images import stamp_to_ns
from so101_common.joints import home_vector
from so101_common.process import NodeProcess
from so101_common.provenance import provenance

from meanflow_policy.model.configuration import AUTO_PRECISION, BACKBONE_PRECISIONS, SMOLVLM2_500M_PRESET, TINY_BACKBONE
from meanflow_policy.ros.probe import PolicyProbe
from so101_common.stamps import NS_PER_S


# Chunks from the streamed images before the timed ones (warm-up, and the gaps that size the quiet before them).
STREAMED_CHUNKS = 3
# Untimed policy.sample calls first: a bfloat16 or int8 backbone's first calls build its CPU kernels.
WARMUP_CALLS = 3


def bare_model_ms(checkpoint: Path, height: int, width: int, nfe: int, repeats: int, threads: int,
                  precision: str, read_size: int = 0) -> list[float]:
    """Wall time of ``policy.sample`` in this process on the same input the node gets, the backbone in
    ``precision`` as the node's ``backbone_precision``, the cameras read at ``read_size`` px as its ``image_size``;
    after ``WARMUP_CALLS`` untimed calls."""
    import torch

    from meanflow_policy.model.policy import MeanFlowPolicy

    if threads:
        torch.set_num_threads(threads)
    policy = MeanFlowPolicy.load(checkpoint, device="cpu")
    policy.backbone.set_precision(precision)
    policy.set_image_size(read_size)
    rng = np.random.default_rng(0)
    obs = {"images": {k: rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
                      for k in policy.config.camera_keys},
           "state": home_vector().astype(np.float32), "instruction": "pick up the cube"}
    for _ in range(WARMUP_CALLS):
        policy.sample(obs, nfe=nfe)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.sample(obs, nfe=nfe)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


class RobotSide:
    """This process's rclpy node playing the robot (a PolicyProbe streaming images) for a node under test."""

    def __init__(self, height: int, width: int, image_hz: float, joint_hz: float | None = 30.0) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("meanflow_bench_robot", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.probe = PolicyProbe(self.node, height, width)
        self.probe.start_streams(image_hz, joint_hz)

    def spin_until(self, done: Callable[[], bool], proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
        """Spin until ``done()``; raises with the other process's log if it exits or time runs out first."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[3]} (exit code {proc.poll()}) did not deliver in {timeout_s:g} s; "
                                   "log:\n" + log_path.read_text(errors="replace")[-3000:])
            self.executor.spin_once(timeout_sec=0.05)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def node_e2e_ms(checkpoint: Path, height: int, width: int, nfe: int, chunks: int, image_hz: float,
                threads: int, image_reliability: str, precision: str, log_dir: Path,
                read_size: int = 0) -> dict[str, list[float]]:
    """Start the policy node and time ``chunks`` chunks, each from the stamp of the image set that caused it.

    Lock-step: one image set, wait for its chunk, a pause of 1 / image_hz, the next set. The node starts a chunk
    only on a new frame from every camera, so each chunk belongs to exactly one set, however long it takes.
    """
    log_path = log_dir / f"policy_node_nfe{nfe}.log"
    node = NodeProcess("meanflow_policy.ros.policy_node", ["--ros-args", "-p", f"checkpoint:={checkpoint}",
                   "-p", f"nfe:={nfe}", "-p", "rate_hz:=1000.0", "-p", "max_obs_age_s:=2.0",
                   "-p", "instruction:=pick up the cube", "-p", "log_period_s:=0.0",
                   "-p", f"torch_threads:={threads}", "-p", f"image_reliability:={image_reliability}",
                   "-p", f"backbone_precision:={precision}", "-p", f"image_size:={read_size}"], log_path)
    proc = node.proc
    robot = RobotSide(height, width, image_hz)
    probe = robot.probe
    received, timings = probe.trajectories, probe.timings
    sets: list[int] = []
    try:
        # Model load, warm-up, discovery; then a few chunks from the stream show how long one takes.
        robot.spin_until(lambda: len(received) >= STREAMED_CHUNKS, proc, log_path, 600.0)
        probe.images_on = False
        # A chunk still computed from the last streamed set arrives before the timed ones start: quiet for twice
        # the longest gap between streamed chunks (a slow backbone's chunk takes longer than any fixed pause).
        gap_ns = max(b[1] - a[1] for a, b in zip(received, received[1:]))
        quiet_ns = max(NS_PER_S // 2, 2 * gap_ns)
        robot.spin_until(lambda: time.time_ns() - received[-1][1] > quiet_ns, proc, log_path, 120.0)
        received.clear()
        timings.clear()
        for _ in range(chunks):
            sets.append(probe.sensors.publish_images())
            robot.spin_until(lambda: len(received) == len(sets), proc, log_path, 60.0)
            pause = time.monotonic() + 1.0 / image_hz
            robot.spin_until(lambda pause=pause: time.monotonic() > pause, proc, log_path, 60.0)
    finally:
        robot.close()
        node.stop(timeout=15.0)
    by_stamp = {stamp_to_ns(t.header.stamp): t for t in timings}
    publish, receipt, overhead, node_only = [], [], [], []
    for stamp, (msg, recv_ns) in zip(sets, received):
        header_ns = stamp_to_ns(msg.header.stamp)
        publish.append((header_ns - stamp) / 1e6)
        receipt.append((recv_ns - stamp) / 1e6)
        timing = by_stamp.get(header_ns)
        if timing is not None:  # the same chunk's model and node times, measured inside the node
            overhead.append(publish[-1] - timing.prefix_ms - timing.expert_ms)
            node_only.append(timing.total_ms - timing.prefix_ms - timing.expert_ms)
    return {"publish_ms": publish, "receipt_ms": receipt, "overhead_ms": overhead, "node_only_ms": node_only,
            "node_total_ms": [t.total_ms for t in timings], "node_expert_ms": [t.expert_ms for t in timings],
            "node_nfe": [float(t.nfe) for t in timings]}


def preset_checkpoint(preset: str, path: Path) -> Path:
    """A checkpoint of random weights of ``preset`` saved to ``path`` (the tiny one as the tests make it; the real
    architecture as ``meanflow-bench`` builds it)."""
    from meanflow_policy.testing import make_tiny_checkpoint, plausible_stats
    from meanflow_policy.tools.bench import build_policy

    if preset == TINY_BACKBONE:
        return make_tiny_checkpoint(path, seed=0)
    policy = build_policy(preset, "cpu", None, "float32")
    policy.set_stats(plausible_stats(policy.config.joint_names))
    return policy.save(path)


def _stats(values: Sequence[float]) -> str:
    if not values:
        return "n 0"
    arr = np.asarray(values)
    return f"median {np.median(arr):7.2f}  p90 {np.percentile(arr, 90):7.2f}  min {arr.min():7.2f}  n {arr.size}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint dir (default: a fresh one of --preset)")
    parser.add_argument("--preset", choices=(TINY_BACKBONE, SMOLVLM2_500M_PRESET), default=TINY_BACKBONE,
                        help="without --checkpoint: random weights of this backbone preset (smolvlm2-500m: the real "
                             "architecture, 512 px; its checkpoint takes ~1.3 GB in a temporary directory)")
    parser.add_argument("--backbone-precision", default="float32",
                        help=f"the node's backbone_precision, bare model alike: one of {', '.join(BACKBONE_PRECISIONS)}"
                             f" or {AUTO_PRECISION} (the fastest measured for this device)")
    parser.add_argument("--read-size", type=int, default=0,
                        help="the node's image_size, bare model alike: read the cameras at this size (px; 0: the "
                             "checkpoint's)")
    parser.add_argument("--height", type=int, default=480, help="camera image height (default 480)")
    parser.add_argument("--width", type=int, default=640, help="camera image width (default 640)")
    parser.add_argument("--chunks", type=int, default=30, help="chunks timed per nfe (default 30)")
    parser.add_argument("--image-hz", type=float, default=4.0,
                        help="1 / pause between a chunk and the next image set (default 4)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 10], help="nfe values (default 1 10)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads, bare model and node alike (default 1; 0: torch's default)")
    parser.add_argument("--image-reliability", choices=("reliable", "best_effort"), default="best_effort",
                        help="the node's image_reliability parameter (default best_effort)")
    args = parser.parse_args(argv)
    if args.height < 1 or args.width < 1 or args.chunks < 1 or args.image_hz <= 0 or min(args.nfe) < 1:
        parser.error("sizes, --chunks, --image-hz and --nfe must be positive")
    if args.torch_threads < 0:
        parser.error("--torch-threads must be >= 0")
    if args.backbone_precision not in (*BACKBONE_PRECISIONS, AUTO_PRECISION):
        parser.error(f"--backbone-precision must be one of {', '.join(BACKBONE_PRECISIONS)} or {AUTO_PRECISION}")
    require_loopback()
    claim_private_domain()

    with tempfile.TemporaryDirectory(prefix="meanflow_bench_node_") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = preset_checkpoint(args.preset, Path(tmp) / args.preset)
        print(f"checkpoint {checkpoint}; images 2 x {args.width}x{args.height} rgb8, one set at a time, "
              f"{1 / args.image_hz:g} s apart; {args.chunks} chunks per nfe", flush=True)
        result: dict[str, float] = {}
        for nfe in args.nfe:
            try:
                bare = bare_model_ms(checkpoint, args.height, args.width, nfe, args.chunks, args.torch_threads,
                                     args.backbone_precision, args.read_size)
            except ValueError as exc:  # a size the checkpoint cannot read, before the node starts
                parser.error(f"--read-size {args.read_size}: {exc}")
            e2e = node_e2e_ms(checkpoint, args.height, args.width, nfe, args.chunks, args.image_hz,
                              args.torch_threads, args.image_reliability, args.backbone_precision, Path(tmp),
                              args.read_size)
            print(f"nfe {nfe:3d}  bare policy.sample ms     {_stats(bare)}")
            print(f"nfe {nfe:3d}  e2e stamp->publish ms     {_stats(e2e['publish_ms'])}")
            print(f"nfe {nfe:3d}  e2e stamp->receipt ms     {_stats(e2e['receipt_ms'])}")
            print(f"nfe {nfe:3d}  node total_ms (timing)    {_stats(e2e['node_total_ms'])}")
            print(f"nfe {nfe:3d}  overhead: e2e - model ms  {_stats(e2e['overhead_ms'])}")
            print(f"nfe {nfe:3d}  node total - model ms     {_stats(e2e['node_only_ms'])}")
            print(f"nfe {nfe:3d}  node expert_ms (timing)   {_stats(e2e['node_expert_ms'])}  "
                  f"reported nfe {sorted(set(int(v) for v in e2e['node_nfe']))}", flush=True)
            result[f"e2e_ms_nfe{nfe}"] = round(float(np.median(e2e["publish_ms"])), 2)
            result[f"e2e_receipt_ms_nfe{nfe}"] = round(float(np.median(e2e["receipt_ms"])), 2)
            result[f"bare_ms_nfe{nfe}"] = round(float(np.median(bare)), 2)
            result[f"overhead_ms_nfe{nfe}"] = round(float(np.median(e2e["overhead_ms"])), 2)
            result[f"node_only_ms_nfe{nfe}"] = round(float(np.median(e2e["node_only_ms"])), 2)
        result["overhead_ms"] = result[f"overhead_ms_nfe{args.nfe[0]}"]
        result["image_size"] = f"{args.width}x{args.height}"
        result["torch_threads"] = args.torch_threads
        result["image_reliability"] = args.image_reliability
        result["backbone_precision"] = args.backbone_precision
        result["read_size"] = args.read_size
        result["preset"] = args.preset if args.checkpoint is None else str(args.checkpoint)
        result.update(provenance())
        print(json.dumps(result))


if __name__ == "__main__":
    main()
