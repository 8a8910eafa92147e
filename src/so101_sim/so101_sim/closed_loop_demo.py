"""`make demo`: the simulated SO-101 and one multi-task Mean-Flow policy in closed loop, as real nodes over DDS.

Starts the sim node and the policy node as their own processes (what a launch file does in a distro), once for
the whole run, then acts as the operator on each task in turn: it sets the sim node's ``task`` and ``seed``
parameters (SetParameters), resets the sim (the new task's scene is built then), sends the task's instruction
through /meanflow_policy/set_instruction (the instruction, not a restart, decides what the policy does), enables
the policy, waits for /so101_sim/task_success or the task's time limit, and disables it. Prints one line per
episode (task, seed, success, score, seconds, median chunk latency), writes demo.json and, per task, a GIF (and an
MP4 where PyAV is installed) of the top | wrist cameras upscaled so a person can see them; the last line is one
JSON object. The policy node and its shipped checkpoint come from the policy plugin (so101_sim.policy_plugins),
so so101_sim does not import the policy.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import rclpy
from PIL import Image as PILImage
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float32
from std_srvs.srv import SetBool, Trigger

from so101_common.dds import claim_private_domain, require_loopback
from so101_common.graph import (JOINT_NAMES, JOINT_STATES_TOPIC, POLICY_ENABLE_SERVICE, POLICY_TIMING_TOPIC,
                                SET_INSTRUCTION_SERVICE, SIM_NODE, SIM_RESET_SERVICE, SIM_TASK_SCORE_TOPIC,
                                SIM_TASK_SUCCESS_TOPIC, camera_image_topic)
from so101_common.images import image_to_rgb, stamp_to_ns
from so101_common.process import NodeProcess
from so101_interfaces.msg import ChunkTiming
from so101_interfaces.srv import SetInstruction
from so101_sim.policy_plugins import SHIPPED_HELP, PolicyPluginError, node_module, resolve_checkpoint
from so101_sim.rollout import latency_summary, wilson_interval
from so101_sim.tasks import TASKS

PAPER_TASKS = ("pick_place", "stacking", "sorting")
# The sim's control rate: the tasks' max_steps are control steps at this rate.
FPS = 30.0
# Videos show every VIDEO_EVERY-th camera frame (10 fps) and are upscaled to at least this many pixels high.
VIDEO_EVERY = 3
VIDEO_CAMERAS = ("top", "wrist")  # left to right
VIDEO_MIN_HEIGHT = 384


class Operator(Node):
    """The demo's own node: service and parameter clients, and the observations it reports on."""

    def __init__(self) -> None:
        super().__init__("closed_loop_demo")
        self.reset = self.create_client(Trigger, SIM_RESET_SERVICE)
        self.instruct = self.create_client(SetInstruction, SET_INSTRUCTION_SERVICE)
        self.enable = self.create_client(SetBool, POLICY_ENABLE_SERVICE)
        self.sim_params = AsyncParameterClient(self, SIM_NODE)
        self.success = False
        self.score = 0.0
        self.timings: list[ChunkTiming] = []
        self.frames: list[np.ndarray] = []
        self.record_frames = False
        self.positions: np.ndarray | None = None
        self._pending: dict[int, dict[str, np.ndarray]] = {}  # stamp -> the cameras' images of that tick
        self._pairs = 0
        self.create_subscription(Bool, SIM_TASK_SUCCESS_TOPIC, self._on_success, 10)
        self.create_subscription(Float32, SIM_TASK_SCORE_TOPIC, self._on_score, 10)
        self.create_subscription(ChunkTiming, POLICY_TIMING_TOPIC, self.timings.append, 10)
        for camera in VIDEO_CAMERAS:
            self.create_subscription(Image, camera_image_topic(camera),
                                     lambda msg, c=camera: self._on_image(c, msg), qos_profile_sensor_data)
        self.create_subscription(JointState, JOINT_STATES_TOPIC, self._on_joints, qos_profile_sensor_data)

    def _on_success(self, msg: Bool) -> None:
        self.success = self.success or bool(msg.data)

    def _on_score(self, msg: Float32) -> None:
        self.score = float(msg.data)

    def _on_image(self, camera: str, msg: Image) -> None:
        """The sim publishes both cameras of one tick with one stamp: a video frame is the pair of one stamp."""
        if not self.record_frames:
            self._pending.clear()
            return
        stamp = stamp_to_ns(msg.header.stamp)
        self._pending.setdefault(stamp, {})[camera] = image_to_rgb(msg)
        if len(self._pending[stamp]) < len(VIDEO_CAMERAS):
            return
        images = self._pending.pop(stamp)
        for older in [s for s in self._pending if s < stamp]:  # its partner was lost (best-effort images)
            del self._pending[older]
        if self._pairs % VIDEO_EVERY == 0:
            self.frames.append(np.concatenate([images[c] for c in VIDEO_CAMERAS], axis=1))
        self._pairs += 1

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

    def wait_future(self, future, what: str, timeout: float = 30.0):
        if not self.spin_for(timeout, future.done):
            raise RuntimeError(f"{what}: no answer within {timeout:.0f} s")
        return future.result()

    def call(self, client, request, what: str, timeout: float = 30.0):
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"{what}: service {client.srv_name} did not appear within {timeout:.0f} s")
        return self.wait_future(client.call_async(request), f"{what} ({client.srv_name})", timeout)

    def set_sim_task(self, task: str, seed: int, timeout: float = 30.0) -> None:
        """Set the sim node's ``task`` and ``seed`` parameters (the task's scene is built at the next reset)."""
        if not self.sim_params.wait_for_services(timeout_sec=timeout):
            raise RuntimeError(f"set task: the parameter services of /{SIM_NODE} did not appear within "
                               f"{timeout:.0f} s")
        future = self.sim_params.set_parameters([Parameter("task", value=task), Parameter("seed", value=seed)])
        for result in self.wait_future(future, f"set task of /{SIM_NODE}", timeout).results:
            if not result.successful:
                raise RuntimeError(f"/{SIM_NODE} refused task={task!r} seed={seed}: {result.reason}")


def run_episode(op: Operator, task: str, seed: int, max_seconds: float, settle_s: float) -> dict:
    """One episode: set the sim's task, reset, instruct, enable, wait for success or the limit, disable."""
    instruction = TASKS[task].instruction
    op.call(op.enable, SetBool.Request(data=False), "disable policy")
    op.set_sim_task(task, seed)
    answer = op.call(op.reset, Trigger.Request(), "reset sim")
    if not answer.success:
        raise RuntimeError(f"sim reset failed: {answer.message}")
    if f"seed {seed} ({task}:" not in answer.message:
        raise RuntimeError(f"the sim node did not reset to task {task!r} seed {seed}: {answer.message!r}")
    op.spin_for(0.3)  # let the reset pose reach /joint_states
    op.success, op.score, op.timings[:] = False, 0.0, []
    start_pos = None if op.positions is None else op.positions.copy()
    reply = op.call(op.instruct, SetInstruction.Request(instruction=instruction), "set instruction")
    if not reply.accepted:
        raise RuntimeError(f"instruction refused: {reply.message}")
    op.record_frames = True
    t0 = time.monotonic()
    op.call(op.enable, SetBool.Request(data=True), "enable policy")
    succeeded = op.spin_for(max_seconds, lambda: op.success)
    seconds = time.monotonic() - t0
    if succeeded:  # at least a tick, so the score of the successful step has arrived too
        op.spin_for(max(settle_s, 0.1))
    score = op.score
    op.call(op.enable, SetBool.Request(data=False), "disable policy")
    op.record_frames = False
    moved = 0.0
    if start_pos is not None and op.positions is not None:
        moved = float(np.max(np.abs(op.positions - start_pos)))
    chunk_ms = [round(float(t.total_ms), 2) for t in op.timings]
    return {"task": task, "seed": seed, "success": bool(succeeded), "score": round(score, 3),
            "seconds": round(seconds, 2), "chunks": len(chunk_ms),
            "chunk_ms_median": round(float(np.median(chunk_ms)), 2) if chunk_ms else None,
            "max_joint_motion_rad": round(moved, 4), "chunk_total_ms": chunk_ms,
            "expert_ms": [round(float(t.expert_ms), 2) for t in op.timings],
            "nfe": sorted({int(t.nfe) for t in op.timings})}


def upscale_factor(height: int, min_height: int = VIDEO_MIN_HEIGHT) -> int:
    """The smallest whole factor that makes a frame ``min_height`` high or more (the policy's cameras are 64 px:
    too small to see anything at their own size)."""
    return max(1, math.ceil(min_height / height))


def write_videos(frames: list[np.ndarray], stem: Path) -> dict[str, str | None]:
    """``stem``.gif, and ``stem``.mp4 (H.264) where PyAV is installed, nearest-neighbour upscaled; returns the
    paths written."""
    k = upscale_factor(frames[0].shape[0])
    h, w = frames[0].shape[0] * k, frames[0].shape[1] * k
    # One palette for the whole video from up to 16 of its frames, applied to the small frames before the upscale:
    # a rendered scene has few colours, and quantizing each upscaled frame took ~150 ms a frame.
    sample = np.concatenate(frames[::max(1, len(frames) // 16)], axis=0)
    palette = PILImage.fromarray(sample).quantize(256)
    gif_frames = [PILImage.fromarray(f).quantize(palette=palette, dither=PILImage.Dither.NONE)
                  .resize((w, h), PILImage.Resampling.NEAREST) for f in frames]
    gif = stem.with_suffix(".gif")
    gif_frames[0].save(gif, save_all=True, append_images=gif_frames[1:], duration=1000.0 * VIDEO_EVERY / FPS,
                       loop=0)
    mp4 = None
    if importlib.util.find_spec("av") is not None:
        mp4 = stem.with_suffix(".mp4")
        with iio.imopen(mp4, "w", plugin="pyav") as video:  # frame by frame: a long sorting run is GBs upscaled
            video.init_video_stream("libx264", fps=FPS / VIDEO_EVERY)
            for f in frames:
                big = np.repeat(np.repeat(f, k, axis=0), k, axis=1)
                video.write_frame(np.ascontiguousarray(big[:h // 2 * 2, :w // 2 * 2]))  # yuv420p: even sizes
    return {"gif": str(gif), "mp4": None if mp4 is None else str(mp4)}


def task_summary(task: str, episodes: list[dict]) -> dict:
    successes = sum(e["success"] for e in episodes)
    low, high = wilson_interval(successes, len(episodes))
    return {"instruction": TASKS[task].instruction, "episodes": len(episodes), "successes": successes,
            "success_rate": successes / len(episodes), "ci95": [low, high],
            "score": round(float(np.mean([e["score"] for e in episodes])), 3),
            "chunk_ms": latency_summary([ms for e in episodes for ms in e["chunk_total_ms"]]),
            "expert_ms": latency_summary([ms for e in episodes for ms in e["expert_ms"]]),
            "results": episodes}


def parse_tasks(text: str) -> list[str]:
    """Comma-separated registered task names, each once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or [text]}; registered tasks: {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a task twice")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"policy checkpoint directory (default 'shipped'), or {SHIPPED_HELP}")
    parser.add_argument("--tasks", type=parse_tasks, default=list(PAPER_TASKS),
                        help=f"comma-separated tasks, run in turn (registered: {','.join(sorted(TASKS))})")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per task")
    parser.add_argument("--seed", type=int, default=1000, help="sim seed of each task's first episode")
    parser.add_argument("--nfe", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64, help="sim camera size (use the training demos')")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time limit of one episode (default: the task's max_steps at 30 Hz + --margin-seconds)")
    parser.add_argument("--margin-seconds", type=float, default=2.0,
                        help="added to the task's own limit: the policy's first chunk and DDS take time too")
    parser.add_argument("--settle-seconds", type=float, default=0.5, help="recorded after success")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    try:
        args.checkpoint = resolve_checkpoint(args.checkpoint)
        policy_module = node_module()
    except (PolicyPluginError, LookupError) as exc:
        parser.error(str(exc))
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint directory (no config.json)")
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be > 0")
    require_loopback()
    claim_private_domain()
    args.out.mkdir(parents=True, exist_ok=True)

    sim = NodeProcess("so101_sim.sim_node", ["--ros-args", "-p", f"task:={args.tasks[0]}", "-p", f"seed:={args.seed}",
                                             "-p", f"image_size:={args.image_size}", "-p", f"fps:={FPS}"],
                      args.out / "sim_node.log")
    policy = NodeProcess(policy_module, [
        "--ros-args", "-p", f"checkpoint:={args.checkpoint.resolve()}", "-p", f"nfe:={args.nfe}",
        "-p", "start_enabled:=false", "-p", "latency_compensation:=true",
        "-p", f"torch_threads:={args.torch_threads}"], args.out / "policy_node.log")
    rclpy.init()
    op = Operator()
    tasks: dict[str, dict] = {}
    try:
        print(f"[demo] sim node + one policy node (nfe={args.nfe}, {args.checkpoint}) over loopback DDS; tasks "
              f"{', '.join(args.tasks)}, {args.episodes} episode(s) each; logs in {args.out}", flush=True)
        for task in args.tasks:
            limit = args.max_seconds or TASKS[task].max_steps / FPS + args.margin_seconds
            print(f"[demo] task {task}: {TASKS[task].instruction!r} (limit {limit:.0f} s)", flush=True)
            episodes = []
            op.frames = []
            for i in range(args.episodes):
                for name, proc in (("sim node", sim), ("policy node", policy)):
                    if not proc.alive():
                        raise RuntimeError(f"{name} exited with code {proc.proc.returncode}; see its log in "
                                           f"{args.out}")
                record = run_episode(op, task, args.seed + i, limit, args.settle_seconds)
                episodes.append(record)
                med = record["chunk_ms_median"]
                print(f"[demo] {task} episode {i + 1}/{args.episodes} seed {record['seed']}: "
                      f"{'success' if record['success'] else 'failure'}, score {record['score']:.2f}, "
                      f"{record['seconds']:.1f} s, {record['chunks']} chunks, median chunk "
                      f"{'-' if med is None else f'{med:.1f}'} ms", flush=True)
            tasks[task] = task_summary(task, episodes)
            videos = write_videos(op.frames, args.out / task) if op.frames else {"gif": None, "mp4": None}
            tasks[task].update(videos)
            op.frames = []
    except RuntimeError as exc:
        print(f"so101-demo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        op.destroy_node()
        rclpy.try_shutdown()
        policy.stop()
        sim.stop()

    all_episodes = [e for t in tasks.values() for e in t["results"]]
    chunk = latency_summary([ms for e in all_episodes for ms in e["chunk_total_ms"]])
    report = {"nfe": args.nfe, "checkpoint": str(args.checkpoint), "image_size": args.image_size,
              "episodes": len(all_episodes), "successes": sum(e["success"] for e in all_episodes),
              "chunk_ms": chunk, "tasks": tasks}
    (args.out / "demo.json").write_text(json.dumps(report, indent=2))
    for task, summary in tasks.items():
        print(f"[demo] {task}: success {summary['successes']}/{summary['episodes']}, mean score "
              f"{summary['score']:.2f}, median chunk {summary['chunk_ms'].get('median_ms', float('nan')):.1f} ms; "
              f"{summary['gif']}" + (f", {summary['mp4']}" if summary["mp4"] else ""), flush=True)
    print(json.dumps({"tasks": {t: {"score": s["score"], "success_rate": s["success_rate"], "episodes": s["episodes"]}
                                for t, s in tasks.items()},
                      "chunk_ms_median": chunk.get("median_ms")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
