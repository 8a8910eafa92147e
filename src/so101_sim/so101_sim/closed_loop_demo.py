"""`make demo`: the simulated SO-101 and the Mean-Flow policy in closed loop, as real nodes over DDS.

Starts the sim node and the policy node as their own processes (what a launch file does in a distro), then acts
as the operator: for each episode it resets the sim, sends the instruction through
/meanflow_policy/set_instruction, enables the policy, waits for /so101_sim/task_success or the time limit, and
disables the policy. Prints success and per-chunk latency, writes a JSON report and a GIF of the top camera.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool
from std_srvs.srv import SetBool, Trigger

from so101_common.dds import claim_private_domain, require_loopback
from so101_common.process import NodeProcess
from so101_common.graph import (JOINT_NAMES, JOINT_STATES_TOPIC, POLICY_ENABLE_SERVICE, POLICY_TIMING_TOPIC,
                                SET_INSTRUCTION_SERVICE, SIM_RESET_SERVICE, SIM_TASK_SUCCESS_TOPIC,
                                camera_image_topic)
from so101_common.images import image_to_rgb
from so101_interfaces.msg import ChunkTiming
from so101_interfaces.srv import SetInstruction
from so101_sim.rollout import latency_summary, wilson_interval
from so101_sim.tasks import TASKS

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "meanflow_policy" / "checkpoints" / "sim_pick_place"


class Operator(Node):
    """The demo's own node: service clients and the observations it reports on."""

    def __init__(self) -> None:
        super().__init__("closed_loop_demo")
        self.reset = self.create_client(Trigger, SIM_RESET_SERVICE)
        self.instruct = self.create_client(SetInstruction, SET_INSTRUCTION_SERVICE)
        self.enable = self.create_client(SetBool, POLICY_ENABLE_SERVICE)
        self.success = False
        self.timings: list[ChunkTiming] = []
        self.frames: list[np.ndarray] = []
        self.record_frames = False
        self.positions: np.ndarray | None = None
        self.create_subscription(Bool, SIM_TASK_SUCCESS_TOPIC, self._on_success, 10)
        self.create_subscription(ChunkTiming, POLICY_TIMING_TOPIC, self.timings.append, 10)
        self.create_subscription(Image, camera_image_topic("top"), self._on_top, qos_profile_sensor_data)
        self.create_subscription(JointState, JOINT_STATES_TOPIC, self._on_joints, qos_profile_sensor_data)
        self._frame_count = 0

    def _on_success(self, msg: Bool) -> None:
        self.success = self.success or bool(msg.data)

    def _on_top(self, msg: Image) -> None:
        self._frame_count += 1
        if self.record_frames and self._frame_count % 3 == 0:
            self.frames.append(image_to_rgb(msg))

    def _on_joints(self, msg: JointState) -> None:
        index = {n: i for i, n in enumerate(msg.name)}
        if all(n in index for n in JOINT_NAMES):
            self.positions = np.array([msg.position[index[n]] for n in JOINT_NAMES])

    def spin_for(self, seconds: float, until=lambda: False) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rclpy.spin_once(self, timeout_sec=0.02)
            if until():
                return True
        return until()

    def call(self, client, request, what: str, timeout: float = 30.0):
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"{what}: service {client.srv_name} did not appear within {timeout:.0f} s")
        future = client.call_async(request)
        if not self.spin_for(timeout, future.done):
            raise RuntimeError(f"{what}: no answer from {client.srv_name} within {timeout:.0f} s")
        return future.result()


def run_episode(op: Operator, seed: int, instruction: str, max_seconds: float, settle_s: float) -> dict:
    """One episode: reset, instruct, enable, wait for success or the limit, disable; returns its record."""
    op.call(op.enable, SetBool.Request(data=False), "disable policy")
    answer = op.call(op.reset, Trigger.Request(), "reset sim")
    if not answer.success:
        raise RuntimeError(f"sim reset failed: {answer.message}")
    op.spin_for(0.3)  # let the reset pose reach /joint_states
    op.success, op.timings[:] = False, []
    start_pos = None if op.positions is None else op.positions.copy()
    reply = op.call(op.instruct, SetInstruction.Request(instruction=instruction), "set instruction")
    if not reply.accepted:
        raise RuntimeError(f"instruction refused: {reply.message}")
    op.record_frames = True
    t0 = time.monotonic()
    op.call(op.enable, SetBool.Request(data=True), "enable policy")
    succeeded = op.spin_for(max_seconds, lambda: op.success)
    seconds = time.monotonic() - t0
    if succeeded:
        op.spin_for(settle_s)
    op.call(op.enable, SetBool.Request(data=False), "disable policy")
    op.record_frames = False
    moved = 0.0
    if start_pos is not None and op.positions is not None:
        moved = float(np.max(np.abs(op.positions - start_pos)))
    return {"seed": seed, "success": bool(succeeded), "seconds": round(seconds, 2), "chunks": len(op.timings),
            "max_joint_motion_rad": round(moved, 4),
            "chunk_total_ms": [round(float(t.total_ms), 2) for t in op.timings],
            "expert_ms": [round(float(t.expert_ms), 2) for t in op.timings],
            "nfe": sorted({int(t.nfe) for t in op.timings})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="policy checkpoint directory")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1000, help="sim seed of the first episode")
    parser.add_argument("--nfe", type=int, default=1)
    parser.add_argument("--task", default="pick_place", choices=sorted(TASKS))
    parser.add_argument("--image-size", type=int, default=64, help="sim camera size (use the training demos')")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="time limit of one episode")
    parser.add_argument("--settle-seconds", type=float, default=0.5, help="recorded after success")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint directory (no config.json)")
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    require_loopback()
    claim_private_domain()
    args.out.mkdir(parents=True, exist_ok=True)
    instruction = TASKS[args.task].instruction

    sim = NodeProcess("so101_sim.sim_node", ["--ros-args", "-p", f"task:={args.task}", "-p", f"seed:={args.seed}",
                                             "-p", f"image_size:={args.image_size}"], args.out / "sim_node.log")
    policy = NodeProcess("meanflow_policy.ros.policy_node", [
        "--ros-args", "-p", f"checkpoint:={args.checkpoint.resolve()}", "-p", f"nfe:={args.nfe}",
        "-p", "start_enabled:=false", "-p", "latency_compensation:=true",
        "-p", f"torch_threads:={args.torch_threads}"], args.out / "policy_node.log")
    rclpy.init()
    op = Operator()
    episodes: list[dict] = []
    try:
        print(f"[demo] sim node + policy node (nfe={args.nfe}, {args.checkpoint}) over loopback DDS; "
              f"logs in {args.out}", flush=True)
        for i in range(args.episodes):
            for name, proc in (("sim node", sim), ("policy node", policy)):
                if not proc.alive():
                    raise RuntimeError(f"{name} exited with code {proc.proc.returncode}; see its log in {args.out}")
            record = run_episode(op, args.seed + i, instruction, args.max_seconds, args.settle_seconds)
            episodes.append(record)
            med = np.median(record["chunk_total_ms"]) if record["chunk_total_ms"] else float("nan")
            print(f"[demo] episode {i} seed {record['seed']}: {'success' if record['success'] else 'failure'} "
                  f"in {record['seconds']:.1f} s, {record['chunks']} chunks, median chunk {med:.1f} ms",
                  flush=True)
    finally:
        op.destroy_node()
        rclpy.try_shutdown()
        policy.stop()
        sim.stop()

    successes = sum(e["success"] for e in episodes)
    low, high = wilson_interval(successes, len(episodes))
    chunk = latency_summary([ms for e in episodes for ms in e["chunk_total_ms"]])
    expert = latency_summary([ms for e in episodes for ms in e["expert_ms"]])
    gif = args.out / "top_camera.gif"
    if op.frames:
        iio.imwrite(gif, np.stack(op.frames), duration=100, loop=0)
    report = {"episodes": len(episodes), "successes": successes, "success_rate": successes / len(episodes),
              "ci95": [low, high], "nfe": args.nfe, "chunk_ms": chunk, "expert_ms": expert,
              "checkpoint": str(args.checkpoint), "gif": str(gif) if op.frames else None, "results": episodes}
    (args.out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"[demo] success {successes}/{len(episodes)} ({100 * successes / len(episodes):.0f} %, 95 % CI "
          f"{100 * low:.0f}-{100 * high:.0f} %); chunk latency median {chunk.get('median_ms', float('nan')):.1f} ms "
          f"(expert {expert.get('median_ms', float('nan')):.1f} ms) at nfe={args.nfe}; GIF {gif}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
