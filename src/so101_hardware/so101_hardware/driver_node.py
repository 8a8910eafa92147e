"""SO-101 driver node (lifecycle): the STS3215 bus behind ros2_control's topic-based hardware, or standalone.

configure: open the port, ping every servo (a missing one fails the transition naming it), load the calibration
(and write it into the servos when they differ). activate: torque on, goal = present position. deactivate /
shutdown / SIGINT / SIGTERM: torque off, confirmed by reading it back from every servo (so101_common.spin makes
that cleanup immune to the second signal ``ros2 launch`` sends). While active, a timer at ``rate_hz`` does one
SYNC_READ and one SYNC_WRITE.

Joint states are published only for a cycle in which EVERY servo answered: a consumer never gets a stale value
with a fresh stamp (the trajectory followers need all six joints, so a partial message is no use to them either).
While a servo is silent the state topic pauses, the log and /diagnostics name the joint, and the loop keeps
sending goals to the others.

mode ros2_control: joint states -> HW_STATES_TOPIC, joint commands <- HW_COMMANDS_TOPIC (JointState both ways),
                   served for joint_state_topic_hardware_interface; no command for command_timeout_ms: hold.
mode standalone:   no ros2_control (the pip environment): follows TRAJECTORY_TOPIC with the shared
                   TrajectoryFollower and publishes JOINT_STATES_TOPIC itself.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory

from so101_common.graph import (DIAGNOSTICS_TOPIC, HW_COMMANDS_TOPIC, HW_STATES_TOPIC, JOINT_NAMES,
                                JOINT_STATES_TOPIC, TRAJECTORY_TOPIC)
from so101_common.spin import spin_node
from so101_common.trajectory import TrajectoryError, TrajectoryFollower
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration, CalibrationError
from so101_hardware.driver import ArmDriver

MODES = ("ros2_control", "standalone")
_SUCCESS = TransitionCallbackReturn.SUCCESS
_FAILURE = TransitionCallbackReturn.FAILURE
_TYPE_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a floating-point number", str: "a string"}
# name -> (lowest, highest) accepted value; None: unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "baudrate": (1, None), "rate_hz": (1e-3, None), "max_step": (1e-9, None), "command_timeout_ms": (1e-3, None),
    "reply_timeout_ms": (1e-3, None), "retries": (0, None), "diagnostics_period_s": (1e-3, None),
    "p_gain": (0, 254), "i_gain": (0, 254), "d_gain": (0, 254), "acceleration": (0, 254)}


@dataclass
class _Window:
    """Totals of one servo at the previous diagnostics report: the report covers what happened since."""

    missed: int = 0
    timeouts: int = 0
    corrupt: int = 0
    status_errors: int = 0


class DriverNode(LifecycleNode):
    def __init__(self) -> None:
        super().__init__("so101_driver")
        self._declare("port", "/dev/ttyACM0", "serial device of the servo bus (Feetech/Waveshare USB adapter)")
        self._declare("baudrate", P.DEFAULT_BAUDRATE, "bus baud rate; STS3215 default 1000000")
        self._declare("calibration_file", "", "calibration YAML from so101-calibrate; empty: uncalibrated "
                      "(IDs 1-6, no offset, full range; for emulators only)")
        self._declare("write_calibration", True, "write Homing_Offset/limits into servos that differ from the file")
        self._declare("mode", "ros2_control", f"one of {MODES}: serve the topic-based hardware, or follow "
                      "joint trajectories without ros2_control")
        self._declare("rate_hz", 100.0, "control loop rate (one SYNC_READ + one SYNC_WRITE per cycle)")
        self._declare("max_step", 0.05, "largest goal change per cycle and joint (rad)")
        self._declare("command_timeout_ms", 200.0, "ros2_control mode: hold the last goal when no command came "
                      "for this long")
        self._declare("reply_timeout_ms", 10.0, "deadline for a servo's status frame")
        self._declare("retries", 2, "retries of a failed transaction before it counts as an error")
        self._declare("diagnostics_period_s", 1.0, "period of the /diagnostics report")
        self._declare("p_gain", 16, "servo P_Coefficient (factory 32; 16 avoids shaking on the SO-101)")
        self._declare("i_gain", 0, "servo I_Coefficient")
        self._declare("d_gain", 32, "servo D_Coefficient")
        self._declare("acceleration", 254, "servo Acceleration (0..254, 254 = fastest)")
        self._declare("autostart", False, "configure and activate at startup (no lifecycle manager needed)")
        self._bus: P.ServoBus | None = None
        self._driver: ArmDriver | None = None
        self._timer = None
        self._follower: TrajectoryFollower | None = None
        self._target: np.ndarray | None = None
        self._last_command_time = 0.0
        self._holding = False
        self._last_diag = 0.0
        self._last_bus_error = ""
        self._windows: dict[int, _Window] = {}
        self.counts = {"commands": 0, "bad_commands": 0, "trajectories": 0, "bad_trajectories": 0,
                       "failed_cycles": 0, "failed_writes": 0}
        self._mode = str(self._param("mode"))
        if self._mode not in MODES:
            raise ValueError(f"parameter mode must be one of {MODES}, got {self._mode!r}")
        for name, (low, high) in _RANGES.items():
            value = self._param(name)
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f">= {low}" if high is None else f"in {low}..{high}"
                raise ValueError(f"parameter {name} must be {bounds}, got {value}")
        if not str(self._param("port")):
            raise ValueError("parameter port must name the serial device, got an empty string")
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._diag_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        if self._mode == "ros2_control":
            self._state_pub = self.create_publisher(JointState, HW_STATES_TOPIC, reliable)
            self.create_subscription(JointState, HW_COMMANDS_TOPIC, self._on_command, reliable)
        else:
            self._state_pub = self.create_publisher(JointState, JOINT_STATES_TOPIC, reliable)
            self.create_subscription(JointTrajectory, TRAJECTORY_TOPIC, self._on_trajectory, reliable)
        next_step = "autostarting" if self._param("autostart") else "waiting for configure"
        self.get_logger().info(f"driver ready in {self._mode} mode on {self._param('port')}; {next_step}")

    def _declare(self, name: str, default: object, description: str) -> None:
        """Declare with a description; a value of the wrong type is a ValueError naming the parameter."""
        try:
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        except InvalidParameterTypeException:
            given = self._parameter_overrides[name].value  # rclpy keeps the --ros-args values there
            raise ValueError(f"parameter {name} must be {_TYPE_WORDS[type(default)]} (like its default "
                             f"{name}:={default!r}), got {given!r}") from None

    def _param(self, name: str):
        return self.get_parameter(name).value

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # -- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        path = str(self._param("calibration_file"))
        try:
            if path:
                calibration = ArmCalibration.load_yaml(path)
            else:
                calibration = ArmCalibration.default()
                self.get_logger().warning("no calibration_file: using IDs 1-6 with no offset and full range; "
                                          "joint angles will not match the URDF on a real arm")
            self._bus = P.ServoBus(str(self._param("port")), int(self._param("baudrate")),
                                   float(self._param("reply_timeout_ms")), int(self._param("retries")))
            self._bus.open()
            self._driver = ArmDriver(self._bus, calibration, float(self._param("max_step")))
            models = self._driver.connect()
            odd = {j: m for j, m in models.items() if m != P.STS3215_MODEL}
            if odd:
                self.get_logger().warning(f"servos that are not STS3215 (model {P.STS3215_MODEL}): {odd}")
            for line in self._driver.configure_servos(int(self._param("p_gain")), int(self._param("i_gain")),
                                                      int(self._param("d_gain")), int(self._param("acceleration"))):
                self.get_logger().info(f"servo setting written: {line}")
            differences = self._driver.sync_calibration(write=bool(self._param("write_calibration")))
            for line in differences:
                self.get_logger().warning(("wrote " if self._param("write_calibration") else "MISMATCH ") + line)
        except (P.BusError, CalibrationError, ValueError) as exc:
            self.get_logger().error(f"configure failed: {exc}")
            self._close_bus()
            return _FAILURE
        self.get_logger().info(f"configured: 6 servos answer on {self._bus.port_name}"
                               + (f", calibration {path}" if path else ""))
        return _SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        assert self._driver is not None
        try:
            start = self._driver.enable()
        except P.BusError as exc:
            self.get_logger().error(f"activate failed: {exc}")
            self._driver.disable()
            return _FAILURE
        self._target = start.copy()
        self._holding = False
        self._last_command_time = self._now()
        if not self._driver.limits.contains(start):
            self.get_logger().warning(f"arm starts outside the joint limits ({np.round(start, 3).tolist()} rad): "
                                      f"it will be brought inside at max_step per cycle")
        self._follower = TrajectoryFollower(self._driver.limits, start)
        self._timer = self.create_timer(1.0 / float(self._param("rate_hz")), self._cycle)
        self.get_logger().info(f"active: torque on, holding {np.round(start, 3).tolist()} rad, "
                               f"loop at {self._param('rate_hz')} Hz")
        return _SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_loop()
        if self._torque_off():
            self.get_logger().info("inactive: torque off (read back from every servo)")
        return _SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_bus()
        return _SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return _SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return _SUCCESS

    def release(self) -> str:
        """Stop the loop, torque off (read back), close the port; safe in any state and more than once.

        Returns what was done, for the one shutdown line; servos whose torque-off was not confirmed are logged
        as ERROR by name.
        """
        self._stop_loop()
        done = "torque was off"
        if self._driver is not None and self._driver.torque_on:
            done = ("torque off on all 6 servos (read back)" if self._torque_off()
                    else "TORQUE OFF NOT CONFIRMED (see error)")
        self._close_bus()
        return done + ", port closed"

    def _stop_loop(self) -> None:
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None

    def _torque_off(self) -> bool:
        """Torque off on every servo; False (and an ERROR naming the servos) when some did not confirm."""
        if self._driver is None or self._bus is None or not self._bus.is_open:
            self.get_logger().error("torque off impossible: the servo bus is not open")
            return False
        failures = self._driver.disable()
        if failures:
            self.get_logger().error("torque off NOT confirmed by " + "; ".join(failures)
                                    + ": cut the servo power before touching the arm")
        return not failures

    def _close_bus(self) -> None:
        if self._bus is not None:
            self._bus.close()
        self._bus = None
        self._driver = None

    # -- inputs
    def _on_command(self, msg: JointState) -> None:
        if self._target is None:
            return
        try:
            target = self._target.copy()
            if len(msg.name) != len(msg.position):
                raise ValueError(f"{len(msg.name)} names but {len(msg.position)} positions")
            index = {n: i for i, n in enumerate(JOINT_NAMES)}
            unknown = [n for n in msg.name if n not in index]
            if unknown:
                raise ValueError(f"unknown joints {unknown}")
            for name, value in zip(msg.name, msg.position):
                target[index[name]] = value
            if not np.all(np.isfinite(target)):
                raise ValueError("NaN or inf position")
        except ValueError as exc:
            self.counts["bad_commands"] += 1
            self.get_logger().warning(f"ignored joint command: {exc}", throttle_duration_sec=1.0)
            return
        self._target = target
        self._last_command_time = self._now()
        self.counts["commands"] += 1
        if self._holding:
            self.get_logger().info("commands resumed")
            self._holding = False

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        if self._follower is None:
            self.get_logger().warning("trajectory ignored: driver not active", throttle_duration_sec=2.0)
            return
        try:
            if any(len(p.positions) != len(msg.joint_names) for p in msg.points):
                raise TrajectoryError(f"every point needs {len(msg.joint_names)} positions")
            times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
            positions = np.array([list(p.positions) for p in msg.points], dtype=np.float64)
            positions = positions.reshape(len(msg.points), len(msg.joint_names))
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            self._follower.set_trajectory(self._now(), msg.joint_names, times, positions, start_time=stamp)
        except (TrajectoryError, ValueError) as exc:
            self.counts["bad_trajectories"] += 1
            self.get_logger().warning(f"ignored trajectory: {exc}", throttle_duration_sec=1.0)
            return
        self.counts["trajectories"] += 1

    # -- the loop
    def _cycle(self) -> None:
        driver = self._driver
        if driver is None:
            return
        now = self._now()
        self._bus_cycle(driver, now)
        if now - self._last_diag >= float(self._param("diagnostics_period_s")):
            self._last_diag = now
            self._publish_diagnostics()

    def _bus_cycle(self, driver: ArmDriver, now: float) -> None:
        """One SYNC_READ -> joint states, one SYNC_WRITE of the clamped target; bus errors are counted, not fatal."""
        try:
            reading = driver.read()
        except P.BusError as exc:
            self.counts["failed_cycles"] += 1
            self._last_bus_error = str(exc)
            self.get_logger().error(f"bus read failed: {exc}", throttle_duration_sec=1.0)
            return
        if reading.fresh.all():
            self._publish_state(reading.positions, reading.velocities)
        else:
            stale = [n for n, f in zip(JOINT_NAMES, reading.fresh) if not f]
            self.get_logger().warning(f"no reply this cycle from {stale} (retried): joint states withheld",
                                      throttle_duration_sec=1.0)

        if self._mode == "standalone":
            target = self._follower.sample(now)
        else:
            timeout = float(self._param("command_timeout_ms")) / 1000.0
            if not self._holding and now - self._last_command_time > timeout:
                self._holding = True
                self._target = driver.goal.copy()
                self.get_logger().warning(f"no joint command for {timeout * 1000:.0f} ms: holding position")
            target = self._target
        try:
            driver.command(target)
        except P.BusError as exc:
            self.counts["failed_writes"] += 1
            self._last_bus_error = str(exc)
            self.get_logger().error(f"bus write failed: {exc}", throttle_duration_sec=1.0)

    def _publish_state(self, positions: np.ndarray, velocities: np.ndarray) -> None:
        state = JointState()
        state.header.stamp = self.get_clock().now().to_msg()
        state.name = list(JOINT_NAMES)
        state.position = positions.tolist()
        state.velocity = velocities.tolist()
        self._state_pub.publish(state)

    def _publish_diagnostics(self) -> None:
        driver = self._driver
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        port = driver.bus.port_name
        for health in driver.health:
            counters = driver.bus.counters.get(health.servo_id, P.BusCounters())
            now = _Window(health.missed_cycles, counters.timeouts, counters.corrupt,
                          sum(health.status_error_counts.values()))
            before = self._windows.get(health.servo_id, _Window())
            self._windows[health.servo_id] = now
            status = DiagnosticStatus(name=f"so101_driver: {health.joint} (ID {health.servo_id})", hardware_id=port)
            if health.consecutive_misses:
                status.level = DiagnosticStatus.ERROR
                status.message = (f"{health.joint} not answering for {health.consecutive_misses} cycles: "
                                  f"joint states withheld")
            elif health.error_bits:
                status.level, status.message = DiagnosticStatus.ERROR, "servo reports " + ", ".join(health.errors)
            elif (now.missed, now.timeouts, now.corrupt, now.status_errors) != (
                    before.missed, before.timeouts, before.corrupt, before.status_errors):
                status.level, status.message = DiagnosticStatus.WARN, "communication errors since the last report"
            else:
                status.level, status.message = DiagnosticStatus.OK, "ok"
            values = {
                "voltage_v": f"{health.voltage_v:.1f}", "temperature_c": f"{health.temperature_c:.0f}",
                "load_percent": f"{health.load_percent:.1f}", "current_ma": f"{health.current_ma:.0f}",
                "error_bits": f"0x{health.error_bits:02X}", "missed_cycles": str(health.missed_cycles),
                "missed_cycles_since_last_report": str(now.missed - before.missed),
                "consecutive_missed_cycles": str(health.consecutive_misses),
                "timeouts": str(counters.timeouts), "corrupt_frames": str(counters.corrupt),
                "retries": str(counters.retries), "last_comm_error": health.last_comm_error,
            }
            values.update({f"errors_{k}": str(v) for k, v in health.status_error_counts.items()})
            status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
            msg.status.append(status)
        loop = DiagnosticStatus(name="so101_driver: loop", hardware_id=port)
        if self._last_bus_error:
            loop.level, loop.message = DiagnosticStatus.ERROR, f"bus failing: {self._last_bus_error}"
            self._last_bus_error = ""
        elif self._holding:
            loop.level, loop.message = DiagnosticStatus.WARN, "holding (no commands)"
        else:
            loop.level, loop.message = DiagnosticStatus.OK, "running"
        loop.values = [KeyValue(key="cycles", value=str(driver.cycles))] + [
            KeyValue(key=k, value=str(v)) for k, v in self.counts.items()]
        msg.status.append(loop)
        self._diag_pub.publish(msg)


def _autostart(node: DriverNode) -> bool:
    """Configure and activate at startup when asked (no lifecycle manager); False when that failed."""
    if not node.get_parameter("autostart").value:
        return True
    if node.trigger_configure() == _SUCCESS and node.trigger_activate() == _SUCCESS:
        return True
    node.get_logger().error("autostart failed (see above); exiting")
    return False


def main(args: list[str] | None = None) -> None:
    sys.exit(spin_node(DriverNode, "so101_driver", args if args is not None else sys.argv,
                       cleanup=DriverNode.release, start=_autostart))


if __name__ == "__main__":
    main()
