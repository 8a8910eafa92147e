"""The stack's streams as a Rerun recording: the one mapping that ``so101-viz BAG`` and the live viz_node share.

Entities, all on the ``time`` timeline (a bag's receive time, or the live node's receive time):

- ``cameras/<camera>``: the camera images (JPEG-compressed unless ``jpeg_quality`` is 0);
- ``joints/<joint>/state``: one scalar series per joint (rad);
- ``joints/<joint>/plan/<line>``: every commanded trajectory (a policy chunk, a teleop target) at the future
  times its points are due, so a chunk is drawn ahead of the state it steers. A chunk that starts while an
  earlier one is still running (the policy replaces the rest of its last chunk) goes on another line, and each
  line is cleared just after its chunk's last point (a Clear breaks a Rerun plot line): no line joins two chunks;
- ``policy/timing/<field>``: the policy node's ChunkTiming per chunk (ms);
- ``instruction``: the episode's instruction.

rclpy is never imported here: the node module subscribes and hands the messages over.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rerun as rr
import rerun.blueprint as rrb

from meanflow_policy.data.bag_reader import TrajectoryCommand, trajectory_command
from so101_common.graph import CAMERA_NAMES, JOINT_NAMES
from so101_common.joints import joint_vector
from so101_common.stamps import NS_PER_S

APPLICATION_ID = "so101"
TIMELINE = "time"
INSTRUCTION_ENTITY = "instruction"
TIMING_ENTITY = "policy/timing"
# ChunkTiming fields drawn, in ms (so101_interfaces/msg/ChunkTiming).
TIMING_FIELDS = ("total_ms", "prefix_ms", "expert_ms", "obs_age_ms")
PLAN_COLOR = (255, 140, 0)


def camera_entity(camera: str) -> str:
    return f"cameras/{camera}"


def state_entity(joint: str) -> str:
    return f"joints/{joint}/state"


def plan_entity(joint: str, line: int) -> str:
    return f"joints/{joint}/plan/{line}"


def timing_entity(name: str) -> str:
    return f"{TIMING_ENTITY}/{name}"


def _time_column(times_ns: np.ndarray) -> rr.TimeColumn:
    return rr.TimeColumn(TIMELINE, timestamp=np.asarray(times_ns, dtype=np.int64).astype("datetime64[ns]"))


def open_stream(name: str, save: Path | None = None, spawn: bool = False, connect: str = "") -> rr.RecordingStream:
    """A recording called ``name``, sent to each sink asked for: an .rrd file, a viewer started here (or the one
    already listening on the default port), a viewer at a gRPC URL. ValueError when no sink is asked for, when a
    viewer is to be started without a display, or for the same viewer twice."""
    if spawn and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ValueError("no display to open a viewer on (DISPLAY and WAYLAND_DISPLAY are unset): save a file "
                         "instead, or connect to a viewer on a machine with a screen")
    sinks: list[Any] = []
    stream = rr.RecordingStream(APPLICATION_ID)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        sinks.append(rr.FileSink(save))
    if spawn:
        stream.spawn(connect=False)
        sinks.append(rr.GrpcSink())
    if connect:
        sinks.append(rr.GrpcSink(connect))
    if not sinks:
        raise ValueError("nothing to send the recording to: give a file to save, spawn a viewer or connect to one")
    stream.set_sinks(*sinks)
    stream.send_recording_name(name)
    return stream


def layout(cameras: tuple[str, ...] = CAMERA_NAMES) -> rrb.Blueprint:
    """Cameras and the instruction on the left; one plot per joint (state and plans) and the chunk timing."""
    return rrb.Blueprint(rrb.Horizontal(
        rrb.Vertical(*(rrb.Spatial2DView(origin=camera_entity(c), name=f"{c} camera") for c in cameras),
                     rrb.TextDocumentView(origin=INSTRUCTION_ENTITY, name="instruction"),
                     row_shares=[3.0] * len(cameras) + [1.0]),
        rrb.Grid(*(rrb.TimeSeriesView(origin=f"joints/{j}", name=f"{j} (rad)") for j in JOINT_NAMES),
                 rrb.TimeSeriesView(origin=TIMING_ENTITY, name="chunk timing (ms)"), grid_columns=2),
        column_shares=[1.0, 2.0]))


class PlanLines:
    """Which plot line a chunk goes on: the first line whose last chunk ended before this one starts."""

    def __init__(self) -> None:
        self.ends: list[int] = []

    def take(self, start_ns: int, end_ns: int) -> int:
        for line, end in enumerate(self.ends):
            if end < start_ns:
                self.ends[line] = end_ns
                return line
        self.ends.append(end_ns)
        return len(self.ends) - 1


@dataclass
class Counts:
    """What was logged: images per camera, joint states, chunks, timing reports."""

    images: dict[str, int] = field(default_factory=dict)
    joint_states: int = 0
    chunks: int = 0
    timings: int = 0

    def describe(self) -> str:
        cams = ", ".join(f"{n} {c}" for c, n in self.images.items()) or "none"
        return (f"images ({cams}), {self.joint_states} joint states, {self.chunks} chunks, "
                f"{self.timings} timing reports")


class StackLog:
    """Logs images, joint states, commanded chunks, chunk timing and the instruction into one recording."""

    def __init__(self, stream: rr.RecordingStream, jpeg_quality: int = 85,
                 cameras: tuple[str, ...] = CAMERA_NAMES) -> None:
        if not 0 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 0 (raw pixels) .. 100, got {jpeg_quality}")
        self.stream = stream
        self.jpeg_quality = jpeg_quality
        self.counts = Counts(images={c: 0 for c in cameras})
        self.lines = PlanLines()
        self._styled: set[str] = set()
        stream.set_log_time_enabled(False)  # one timeline: the receive time, not when this process logged
        stream.send_blueprint(layout(cameras))
        for joint in JOINT_NAMES:
            stream.log(state_entity(joint), rr.SeriesLines(names=f"{joint} state", widths=2.0), static=True)
        for name in TIMING_FIELDS:
            stream.log(timing_entity(name), rr.SeriesLines(names=name), static=True)

    def _at(self, t_ns: int) -> None:
        self.stream.set_time(TIMELINE, timestamp=np.datetime64(int(t_ns), "ns"))

    def instruction(self, text: str) -> None:
        self.stream.log(INSTRUCTION_ENTITY, rr.TextDocument(text), static=True)

    def image(self, camera: str, t_ns: int, rgb: np.ndarray) -> None:
        """One (H, W, 3) uint8 RGB frame of ``camera``."""
        if camera not in self.counts.images:
            raise ValueError(f"unknown camera {camera!r}; expected one of {list(self.counts.images)}")
        image = rr.Image(rgb, color_model="RGB")
        self._at(t_ns)
        self.stream.log(camera_entity(camera), image.compress(self.jpeg_quality) if self.jpeg_quality else image)
        self.counts.images[camera] += 1

    def joint_states(self, times_ns: np.ndarray, positions: np.ndarray) -> None:
        """Joint states at ``times_ns`` (N,), positions (N, 6) in JOINT_NAMES order: one column per joint."""
        positions = np.asarray(positions, dtype=np.float64).reshape(len(times_ns), len(JOINT_NAMES))
        index = [_time_column(times_ns)]
        for i, joint in enumerate(JOINT_NAMES):
            self.stream.send_columns(state_entity(joint), indexes=index,
                                     columns=rr.Scalars.columns(scalars=positions[:, i]))
        self.counts.joint_states += len(times_ns)

    def chunk(self, command: TrajectoryCommand) -> None:
        """A commanded trajectory, each point at the time it is due (receive time + time_from_start)."""
        if command.positions.shape[1] != len(command.joint_names):
            raise ValueError(f"trajectory names {len(command.joint_names)} joints but its points have "
                             f"{command.positions.shape[1]} positions")
        due = command.time_ns + np.round(command.times_s * NS_PER_S).astype(np.int64)
        line = self.lines.take(int(due.min()), int(due.max()))
        index = {n: i for i, n in enumerate(command.joint_names)}
        for joint in (j for j in JOINT_NAMES if j in index):
            entity = plan_entity(joint, line)
            if entity not in self._styled:
                self._styled.add(entity)
                self.stream.log(entity, rr.SeriesLines(colors=PLAN_COLOR, names=f"{joint} plan", widths=1.0),
                                rr.SeriesPoints(colors=PLAN_COLOR, names=f"{joint} plan", marker_sizes=1.0),
                                static=True)
            self.stream.send_columns(entity, indexes=[_time_column(due)],
                                     columns=rr.Scalars.columns(scalars=command.positions[:, index[joint]]))
            self._at(int(due.max()) + 1)
            self.stream.log(entity, rr.Clear(recursive=False))
        self.counts.chunks += 1

    def timing(self, t_ns: int, values: dict[str, float]) -> None:
        """One chunk's timing report (TIMING_FIELDS, ms)."""
        self._at(t_ns)
        for name in TIMING_FIELDS:
            self.stream.log(timing_entity(name), rr.Scalars(float(values[name])))
        self.counts.timings += 1

    # Messages as they arrive live (sensor_msgs/Image, JointState, JointTrajectory, so101_interfaces ChunkTiming);
    # a message that cannot be shown raises ValueError saying why.

    def on_image(self, camera: str, t_ns: int, msg: Any) -> None:
        from so101_common.images import image_to_rgb

        self.image(camera, t_ns, image_to_rgb(msg))

    def on_joint_state(self, t_ns: int, msg: Any) -> None:
        self.joint_states(np.array([t_ns]), joint_vector(msg.name, msg.position)[None])

    def on_trajectory(self, t_ns: int, msg: Any) -> None:
        self.chunk(trajectory_command(t_ns, msg))

    def on_timing(self, t_ns: int, msg: Any) -> None:
        self.timing(t_ns, {name: float(getattr(msg, name)) for name in TIMING_FIELDS})

    def close(self, timeout_s: float = 10.0) -> str:
        """Send what was logged to the sinks (the .rrd file complete) and close them; returns why not everything
        arrived ('' when it did): a viewer that cannot be reached is given ``timeout_s``, not forever."""
        try:
            self.stream.flush(timeout_sec=timeout_s)
            problem = ""
        except RuntimeError as exc:  # rerun's gRPC sink: "unable to connect"
            problem = str(exc)
        self.stream.disconnect()
        return problem
