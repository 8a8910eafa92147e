"""``so101-calibrate``: calibrate the arm on its bus, or import a LeRobot calibration, into a YAML file.

Procedure on the arm (the same as LeRobot's, so the two agree):
1. torque off, Lock = 0 (EEPROM writable), position mode;
2. the user puts every joint in the middle of its range: Homing_Offset = raw position - 2047, so the middle
   pose reads 2047 (the zero pose of the URDF);
3. the user moves every joint through its whole range while min/max are recorded (wrist_roll turns fully:
   its range is the whole turn);
4. Min/Max_Position_Limit = the recorded range, Lock = 1; the YAML is written.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from so101_common.graph import JOINT_NAMES, SERVO_IDS
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration, CalibrationError, MotorCalibration

HALF_TURN = 2047
FULL_TURN_JOINTS = ("wrist_roll",)
DEFAULT_OUTPUT = Path("config/calibration/so101.yaml")


class Calibrator:
    """The calibration steps on an open bus; the CLI adds the prompts."""

    def __init__(self, bus: P.ServoBus, ids: tuple[int, ...] = SERVO_IDS) -> None:
        self.bus = bus
        self.ids = dict(zip(JOINT_NAMES, ids))
        self.offsets: dict[str, int] = {}
        self.range_min: dict[str, int] = {}
        self.range_max: dict[str, int] = {}

    def prepare(self) -> None:
        """Torque off and unlock every servo; reset offsets and limits so raw positions read over the full turn."""
        for servo_id in self.ids.values():
            self.bus.write(servo_id, P.TORQUE_ENABLE, 0, strict=False)
            self.bus.write(servo_id, P.LOCK, 0, strict=False)
            self.bus.write(servo_id, P.OPERATING_MODE, 0, strict=False)
            self.bus.write(servo_id, P.HOMING_OFFSET, 0, strict=False)
            self.bus.write(servo_id, P.MIN_POSITION_LIMIT, 0, strict=False)
            self.bus.write(servo_id, P.MAX_POSITION_LIMIT, P.MAX_TICK, strict=False)

    def set_middle(self) -> dict[str, int]:
        """Write Homing_Offset so the present (middle) pose reads 2047 on every servo."""
        for joint, servo_id in self.ids.items():
            raw = self.bus.read(servo_id, P.PRESENT_POSITION, strict=False)
            offset = raw - HALF_TURN
            self.bus.write(servo_id, P.HOMING_OFFSET,
                           P.encode_sign_magnitude(offset, P.HOMING_OFFSET_SIGN_BIT), strict=False)
            self.offsets[joint] = offset
            self.range_min[joint] = self.range_max[joint] = HALF_TURN
        return dict(self.offsets)

    def sample(self) -> dict[str, int]:
        """Read every joint once and widen its recorded range."""
        positions = {}
        for joint, servo_id in self.ids.items():
            position = self.bus.read(servo_id, P.PRESENT_POSITION, strict=False)
            positions[joint] = position
            self.range_min[joint] = min(self.range_min[joint], position)
            self.range_max[joint] = max(self.range_max[joint], position)
        return positions

    def sweep(self, done: Callable[[], bool], period_s: float = 0.02,
              show: Callable[[dict[str, int]], None] | None = None) -> None:
        while not done():
            positions = self.sample()
            if show is not None:
                show(positions)
            time.sleep(period_s)

    def finish(self) -> ArmCalibration:
        """Write the limits, lock the EEPROM and return the calibration."""
        if not self.offsets:
            raise CalibrationError("set_middle() was not run")
        motors = {}
        for joint, servo_id in self.ids.items():
            lo, hi = (0, P.MAX_TICK) if joint in FULL_TURN_JOINTS else (self.range_min[joint], self.range_max[joint])
            if hi <= lo:
                raise CalibrationError(f"{joint} (ID {servo_id}) did not move during the sweep "
                                       f"(range {lo}..{hi}); move every joint end to end")
            self.bus.write(servo_id, P.MIN_POSITION_LIMIT, lo, strict=False)
            self.bus.write(servo_id, P.MAX_POSITION_LIMIT, hi, strict=False)
            self.bus.write(servo_id, P.LOCK, 1, strict=False)
            motors[joint] = MotorCalibration(servo_id, 0, self.offsets[joint], lo, hi)
        return ArmCalibration(motors)


def _interactive(bus: P.ServoBus) -> ArmCalibration:
    calibrator = Calibrator(bus)
    for joint, servo_id in calibrator.ids.items():
        try:
            bus.ping(servo_id)
        except P.CommError as exc:
            raise P.MissingServoError(f"{joint} (ID {servo_id}) does not answer on {bus.port_name}: {exc}") from exc
    calibrator.prepare()
    input("Torque is off. Move every joint to the MIDDLE of its range, then press Enter... ")
    calibrator.set_middle()
    print("Now move every joint through its WHOLE range (wrist_roll may be skipped). Press Enter when done.")
    stop = threading.Event()
    threading.Thread(target=lambda: (input(), stop.set()), daemon=True).start()

    def show(positions: dict[str, int]) -> None:
        line = "  ".join(f"{j}:{calibrator.range_min[j]}..{calibrator.range_max[j]}" for j in positions)
        print("\r" + line, end="", flush=True)

    calibrator.sweep(stop.is_set, show=show)
    print()
    return calibrator.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="so101-calibrate",
        description="Calibrate the SO-101 (servos 1-6 on one bus) or import a LeRobot calibration JSON.")
    parser.add_argument("--port", help="serial port of the servo bus, e.g. /dev/ttyACM0")
    parser.add_argument("--baudrate", type=int, default=P.DEFAULT_BAUDRATE)
    parser.add_argument("--from-lerobot", type=Path, metavar="JSON",
                        help="convert LeRobot's calibration file instead of calibrating on the bus")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"YAML to write ({DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if (args.port is None) == (args.from_lerobot is None):
        parser.error("give exactly one of --port (calibrate on the arm) or --from-lerobot JSON (import)")
    try:
        if args.from_lerobot is not None:
            calibration = ArmCalibration.from_lerobot(args.from_lerobot)
        else:
            with P.ServoBus(args.port, args.baudrate) as bus:
                calibration = _interactive(bus)
    except (CalibrationError, P.BusError) as exc:
        print(f"so101-calibrate: {exc}", file=sys.stderr)
        return 1
    path = calibration.save_yaml(args.output)
    print(f"calibration written to {path}")
    for joint, motor in calibration.motors.items():
        print(f"  {joint:14s} id={motor.id} offset={motor.homing_offset:5d} range={motor.range_min}..{motor.range_max}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
