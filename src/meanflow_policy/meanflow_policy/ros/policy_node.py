"""ROS 2 node ``meanflow_policy``: camera images + joint states + an instruction in, JointTrajectory chunks out.

Thin wiring around the Mean-Flow policy and the plain-Python core in ``ros.runtime``. A managed (lifecycle) node,
like the driver: configure loads and warms up the checkpoint and creates the topics and services, activate starts
acting, deactivate stops and publishes a hold, cleanup frees the policy; ``autostart`` (default) configures and
activates at start, so no lifecycle manager is needed. Callbacks only convert and store messages; inference runs
on its own thread while active, so images, joint states and service calls keep flowing while the network runs. A
chunk is computed when every camera has delivered a new frame, at most ``rate_hz`` times a second, and only while
the node is active, enabled and has an instruction.

    python -m meanflow_policy.ros.policy_node --ros-args -p checkpoint:=/path/to/ckpt -p nfe:=1
    python -m meanflow_policy.ros.policy_node --ros-args -p checkpoint:=... -p autostart:=false
    ros2 lifecycle set /meanflow_policy configure && ros2 lifecycle set /meanflow_policy activate
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.event_handler import QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleNode, LifecyclePublisher, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_policy_name_from_kind
from rclpy.service import Service
from rclpy.subscription import Subscription
from rclpy.time import Time
from rclpy.timer import Timer
from sensor_msgs.msg import Image, JointState
from std_srvs.srv import SetBool
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from meanflow_policy.model.configuration import AUTO_PRECISION, BACKBONE_PRECISIONS
from meanflow_policy.ros.runtime import (
    DEFAULT_MAX_FUTURE_STAMP_S,
    HANDOFF_CHOICES,
    HANDOFF_OFF,
    ChunkError,
    ChunkStats,
    ClampMonitor,
    FutureStamp,
    HandoffPlan,
    Handoffs,
    ObservationNotReady,
    ObservationStale,
    ObservationStore,
    TrajectoryPlan,
    age_s,
    chunk_to_plan,
    hold_plan,
)
from so101_common.handoff import (DEFAULT_AVERAGE, DEFAULT_CANDIDATES, DEFAULT_CHUNK_SMOOTHING, DEFAULT_MAX_STEP,
                                  DEFAULT_RTC_CORRECTION, DEFAULT_RTC_GUIDANCE, HandoffError, smooth_chunk)
from so101_common.stamps import s_to_ns
from so101_common import graph
from so101_common.images import ImageError, image_to_rgb, stamp_to_ns
from so101_common.instruction import validate_instruction
from so101_common.joints import JointLimits
from so101_common.spin import spin_node
from so101_interfaces.msg import ChunkTiming
from so101_interfaces.srv import SetInstruction

DEVICES = ("cpu", "cuda")
# Images: latest only. Best effort by default: it matches reliable and best-effort camera drivers alike and, with
# the workspace's shared-memory DDS profile, loses nothing (and is ~1 ms faster for VGA pairs here). On transports
# that drop fragments of large best-effort samples, ``image_reliability:=reliable`` (publisher must be reliable).
IMAGE_RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
# Joint states are small: best effort matches reliable and best-effort writers (joint_state_broadcaster, sim).
JOINT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
# Commands and reports: reliable, as joint_trajectory_controller subscribes (SystemDefaultsQoS).
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
REPORT_MIN_PERIOD_S = 1.0
MAX_IMAGE_WAIT_S = 1.0
HOLD_ACK_TIMEOUT_S = 1.0
_SUCCESS = TransitionCallbackReturn.SUCCESS
_FAILURE = TransitionCallbackReturn.FAILURE
_ERROR = TransitionCallbackReturn.ERROR


class PolicyNodeError(RuntimeError):
    """A configuration problem: configure fails naming it (with autostart, the node stops at start)."""


class PolicyNode(LifecycleNode):
    """The policy as a managed ROS node.

    configure: read the parameters, load and warm up the checkpoint, create the topics and services. activate:
    act (the inference thread publishes chunks). deactivate: stop acting and hold the arm. cleanup: free the
    policy. With ``autostart`` (default) the constructor configures and activates, and raises PolicyNodeError
    when the node cannot run as configured, so a plain ``python -m`` or launch file needs no lifecycle manager.
    """

    def __init__(self) -> None:
        super().__init__(graph.POLICY_NODE)
        self._declare_parameters()
        self._lock = threading.Lock()  # instruction, enabled, epoch, publishing of trajectories
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None  # the inference thread, while active
        self._summary_timer: Timer | None = None
        self._policy: Any = None  # the MeanFlowPolicy while configured (imported at configure: heavy)
        # What configure creates and cleanup destroys (rclpy keeps its own lists as _publishers etc.).
        self._outputs: list[LifecyclePublisher] = []
        self._inputs: list[Subscription] = []
        self._servers: list[Service] = []
        self._watching_parameters = False
        self._autostarting = False
        self._failure = ""  # why the last configure failed
        if self._param("autostart"):
            self._autostart()
        else:
            self.get_logger().info(f"waiting for configure (ros2 lifecycle set /{graph.POLICY_NODE} configure, "
                                   "then activate)")

    def _autostart(self) -> None:
        """Configure and activate now; a failure ends the node at start (one FATAL line from spin_node, exit 2),
        as before the node was managed: nothing else would ever configure it."""
        self._autostarting = True
        try:
            if self.trigger_configure() != _SUCCESS:
                raise PolicyNodeError(self._failure)
            if self.trigger_activate() != _SUCCESS:
                raise PolicyNodeError("autostart: activate failed (see above)")
        finally:
            self._autostarting = False

    # ----- lifecycle ---------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except PolicyNodeError as exc:
            self._release_resources()
            self._failure = str(exc)
            if not self._autostarting:  # autostart: the constructor raises it and spin_node logs it once
                self.get_logger().error(f"configure failed, still unconfigured: {exc}")
            return _FAILURE
        except Exception:  # noqa: BLE001 - rclpy would turn it into ERROR without a word
            self._failure = "configure failed with an unexpected error (traceback above)"
            self.get_logger().error(f"configure failed:\n{traceback.format_exc()}")
            self._release_resources()
            return _ERROR
        return _SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers
        with self._lock:
            self._enabled = bool(self._param("start_enabled"))  # each activation starts from it
            self._epoch += 1
            self._moving = False  # a chunk went out since the last enable: stopping must publish a hold
            self._handoffs.reset()
        self._stop = threading.Event()  # this inference thread's own: one that outlived a stop keeps its set one
        self._worker = threading.Thread(target=self._run, args=(self._stop,), name="meanflow_inference",
                                        daemon=True)
        self._worker.start()
        log_period = float(self._param("log_period_s"))
        if log_period > 0:
            self._summary_timer = self.create_timer(log_period, self._log_summary)
        self.get_logger().info(
            f"ready: cameras {self._camera_topics}, joint states {self._joint_topic}, output "
            f"{self._param('output_topic')}, chunk {self._chunk_size} x {len(self._joint_names)} at dt "
            f"{self._dt * 1e3:.1f} ms, nfe {self._param('nfe')}, rate <= {self._param('rate_hz')} Hz, "
            f"hand-off {self._handoff_mode}, chunk smoothing {self._param('chunk_smoothing')} passes, "
            f"{'enabled' if self._enabled else 'disabled'}, instruction "
            f"{repr(self._instruction) if self._instruction else 'none yet'}")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().info(f"inactive: {self._stop_acting()}")
        return super().on_deactivate(state)  # disables the lifecycle publishers, after the hold went out

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_resources()
        self.get_logger().info("unconfigured: policy, topics and services released")
        return _SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().info(f"finalized: {self.release()}")
        return _SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in a transition: {self.release()}; back to unconfigured")
        return _SUCCESS

    def release(self) -> str:
        """Stop acting (holding the arm) and free everything; safe in any state and more than once. For
        shutdown, errors and the process's exit; returns what was done."""
        done = self._stop_acting()
        self._release_resources()
        return done

    def _stop_acting(self) -> str:
        """Stop the inference thread (waits for a chunk in progress; it is not published) and, when the policy
        moved the arm since it was enabled, publish a hold."""
        worker = self._worker
        if worker is None:
            return "was not acting"
        self._worker = None
        self._stop.set()
        self._wake.set()
        self._store.notify()
        with self._lock:
            held = self._halt()
        worker.join(timeout=30.0)
        # The hold must reach the controller before shutdown destroys the publisher: a destroyed writer no longer
        # resends a lost sample (and deactivate confirms it the same way).
        acked = self._traj_pub.wait_for_all_acked(Duration(seconds=HOLD_ACK_TIMEOUT_S))
        if self._summary_timer is not None:
            self.destroy_timer(self._summary_timer)
            self._summary_timer = None
        if worker.is_alive():
            self.get_logger().warning("the inference thread did not stop within 30 s; its chunk is discarded")
        done = "stopped acting" + (f"; {held}" if held else "")
        if not acked:
            done += f" (trajectories not acknowledged by every subscriber within {HOLD_ACK_TIMEOUT_S:.0f} s)"
        return done

    def _release_resources(self) -> None:
        """Destroy what configure created and drop the policy; safe whatever configure got to."""
        for pub in self._outputs:
            self.destroy_lifecycle_publisher(pub)
        for sub in self._inputs:
            self.destroy_subscription(sub)
        for srv in self._servers:
            self.destroy_service(srv)
        self._outputs, self._inputs, self._servers = [], [], []
        if self._watching_parameters:
            self.remove_post_set_parameters_callback(self._on_parameters_set)
            self._watching_parameters = False
        if self._policy is not None:
            self._policy = None
            if str(self._param("device")) == "cuda":
                torch.cuda.empty_cache()  # the weights' device memory goes back to other processes

    def _configure(self) -> None:
        """Read the parameters, load and warm up the checkpoint, create the topics and services; a problem is a
        PolicyNodeError naming it."""
        self._handoff_mode = str(self._param("handoff"))
        if self._handoff_mode not in HANDOFF_CHOICES:
            raise PolicyNodeError(f"parameter handoff is {self._handoff_mode!r}; expected one of "
                                  f"{list(HANDOFF_CHOICES)}")
        reliability = str(self._param("image_reliability"))
        if reliability not in IMAGE_RELIABILITY:
            raise PolicyNodeError(f"parameter image_reliability is {reliability!r}; expected one of "
                                  f"{sorted(IMAGE_RELIABILITY)}")
        self._instruction: str | None = None
        initial = str(self._param("instruction"))
        if initial:
            accepted, cleaned, message = validate_instruction(initial)
            if not accepted:
                raise PolicyNodeError(f"parameter instruction: {message}")
            self._instruction = cleaned

        self._policy = self._load_policy()
        if self._instruction is not None and self._policy.grounding is not None:
            self.get_logger().info(f"instruction{self._reading(self._instruction)}")
        config = self._policy.config
        self._joint_names = tuple(config.joint_names)
        try:
            self._limits = JointLimits.so101(self._joint_names)
        except ValueError as exc:
            raise PolicyNodeError(f"checkpoint joint_names do not fit the SO-101: {exc}") from exc
        self._dt = float(config.dt)
        self._chunk_size = int(config.chunk_size)
        self._camera_keys = tuple(config.camera_keys)
        topics = list(self._param("camera_topics"))
        if len(topics) != len(self._camera_keys):
            raise PolicyNodeError(f"parameter camera_topics has {len(topics)} topics but the checkpoint uses "
                                  f"{len(self._camera_keys)} cameras {list(self._camera_keys)} (same order)")
        self._camera_topics = dict(zip(self._camera_keys, topics))
        self._warm_up()

        self._store = ObservationStore(self._camera_keys, self._joint_names,
                                       float(self._param("max_future_stamp_s")))
        self._stats = ChunkStats()
        self._clamping = ClampMonitor()
        gripper = [i for i, name in enumerate(self._joint_names) if name == graph.GRIPPER_JOINT_NAME]
        self._handoffs = Handoffs(self._limits, self._dt, rtc_exempt=gripper)
        self._latency_s = 0.0  # observation -> publish of the last chunk: when to start the next one
        self._epoch = 0  # bumped on enable/disable/activate/deactivate: an older chunk must not be published
        self._last_report: dict[str, float] = {}  # problem kind -> monotonic time of its last report
        self._not_ready = ""  # the last reason no chunk could start: a new reason is logged at once

        self._traj_pub = self.create_lifecycle_publisher(JointTrajectory, self._param("output_topic"), OUTPUT_QOS)
        self._timing_pub = self.create_lifecycle_publisher(ChunkTiming, graph.POLICY_TIMING_TOPIC, OUTPUT_QOS)
        self._diag_pub = self.create_lifecycle_publisher(DiagnosticArray, graph.DIAGNOSTICS_TOPIC, OUTPUT_QOS)
        self._outputs = [self._traj_pub, self._timing_pub, self._diag_pub]
        image_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=IMAGE_RELIABILITY[reliability])
        for camera, topic in self._camera_topics.items():
            self._inputs.append(self.create_subscription(
                Image, topic, lambda msg, c=camera: self._on_image(c, msg), image_qos,
                event_callbacks=SubscriptionEventCallbacks(
                    incompatible_qos=lambda info, t=topic: self._on_incompatible_qos(t, info))))
        self._joint_topic = str(self._param("joint_states_topic"))
        self._inputs.append(self.create_subscription(JointState, self._joint_topic, self._on_joint_state,
                                                     JOINT_QOS))
        self._servers = [self.create_service(SetInstruction, graph.SET_INSTRUCTION_SERVICE, self._on_set_instruction),
                         self.create_service(SetBool, graph.POLICY_ENABLE_SERVICE, self._on_enable)]
        self.add_post_set_parameters_callback(self._on_parameters_set)
        self._watching_parameters = True
        self.get_logger().info(f"configured: {self._param('checkpoint')} loaded and warmed up"
                               + ("" if self._autostarting else "; activate to act"))

    # ----- setup -------------------------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        def declare(name: str, default: object, description: str, read_only: bool = True, **ranges) -> None:
            try:
                self.declare_parameter(name, default, ParameterDescriptor(description=description,
                                                                          read_only=read_only, **ranges))
            except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
                raise PolicyNodeError(f"parameter {name} (default {default!r}): {exc}") from exc

        declare("checkpoint", "", "Checkpoint directory (config.json, model.safetensors, stats.json; "
                "grounding.safetensors with instruction grounding). Required.")
        declare("device", "cpu", f"Torch device for inference, one of {DEVICES}.")
        declare("nfe", 1, "Network (action expert) evaluations per chunk; 1 = one-step Mean-Flow sampling.",
                read_only=False, integer_range=[IntegerRange(from_value=1, to_value=1000, step=1)])
        declare("rate_hz", 5.0, "Most chunks computed per second; a chunk also waits for a new frame from "
                "every camera.", read_only=False,
                floating_point_range=[FloatingPointRange(from_value=0.1, to_value=1000.0, step=0.0)])
        declare("image_reliability", "best_effort", f"QoS reliability of the image subscriptions, one of "
                f"{sorted(IMAGE_RELIABILITY)} (best_effort matches every camera driver; reliable needs a reliable "
                "publisher and avoids losing large images on lossy transports).")
        declare("joint_states_topic", graph.JOINT_STATES_TOPIC, "sensor_msgs/JointState input, mapped by name.")
        declare("output_topic", graph.TRAJECTORY_TOPIC, "trajectory_msgs/JointTrajectory output (the chunks).")
        declare("max_obs_age_s", 0.5, "Inputs older than this are stale: no chunk is published from them. Both "
                "the header stamp and the receive time (this node's clock) must be younger.", read_only=False,
                floating_point_range=[FloatingPointRange(from_value=0.001, to_value=3600.0, step=0.0)])
        declare("max_future_stamp_s", DEFAULT_MAX_FUTURE_STAMP_S, "Images and joint states stamped more than "
                "this ahead of this node's clock are refused and reported (a skewed sender clock would hide "
                "staleness).", read_only=False,
                floating_point_range=[FloatingPointRange(from_value=0.0, to_value=3600.0, step=0.0)])
        declare("latency_compensation", False, "Drop the chunk points already due at publish time and shift the "
                "rest by the observation-to-publish latency.", read_only=False)
        declare("handoff", HANDOFF_OFF, f"How a new chunk takes over from the trajectory being executed, one of "
                f"{list(HANDOFF_CHOICES)}. off: the chunk as computed (latency_compensation applies); replace: "
                "points already due are skipped; blend: weighted average with the rest of the old trajectory; rtc: "
                "the new chunk pulled onto the old one's position, fading out (the gripper switches). With a "
                "hand-off the next chunk also starts early enough to arrive before the published trajectory runs "
                "out.")
        declare("rtc_guidance", DEFAULT_RTC_GUIDANCE, "With handoff rtc: give each chunk the trajectory the arm "
                "executes while it is computed, so the correction at the hand-off is small: a checkpoint trained "
                "with committed rows (meanflow-train --action-prefix-rows) continues them at no extra cost, any "
                "other is steered onto them, every candidate before the closest are kept (flow matching: the RTC "
                "paper's guided denoising steps, ~3x the expert time; a one-step model: noise-space guidance, ~7x); "
                "false: the correction alone.", read_only=False)
        declare("rtc_correction", DEFAULT_RTC_CORRECTION, "With handoff rtc: fade the offset between the published "
                "trajectory and the new chunk where it takes over (minimum jerk); false: after the committed rows the "
                "chunk runs as generated (the RTC paper's execution: with rtc_guidance the chunk itself continues "
                "the trajectory).", read_only=False)
        declare("rtc_commit", 0, "With handoff rtc and rtc_guidance: rows of the published trajectory given to "
                "each chunk as committed at least, whatever the latency: the arm executes them as published and the "
                "chunk takes over after them (a checkpoint trained with committed rows continues them; 0: only "
                "the rows due while it computes).",
                read_only=False, integer_range=[IntegerRange(from_value=0, to_value=64, step=1)])
        declare("candidates", DEFAULT_CANDIDATES, "Chunks drawn per inference (one batched expert pass, the "
                "backbone run once), of which those that best continue the published trajectory are used, so "
                "consecutive chunks agree (coherent sampling); 1: a single draw (then rtc_guidance applies).",
                read_only=False,
                integer_range=[IntegerRange(from_value=1, to_value=64, step=1)])
        declare("average", DEFAULT_AVERAGE, "How many of the candidates closest to the published trajectory are "
                "averaged into the chunk (1: the closest alone; at most candidates).", read_only=False,
                integer_range=[IntegerRange(from_value=1, to_value=64, step=1)])
        declare("chunk_smoothing", DEFAULT_CHUNK_SMOOTHING, "Passes of the [1, 2, 1]/4 low-pass filter run along "
                "each chunk's rows before it is published (arm joints only, the gripper as the model made it; the "
                "first and last rows and any constant velocity are kept): removes a one-step policy's row-to-row "
                "jitter, which the arm turns into acceleration (docs/realtime.md, Chunk smoothing); 0: off.",
                read_only=False, integer_range=[IntegerRange(from_value=0, to_value=64, step=1)])
        declare("max_step", DEFAULT_MAX_STEP, "With a hand-off: largest change of a joint target from one control "
                "step to the next (rad), the first one included.", read_only=False,
                floating_point_range=[FloatingPointRange(from_value=1e-4, to_value=10.0, step=0.0)])
        declare("instruction", "", "Initial instruction (empty: wait for the set_instruction service).")
        declare("start_enabled", True, "Act as soon as an instruction is there; false: wait for ~/enable.")
        declare("backbone_precision", "float32", f"Inference precision of the backbone, one of "
                f"{', '.join(BACKBONE_PRECISIONS)} or {AUTO_PRECISION}: int8 (CPU only) quantises its Linear layers "
                "(real SmolVLM2 chunks 1.4x faster on an AVX2 CPU, 3.6x with AVX512-BF16: its vision attention "
                "then multiplies in bf16), bfloat16 casts it (GPUs; 3.4x on a CPU with AMX); auto picks the "
                "fastest measured for the device. The action expert always runs in float32 (docs/method.md, "
                "Backbone precision).")
        declare("image_size", 0, "Size (px) the camera images are read at: 0 is the checkpoint's trained size; a "
                "smaller one (a multiple of the backbone's patch x pixel-shuffle size) reads fewer patches and "
                "image tokens: cheaper chunks (the real SmolVLM2 vision pass shrinks with the square of the size) "
                "at some cost in success (docs/method.md, Lower camera resolution).",
                integer_range=[IntegerRange(from_value=0, to_value=4096, step=1)])
        declare("cuda_graphs", True, "With device cuda: replay each chunk's kernels as captured CUDA graphs (the "
                "first chunk of each instruction, step count and candidate count captures them, a few eager runs "
                "longer); the real SmolVLM2-500M architecture in bfloat16 then chunks 3.3x faster on an H200. "
                "Ignored on the CPU.")
        declare("compile_kernels", False, "With device cuda and cuda_graphs: also fuse the vision encoder's and "
                "the action expert's kernels with torch.compile (the first chunk of each shape then takes tens of "
                "seconds longer; the real SmolVLM2-500M architecture in bfloat16 then chunks another 1.1x faster on "
                "an H200). Ignored on the CPU.")
        declare("torch_threads", 0, "Torch intra-op threads for inference (0: torch's default, one per core). "
                "On a busy CPU, 1 avoids threads waiting on each other.",
                integer_range=[IntegerRange(from_value=0, to_value=256, step=1)])
        declare("log_period_s", 10.0, "Period of the timing summary in the log and on /diagnostics (0: off).")
        declare("autostart", True, "Configure and activate at startup (no lifecycle manager needed); false: wait "
                f"for the lifecycle transitions (ros2 lifecycle set /{graph.POLICY_NODE} configure, then activate).")

    def _param(self, name: str):
        return self.get_parameter(name).value

    def _load_policy(self):
        checkpoint = str(self._param("checkpoint"))
        device = str(self._param("device"))
        if not checkpoint:
            raise PolicyNodeError("parameter checkpoint is required (a directory written by MeanFlowPolicy.save)")
        if device not in DEVICES:
            raise PolicyNodeError(f"parameter device is {device!r}; expected one of {DEVICES}")
        if device == "cuda" and not torch.cuda.is_available():
            raise PolicyNodeError("parameter device is 'cuda' but torch finds no CUDA device; use device:=cpu")
        from meanflow_policy.model.checkpoint import CheckpointError  # heavy: only once parameters are known good
        from meanflow_policy.model.policy import MeanFlowPolicy

        threads = int(self._param("torch_threads"))
        if threads:
            torch.set_num_threads(threads)

        t0 = time.perf_counter()
        try:
            policy = MeanFlowPolicy.load(checkpoint, device=device, check_outputs=True)
        except (CheckpointError, RuntimeError) as exc:  # RuntimeError: the device (e.g. CUDA out of memory)
            raise PolicyNodeError(f"cannot load checkpoint {checkpoint!r}: {exc}") from exc
        try:
            precision = policy.backbone.set_precision(str(self._param("backbone_precision")))
        except ValueError as exc:
            raise PolicyNodeError(f"parameter backbone_precision: {exc}") from exc
        try:
            image_size = policy.set_image_size(int(self._param("image_size")))
        except ValueError as exc:
            raise PolicyNodeError(f"parameter image_size: {exc}") from exc
        graphs = device == "cuda" and bool(self._param("cuda_graphs"))
        if graphs:
            if bool(self._param("compile_kernels")):
                policy.compile_kernels()
            policy.use_cuda_graphs()
        self.get_logger().info(f"loaded {checkpoint} on {device} in {time.perf_counter() - t0:.1f} s "
                               f"(backbone {policy.config.backbone} in {precision} at {image_size} px, objective "
                               f"{policy.config.objective}{', CUDA graphs' if graphs else ''})")
        # Declared once the checkpoint is known (at the first configure): its default follows the checkpoint's
        # cameras, which stay the same for a later configure (checkpoint is read-only).
        if not self.has_parameter("camera_topics"):
            self.declare_parameter(
                "camera_topics", [graph.camera_image_topic(k) for k in policy.config.camera_keys],
                ParameterDescriptor(description="Image topics, one per camera of the checkpoint, in its camera_keys "
                                    f"order {list(policy.config.camera_keys)}.", read_only=True))
        return policy

    def _warm_up(self) -> None:
        """One sample on a blank observation, so the first real chunk does not pay for lazy initialisation."""
        size = int(self._policy.config.image_size)
        blank = {"images": {k: np.zeros((size, size, 3), np.uint8) for k in self._camera_keys},
                 "state": self._limits.middle.astype(np.float32), "instruction": self._policy.example_instruction}
        t0 = time.perf_counter()
        try:
            self._policy.sample(blank, nfe=int(self._param("nfe")))
        except RuntimeError as exc:  # the device (e.g. CUDA out of memory)
            raise PolicyNodeError(f"warm-up sample failed: {exc}") from exc
        self.get_logger().info(f"warm-up sample took {(time.perf_counter() - t0) * 1e3:.1f} ms")

    def _on_parameters_set(self, params: list[Parameter]) -> None:
        # Ranges and read-only flags are enforced by the descriptors; the next chunk reads the new values.
        for p in params:
            self.get_logger().info(f"parameter {p.name} set to {p.value!r}")
            if p.name == "max_future_stamp_s":
                self._store.max_future_stamp_s = float(p.value)
        self._wake.set()

    # ----- inputs ------------------------------------------------------------------------------------------
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_image(self, camera: str, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg)
        except ImageError as exc:
            self._stats.count("image_errors")
            text = f"image from {self._camera_topics[camera]} ignored: {exc}"
            self._report(DiagnosticStatus.ERROR, f"image:{camera}", text)
            return
        received_ns = self._now_ns()
        try:
            self._store.put_image(camera, rgb, stamp_to_ns(msg.header.stamp) or received_ns, received_ns)
        except FutureStamp as exc:
            self._stats.count("future_stamps")
            self._report(DiagnosticStatus.ERROR, f"future_stamp:{camera}",
                         f"image from {self._camera_topics[camera]} ignored: {exc}")

    def _on_incompatible_qos(self, topic: str, info: QoSRequestedIncompatibleQoSInfo) -> None:
        policy = qos_policy_name_from_kind(info.last_policy_kind)
        self._report(DiagnosticStatus.ERROR, f"qos:{topic}",
                     f"a publisher on {topic} has an incompatible {policy} QoS: no images from it (a best-effort "
                     f"camera needs image_reliability:=best_effort; now {self._param('image_reliability')})")

    def _on_joint_state(self, msg: JointState) -> None:
        received_ns = self._now_ns()
        try:
            self._store.put_joint_state(msg.name, msg.position, stamp_to_ns(msg.header.stamp) or received_ns,
                                        received_ns)
        except FutureStamp as exc:
            self._stats.count("future_stamps")
            self._report(DiagnosticStatus.ERROR, "future_stamp:joint_state",
                         f"joint state on {self._joint_topic} ignored: {exc}")
        except ValueError as exc:
            self._stats.count("joint_state_errors")
            text = f"joint state on {self._joint_topic} ignored: {exc}"
            self._report(DiagnosticStatus.ERROR, "joint_state", text)

    def _reading(self, instruction: str) -> str:
        """How a grounded checkpoint reads ``instruction`` ("; read as ..." / "; ... asks for no task ...: the arm
        holds"), empty without grounding."""
        grounding = self._policy.grounding
        if grounding is None:
            return ""
        g = grounding.ground(instruction)
        return f"; {g.describe()}" + ("" if g.instruction is not None else ": the arm holds where it is")

    def _on_set_instruction(self, request: SetInstruction.Request,
                            response: SetInstruction.Response) -> SetInstruction.Response:
        accepted, cleaned, message = validate_instruction(request.instruction)
        response.accepted = accepted
        if accepted:
            with self._lock:
                self._instruction = cleaned
            response.message = f"{message}; applies from the next chunk{self._reading(cleaned)}"
            self.get_logger().info(f"instruction set: {cleaned!r}{self._reading(cleaned)}")
            self._wake.set()
        else:
            response.message = message
            self.get_logger().warning(f"instruction rejected: {message}")
        return response

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if self._worker is None:  # transitions run on this executor thread too: no race with activate
            response.success = False
            response.message = (f"inactive: activate the node first (ros2 lifecycle set /{graph.POLICY_NODE} "
                                "activate); start_enabled applies at activation")
            return response
        response.success = True
        with self._lock:
            if bool(request.data) == self._enabled:
                response.message = f"already {'enabled' if self._enabled else 'disabled'}"
                return response
            self._enabled = bool(request.data)
            if self._enabled:
                self._epoch += 1
                self._handoffs.reset()  # a hand-off starts from where the arm is, not from a trajectory before
                self._moving = False
                response.message = "enabled" + ("" if self._instruction else "; waiting for an instruction")
            else:
                held = self._halt()
                response.message = "disabled" + (f"; {held}" if held else "")
        self.get_logger().info(f"policy {response.message}")
        self._wake.set()
        return response

    def _halt(self) -> str:
        """Under the lock: no chunk computed before now is published, and a hold when the policy moved the arm
        since it was enabled; returns what was done about the hold ('' when nothing moved)."""
        self._epoch += 1
        self._handoffs.reset()
        if not self._moving:
            return ""
        self._moving = False
        current = self._store.current_positions()
        if current is None:
            return "no joint state known, so no hold was published"
        self._publish_plan(hold_plan(current, self._limits, self._dt))
        return "holding at the current position"

    # ----- inference thread --------------------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        next_start = 0.0
        told_no_instruction = False
        while not stop.is_set() and self.context.ok():
            self._wake.clear()
            with self._lock:
                enabled, instruction = self._enabled, self._instruction
            if enabled and instruction is None and not told_no_instruction:
                told_no_instruction = True
                self.get_logger().info(f"no instruction yet: nothing is published until one is set with "
                                       f"{graph.SET_INSTRUCTION_SERVICE}")
            if not enabled or instruction is None:
                self._wake.wait(0.5)
                continue
            delay = next_start - time.monotonic()
            if delay > 0:
                stop.wait(delay)
                continue
            max_age = float(self._param("max_obs_age_s"))
            # Bounded wait, so a slow camera still gets its stale warning and new parameters apply soon; without
            # a new frame from every camera, take() refuses (frames already used never make a second chunk).
            self._store.wait_for_new_images(min(max_age, MAX_IMAGE_WAIT_S), cancel=stop)
            with self._lock:  # what holds when this chunk starts: an instruction set meanwhile applies to it
                enabled, instruction, epoch = self._enabled, self._instruction, self._epoch
            if stop.is_set() or not enabled or instruction is None:
                continue
            next_start = time.monotonic() + 1.0 / float(self._param("rate_hz"))
            try:
                self._step(instruction, epoch, max_age)
            except Exception as exc:  # noqa: BLE001 - one failed chunk must not end the node
                self._stats.count("inference_errors")
                text = f"chunk failed: {type(exc).__name__}: {exc}"
                self._report(DiagnosticStatus.ERROR, "inference", text)
            end_ns = self._handoffs.end_ns() if self._handoff_mode != HANDOFF_OFF else None
            if end_ns is not None:
                # Start early enough that the next chunk (at the last latency) arrives before this one runs out.
                left_s = (end_ns - self._now_ns()) * 1e-9 - self._latency_s - self._dt
                next_start = min(next_start, time.monotonic() + max(0.0, left_s))

    def _step(self, instruction: str, epoch: int, max_age: float) -> None:
        t0 = time.perf_counter()
        now_ns = self._now_ns()
        try:
            obs = self._store.take(now_ns, max_age, instruction)
        except ObservationNotReady as exc:
            text = f"no chunk yet, {exc} (cameras {self._camera_topics}, joints on {self._joint_topic})"
            if exc.reason != self._not_ready:  # e.g. the cameras stopped after the node had waited for joints
                self._not_ready = exc.reason
                self.get_logger().warning(text)
            else:
                self.get_logger().warning(text, throttle_duration_sec=5.0)
            return
        except ObservationStale as exc:
            self._stats.count("stale_observations")
            text = f"no chunk: stale observation: {exc}"
            self._report(DiagnosticStatus.WARN, "stale", text)
            return
        nfe = int(self._param("nfe"))
        candidates = int(self._param("candidates"))
        average = min(int(self._param("average")), candidates)
        guide = None
        guided_rtc = self._handoff_mode == "rtc" and bool(self._param("rtc_guidance"))
        commit = int(self._param("rtc_commit")) if guided_rtc else 0
        if candidates > 1 or guided_rtc:
            # The chunk replaces the next one about when the timer starts another: that many steps of it run.
            execute = max(1, round(1.0 / (float(self._param("rate_hz")) * self._dt)))
            with self._lock:
                guide = self._handoffs.guide(obs.newest_image_stamp_ns, self._latency_s, self._chunk_size, execute,
                                             commit)
        chunk = self._policy.sample(obs.as_policy_input(), nfe=nfe, guide=guide, candidates=candidates,
                                    average=average, steer=guided_rtc)
        timing = dict(self._policy.last_timing)
        publish_ns = self._now_ns()
        handoff = None
        try:
            if np.shape(chunk)[0] != self._chunk_size:
                raise ChunkError(f"model returned {np.shape(chunk)[0]} steps, the checkpoint says {self._chunk_size}")
            chunk = smooth_chunk(chunk, int(self._param("chunk_smoothing")), self._handoffs.rtc_exempt)
            if self._handoff_mode == HANDOFF_OFF:
                self._latency_s = age_s(publish_ns, obs.newest_image_stamp_ns)
                plan = chunk_to_plan(chunk, self._limits, self._dt, self._latency_s,
                                     bool(self._param("latency_compensation")))
                start = self._store.current_positions()
                if candidates > 1 and start is not None:  # the plan the next chunk's candidates continue
                    handoff = HandoffPlan(plan, start, delay_steps=0, limited=0, stale=False)
            else:
                with self._lock:  # against enable/deactivate, which reset the published trajectory
                    publish_ns = self._now_ns()
                    self._latency_s = age_s(publish_ns, obs.newest_image_stamp_ns)
                    handoff = self._handoffs.plan(self._handoff_mode, chunk, self._latency_s, publish_ns,
                                                  self._store.current_positions(), float(self._param("max_step")),
                                                  commit, bool(self._param("rtc_correction")))
                plan = handoff.plan
        except (ChunkError, HandoffError) as exc:
            self._stats.count("bad_chunks")
            text = f"no chunk: model output rejected: {exc}"
            self._report(DiagnosticStatus.ERROR, "output", text)
            return
        with self._lock:
            if self._epoch != epoch or not self._enabled:
                self._stats.count("chunks_discarded_after_disable")
                return
            self._publish_plan(plan, publish_ns)
            if handoff is not None:
                self._handoffs.remember(publish_ns, handoff)
            self._moving = True
        if handoff is not None and handoff.limited:
            self._stats.count("handoff_limited_values", handoff.limited)
        if handoff is not None and handoff.stale:
            self._stats.count("stale_chunks")
        total_ms = (time.perf_counter() - t0) * 1e3
        obs_age_ms = age_s(now_ns, obs.oldest_stamp_ns) * 1e3
        self._stats.add_chunk(total_ms, float(timing.get("expert_ms", 0.0)), obs_age_ms)
        if plan.clamped:
            self._stats.count("clamped_values", plan.clamped)
        clamping = self._clamping.observe(plan, int(np.size(chunk)))
        if clamping is not None:
            self._report(DiagnosticStatus.ERROR if clamping.error else DiagnosticStatus.WARN, "clamping",
                         clamping.message)
        if plan.dropped:
            self._stats.count("points_dropped_for_latency", plan.dropped)
        report = ChunkTiming(obs_age_ms=obs_age_ms, prefix_ms=float(timing.get("prefix_ms", 0.0)),
                             expert_ms=float(timing.get("expert_ms", 0.0)), total_ms=total_ms,
                             nfe=int(timing.get("nfe", nfe)))
        report.header.stamp = Time(nanoseconds=publish_ns).to_msg()
        self._timing_pub.publish(report)

    # ----- outputs -----------------------------------------------------------------------------------------
    def _publish_plan(self, plan: TrajectoryPlan, stamp_ns: int | None = None) -> None:
        msg = JointTrajectory()
        msg.header.stamp = Time(nanoseconds=stamp_ns or self._now_ns()).to_msg()
        msg.joint_names = list(self._joint_names)
        msg.points = [JointTrajectoryPoint(positions=[float(v) for v in row],
                                           time_from_start=Duration(nanoseconds=s_to_ns(t)).to_msg())
                      for t, row in zip(plan.times_s, plan.positions)]
        self._traj_pub.publish(msg)

    def _report(self, level: int, kind: str, message: str) -> None:
        """Log a problem and publish it as a diagnostic, at most once a second per kind (a bad stream comes at
        frame rate; each camera and input is its own kind, so one cannot hide another)."""
        now = time.monotonic()
        if now - self._last_report.get(kind, -1e9) < REPORT_MIN_PERIOD_S:
            return
        self._last_report[kind] = now
        if level == DiagnosticStatus.ERROR:
            self.get_logger().error(message)
        else:
            self.get_logger().warning(message)
        self._diagnose(level, message)

    def _diagnose(self, level: int, message: str) -> None:
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: policy", message=message,
                                  hardware_id=str(self._param("checkpoint")),
                                  values=[KeyValue(key=k, value=str(v))
                                          for k, v in sorted(self._stats.totals_snapshot().items())])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def _log_summary(self) -> None:
        summary = self._stats.summary()
        self.get_logger().info(f"timing: {summary}")
        self._diagnose(DiagnosticStatus.OK, summary)



def main(args: list[str] | None = None) -> None:
    sys.exit(spin_node(PolicyNode, graph.POLICY_NODE, args, cleanup=PolicyNode.release,
                       fatal_errors=(PolicyNodeError,)))


if __name__ == "__main__":
    main()
