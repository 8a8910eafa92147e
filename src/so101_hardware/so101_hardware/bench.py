"""Benchmark: one control cycle (SYNC_READ of the feedback block + SYNC_WRITE of goals) for 6 servos.

Against the emulator (default) it measures the software cost of a cycle; ``--port`` measures a real bus.
It also prints the frame-size arithmetic that bounds the loop rate on a real 1 Mbaud bus.
Run: ``python -m so101_hardware.bench [--cycles 2000] [--port /dev/ttyACM0]``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from so101_common.graph import SERVO_IDS
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration
from so101_hardware.driver import ArmDriver
from so101_hardware.emulator import BusEmulator


def wire_time_ms(n_servos: int, baudrate: int, return_delay_us: float = 0.0) -> dict[str, float]:
    """Bytes on the wire per cycle and their time at ``baudrate`` (10 bits per byte: start + 8 data + stop)."""
    request = 2 + 1 + 1 + 1 + 2 + n_servos + 1  # FF FF FE LEN 82 addr len ids.. CHK
    replies = n_servos * (2 + 1 + 1 + 1 + P.FEEDBACK_LENGTH + 1)  # FF FF ID LEN ERR data CHK
    write = 2 + 1 + 1 + 1 + 2 + n_servos * (1 + P.GOAL_POSITION.size) + 1  # FF FF FE LEN 83 addr len (id lo hi).. CHK
    total = request + replies + write
    ms = total * 10 / baudrate * 1000 + n_servos * return_delay_us / 1000
    return {"request_bytes": request, "reply_bytes": replies, "write_bytes": write, "total_bytes": total,
            "wire_ms": ms}


def measure(driver: ArmDriver, cycles: int) -> np.ndarray:
    target = driver.enable()
    durations = np.empty(cycles)
    for k in range(cycles):
        start = time.perf_counter()
        driver.read()
        driver.command(target)
        durations[k] = time.perf_counter() - start
    driver.disable()
    return durations * 1000.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--port", help="a real bus instead of the emulator")
    parser.add_argument("--baudrate", type=int, default=P.DEFAULT_BAUDRATE)
    args = parser.parse_args(argv)

    arithmetic = wire_time_ms(len(SERVO_IDS), args.baudrate)
    print(f"frame sizes for {len(SERVO_IDS)} servos: SYNC_READ request {arithmetic['request_bytes']} B, "
          f"replies {arithmetic['reply_bytes']} B, SYNC_WRITE {arithmetic['write_bytes']} B, "
          f"total {arithmetic['total_bytes']} B")
    print(f"wire time at {args.baudrate} baud: {arithmetic['wire_ms']:.2f} ms per cycle "
          f"-> at most {1000 / arithmetic['wire_ms']:.0f} Hz from the bus alone")

    emulator = None if args.port else BusEmulator(SERVO_IDS).start()
    port = args.port or emulator.port_name
    try:
        with P.ServoBus(port, args.baudrate) as bus:
            driver = ArmDriver(bus, ArmCalibration.default(), max_step=0.05)
            driver.connect()
            measure(driver, min(100, args.cycles))  # warm-up
            ms = measure(driver, args.cycles)
    finally:
        if emulator is not None:
            emulator.stop()
    where = f"real bus {args.port}" if args.port else "emulator on a pty"
    print(f"read+write cycle ({where}, {args.cycles} cycles): mean {ms.mean():.3f} ms, "
          f"p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms, max {ms.max():.3f} ms")
    print(f"achievable loop rate: {1000 / ms.mean():.0f} Hz mean, {1000 / np.percentile(ms, 99):.0f} Hz at p99")


if __name__ == "__main__":
    main()
