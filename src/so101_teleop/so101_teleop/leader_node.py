"""Leader-arm teleop node: a hand-moved SO-101 leader arm mirrored onto the follower.

At ``rate_hz`` one SYNC_READ of the leader bus (torque off, read back at start and at exit) gives the leader's
joints; each tick publishes one JointTrajectory point on the arm's trajectory topic, due ``horizon_s`` after
receipt (0: at once, which the driver's standalone mode, the sim and joint_trajectory_controller all execute in
their next cycle: the least latency the follower side offers, and what the episode recorder stores as the action).
Engagement: always (deadman:=none), toggled by the space key on stdin (deadman:=key), or while the Joy-Con's
deadman button is held (deadman:=joy). Episode keys on stdin and Joy-Con buttons call the recorder's services.
"""
from __future__ import annotations

import os
import queue
import sys
import termios
import threading
import tty
from dataclasses import fields

from builtin_interfaces.msg import Duration
from rclpy.node import Node
from sensor_msgs.msg import JointState, Joy
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from so101_common.graph import (JOINT_NAMES, JOINT_STATES_TOPIC, JOY_TOPIC,
                                TRAJECTORY_TOPIC)
from so101_common.spin import spin_node
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration
from so101_teleop.episode_client import EpisodeClient
from so101_teleop.leader import (DEADMAN_SOURCES, KEY_HELP, ButtonMap, Control, Controls, LeaderArm, Mirror,
                                 MirrorSettings, load_leader_calibration)
from so101_teleop.params import declare as declare_parameter

BUTTON_HELP = {
    "button_deadman": "Joy button held to mirror with deadman:=joy",
    "button_start_episode": "Joy button: start an episode with the instruction parameter (-1: disabled)",
    "button_stop_episode": "Joy button: end the episode, saved (-1: disabled)",
    "button_discard_episode": "Joy button: discard the episode (-1: disabled)",
}
MIRROR_HELP = {
    "catchup_speed": "speed (rad/s per joint) at which the follower is walked to the leader after engaging",
    "sync_tolerance": "once every joint is this close (rad) to the leader, the follower mirrors it directly",
    "gripper_closed": "follower gripper position (rad) for the leader gripper's closed end",
    "gripper_open": "follower gripper position (rad) for the leader gripper's open end",
    "max_dt": "the most time (s) one late tick may walk during the catch-up",
}


class KeyReader:
    """Characters from stdin on a thread (a terminal is put in cbreak mode and restored on ``close``).

    A terminal of which this process is not in the foreground (started with ``&``, or in a session of its own) is
    left alone: touching it would stop the process (SIGTTOU/SIGTTIN) or steal another program's keys.
    """

    def __init__(self) -> None:
        self.keys: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.closed = threading.Event()
        self.why_closed = "stdin closed"
        self._fd = sys.stdin.fileno()
        self._saved = None
        if os.isatty(self._fd):
            try:
                foreground = os.tcgetpgrp(self._fd) == os.getpgrp()
            except OSError:
                foreground = False
            if not foreground:
                self.why_closed = "this process is not in the foreground of its terminal"
                self.closed.set()
                return
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        threading.Thread(target=self._run, name="leader-keys", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 64)
            except OSError:
                data = b""
            if not data:
                self.closed.set()
                return
            for char in data.decode(errors="replace"):
                self.keys.put(char)

    def close(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None


class LeaderNode(Node):
    def __init__(self) -> None:
        super().__init__("leader_teleop")

        def declare(name: str, default, description: str):
            return declare_parameter(self, name, default, description)

        port = str(declare("port", "/dev/ttyACM1", "serial device of the LEADER arm's bus"))
        baudrate = int(declare("baudrate", P.DEFAULT_BAUDRATE, "leader bus baud rate; STS3215 default 1000000"))
        calibration_file = str(declare("calibration_file", "", "the leader's calibration: LeRobot JSON "
                                       "(teleoperators/so101_leader/<id>.json) or so101-calibrate YAML; empty: "
                                       "uncalibrated (IDs 1-6, no offset, full range; for emulators only)"))
        write_calibration = bool(declare("write_calibration", True, "write Homing_Offset/limits into leader "
                                         "servos that differ from the calibration (torque is off anyway)"))
        reply_timeout_ms = float(declare("reply_timeout_ms", 10.0, "deadline for a leader servo's status frame"))
        retries = int(declare("retries", 1, "retries of a failed leader bus transaction"))
        self.rate_hz = float(declare("rate_hz", 100.0, "leader read and publish rate (Hz; at least 60)"))
        self.horizon_s = float(declare("horizon_s", 0.0, "time_from_start of each published target (s); 0: due "
                                       "at once (least latency)"))
        deadman = str(declare("deadman", "none", f"one of {DEADMAN_SOURCES}: mirror always, toggle with the "
                              "space key on stdin, or only while the Joy-Con deadman button is held"))
        keyboard = bool(declare("keyboard", True, "read episode/deadman keys from stdin"))
        joy_timeout_s = float(declare("joy_timeout_s", 0.25, "deadman:=joy: no Joy message for this long "
                                      "counts as released"))
        buttons = ButtonMap(**{f.name: int(declare(f.name, f.default, BUTTON_HELP[f.name]))
                               for f in fields(ButtonMap)})
        settings = MirrorSettings(**{f.name: float(declare(f.name, float(f.default), MIRROR_HELP[f.name]))
                                     for f in fields(MirrorSettings)})
        self.instruction = str(declare("instruction", "", "instruction sent with start_episode"))
        if not 60.0 <= self.rate_hz <= 1000.0:
            raise ValueError(f"parameter rate_hz must be in 60..1000 Hz, got {self.rate_hz}")
        if self.horizon_s < 0:
            raise ValueError(f"parameter horizon_s must be >= 0, got {self.horizon_s}")
        if deadman == "key" and not keyboard:
            raise ValueError("parameter deadman:=key needs keyboard:=true")
        self.controls = Controls(deadman, buttons, joy_timeout_s)
        if calibration_file:
            calibration = load_leader_calibration(calibration_file)
        else:
            calibration = ArmCalibration.default()
            self.get_logger().warning("no calibration_file: leader joint angles will not match the follower's")
        self.mirror = Mirror(settings, leader_limits=calibration.limits)

        self.bus = P.ServoBus(port, baudrate, reply_timeout_ms, retries)
        self.bus.open()
        self.leader = LeaderArm(self.bus, calibration)
        for line in self.leader.start(write_calibration):
            self.get_logger().warning(("wrote " if write_calibration else "MISMATCH ") + line)
        self.counts = {"ticks": 0, "published": 0, "missed_reads": 0, "bad_messages": 0}
        self.traj_pub = self.create_publisher(JointTrajectory, TRAJECTORY_TOPIC, 10)
        self.create_subscription(JointState, JOINT_STATES_TOPIC, self._on_joint_states, 10)
        self.create_subscription(Joy, JOY_TOPIC, self._on_joy, 10)
        self.episodes = EpisodeClient(self)
        self.keys = KeyReader() if keyboard else None
        self._keys_closed_logged = False
        self._mirroring = False
        self.create_timer(1.0 / self.rate_hz, self._tick)
        self.get_logger().info(f"leader on {port}: 6 servos, torque off (read back); mirroring at "
                               f"{self.rate_hz:g} Hz onto {TRAJECTORY_TOPIC}, deadman {deadman}"
                               + (f"; {KEY_HELP}" if keyboard else ""))

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _bad(self, what: str, exc: Exception) -> None:
        self.counts["bad_messages"] += 1
        self.get_logger().warning(f"ignored {what}: {exc}", throttle_duration_sec=2.0)

    def _on_joint_states(self, msg: JointState) -> None:
        try:
            self.mirror.on_follower_state(msg.name, msg.position)
        except ValueError as exc:
            self._bad("follower joint state", exc)

    def _on_joy(self, msg: Joy) -> None:
        for event in self.controls.on_joy(self._now(), msg.buttons):
            self._handle(event)

    def _tick(self) -> None:
        now = self._now()
        self.counts["ticks"] += 1
        self._poll_keys()
        engaged, changes = self.controls.transitions(now)
        for event in changes:
            self._handle(event)
        try:
            leader = self.leader.read()
        except P.BusError as exc:
            leader = None
            self.get_logger().error(f"leader bus read failed: {exc}", throttle_duration_sec=1.0)
        if leader is None:
            self.counts["missed_reads"] += 1
        target = self.mirror.step(now, leader, engaged)
        if engaged and not self.mirror.active and self.mirror.measured is None:
            self.get_logger().warning(f"waiting for {JOINT_STATES_TOPIC} of the follower", throttle_duration_sec=2.0)
        mirroring = self.mirror.active and not self.mirror.catching_up
        if mirroring and not self._mirroring:
            self.get_logger().info("follower reached the leader: mirroring")
        self._mirroring = mirroring
        if target is None:
            return
        point = JointTrajectoryPoint(positions=target.tolist())
        seconds = int(self.horizon_s)
        point.time_from_start = Duration(sec=seconds, nanosec=int(round((self.horizon_s - seconds) * 1e9)))
        self.traj_pub.publish(JointTrajectory(joint_names=list(JOINT_NAMES), points=[point]))
        self.counts["published"] += 1

    def _poll_keys(self) -> None:
        if self.keys is None:
            return
        while True:
            try:
                key = self.keys.keys.get_nowait()
            except queue.Empty:
                break
            for event in self.controls.on_key(key):
                self._handle(event)
        if self.keys.closed.is_set() and not self._keys_closed_logged:
            self._keys_closed_logged = True
            if self.controls.deadman == "key":
                self.get_logger().error(f"{self.keys.why_closed}: no keys (deadman:=key cannot engage)")
            else:
                self.get_logger().info(f"{self.keys.why_closed}: no keys")

    def _handle(self, event: Control) -> None:
        if event is Control.ENGAGE:
            self.get_logger().info("engaged: walking the follower to the leader")
        elif event is Control.DISENGAGE:
            self.get_logger().info("released: the follower holds its last target")
        elif event is Control.START_EPISODE:
            self.episodes.start(self.instruction)
        elif event is Control.STOP_EPISODE:
            self.episodes.stop()
        elif event is Control.DISCARD_EPISODE:
            self.episodes.discard()


    def release(self) -> str:
        """At exit: terminal restored, leader torque off again (read back), port closed."""
        if self.keys is not None:
            self.keys.close()
        try:
            self.leader.release()
            done = "leader torque off (read back)"
        except P.BusError as exc:
            done = f"LEADER TORQUE OFF NOT CONFIRMED: {exc}"
            self.get_logger().error(done)
        self.bus.close()
        return f"{done}, port closed; {self.counts['published']} targets published"


def main(args: list[str] | None = None) -> None:
    sys.exit(spin_node(LeaderNode, "leader_node", args if args is not None else sys.argv,
                       cleanup=LeaderNode.release, config_errors=(ValueError, P.BusError)))


if __name__ == "__main__":
    main()
