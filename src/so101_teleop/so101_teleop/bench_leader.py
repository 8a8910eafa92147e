"""Leader -> follower latency over DDS: ``python -m so101_teleop.bench_leader`` (prints one JSON line, asserts nothing).

Two emulated STS3215 buses on ptys; the driver node (standalone, 100 Hz) on the follower bus and the leader node
on the leader bus, each its own process as a user starts them. A leader joint is moved by a small step (below the
driver's per-cycle limit, so the step arrives in one cycle); the latency is the time from that move to the
follower servo's Goal_Position holding the mirrored value: leader tick wait + SYNC_READ + DDS + the driver's
cycle wait + SYNC_WRITE, as a real pair of arms would see it (the emulators run in this process, which also polls).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from so101_common.dds import claim_private_domain, require_loopback
from so101_common.graph import JOINT_NAMES
from so101_common.process import NodeProcess
from so101_hardware import protocol as P
from so101_hardware.calibration import ArmCalibration
from so101_hardware.emulator import BusEmulator
from so101_teleop.leader import Mirror, MirrorSettings


def _pose(emulator: BusEmulator, cal: ArmCalibration, q: np.ndarray) -> None:
    for motor, ticks in zip(cal.motors.values(), cal.to_ticks(q)):
        emulator.set_shaft(motor.id, ticks + motor.homing_offset)


def _wait_goal(emulator: BusEmulator, servo_id: int, expected: int, timeout_s: float) -> float | None:
    """Poll the follower servo's Goal_Position until it holds ``expected`` (+-1 tick); the time it did, or None."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if abs(emulator.register(servo_id, P.GOAL_POSITION.address, 2) - expected) <= 1:
            return time.perf_counter()
        time.sleep(0.0002)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=200, help="leader moves measured")
    parser.add_argument("--leader-rate", type=float, default=100.0, help="leader node rate_hz")
    parser.add_argument("--driver-rate", type=float, default=100.0, help="driver node rate_hz")
    parser.add_argument("--joint", default="wrist_flex", choices=JOINT_NAMES[:5], help="the leader joint moved")
    args = parser.parse_args(argv)
    require_loopback()
    claim_private_domain()

    cal = ArmCalibration.default()  # the same calibration on both arms: the mirror is then 1:1 in ticks
    mirror = Mirror(MirrorSettings())
    k = JOINT_NAMES.index(args.joint)
    servo_id = cal.ids[k]
    bus_params = ["-p", "reply_timeout_ms:=20.0"]
    with tempfile.TemporaryDirectory() as tmp, BusEmulator() as leader_bus, BusEmulator() as follower_bus:
        pose = np.array([0.0, -0.3, 0.4, 0.1, 0.0, 0.5])
        _pose(follower_bus, cal, pose)
        _pose(leader_bus, cal, pose)
        nodes = [
            NodeProcess("so101_hardware.driver_node", ["--ros-args", "-p", f"port:={follower_bus.port_name}",
                                                       "-p", "mode:=standalone", "-p", "autostart:=true",
                                                       "-p", f"rate_hz:={args.driver_rate}", *bus_params],
                        Path(tmp) / "driver.log"),
            NodeProcess("so101_teleop.leader_node", ["--ros-args", "-p", f"port:={leader_bus.port_name}",
                                                     "-p", "keyboard:=false", "-p", "catchup_speed:=2.0",
                                                     "-p", f"rate_hz:={args.leader_rate}", *bus_params],
                        Path(tmp) / "leader.log"),
        ]
        try:
            deadline = time.monotonic() + 60.0
            while "follower reached the leader" not in nodes[1].output():
                if time.monotonic() > deadline or not all(n.alive() for n in nodes):
                    raise SystemExit("bench_leader: the nodes did not start mirroring:\n"
                                     + "\n".join(n.output()[-2000:] for n in nodes))
                time.sleep(0.1)
            latencies, missed = [], 0
            reads0, writes0, t_start = (leader_bus.instructions["sync_read"], follower_bus.instructions["sync_write"],
                                        time.perf_counter())
            for move in range(args.moves):
                pose[k] += 0.02 if (move // 20) % 2 == 0 else -0.02  # 0.02 rad: below the driver's max_step
                expected = int(cal.to_ticks(mirror.map(cal.to_radians(cal.to_ticks(pose))))[k])
                _pose(leader_bus, cal, pose)
                moved = time.perf_counter()
                arrived = _wait_goal(follower_bus, servo_id, expected, 0.5)
                if arrived is None:
                    missed += 1
                else:
                    latencies.append((arrived - moved) * 1e3)
                time.sleep(random.uniform(0.005, 0.02))  # de-phase the moves from both nodes' timers
            elapsed = time.perf_counter() - t_start
            reads = leader_bus.instructions["sync_read"] - reads0
            writes = follower_bus.instructions["sync_write"] - writes0
        finally:
            for node in nodes:
                node.stop()
    ms = np.array(latencies)
    print(json.dumps({
        "what": "leader shaft move -> follower Goal_Position (two pty emulators, driver + leader node over DDS)",
        "moves": args.moves, "measured": len(latencies), "missed": missed,
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "latency_ms_max": round(float(ms.max()), 2) if len(ms) else None,
        "leader_rate_hz_set": args.leader_rate, "leader_sync_reads_hz": round(reads / elapsed, 1),
        "driver_rate_hz_set": args.driver_rate, "follower_sync_writes_hz": round(writes / elapsed, 1),
    }))


if __name__ == "__main__":
    main()
