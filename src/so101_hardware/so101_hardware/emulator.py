"""An emulated bus of STS3215 servos on a pseudo-terminal, for tests, the benchmark and demos without an arm.

Written independently of protocol.py on purpose (its own frame parser and control-table model), so the driver is
checked against a second reading of the Feetech protocol rather than against itself. The servo side: a 256-byte
control table per servo, EEPROM writes refused while Lock = 1, Homing_Offset applied to Present/Goal_Position,
motion toward Goal_Position at a bounded speed while torque is on, and injectable faults (no reply, bad checksum,
status error bits, truncated frames). The driver opens ``emulator.port_name`` exactly like /dev/ttyACM0.

Run ``python -m so101_hardware.emulator`` to serve six servos until Ctrl-C (it prints the port name).
"""
from __future__ import annotations

import argparse
import os
import select
import threading
import time
import tty
from collections import Counter
from dataclasses import dataclass, field

_HEADER = b"\xff\xff"
_BROADCAST = 0xFE
_EEPROM_END = 40  # addresses below this are EEPROM
_ADDR = {"model": 3, "id": 5, "return_delay": 7, "min_limit": 9, "max_limit": 11, "homing_offset": 31,
         "mode": 33, "torque": 40, "accel": 41, "goal": 42, "lock": 55, "position": 56, "velocity": 58,
         "load": 60, "voltage": 62, "temperature": 63, "moving": 66, "current": 69}
FAULT_KINDS = ("no_reply", "bad_checksum", "error_bits", "partial", "late")


def _sum_check(data: bytes) -> int:
    return (~sum(data)) & 0xFF


def _from_sign_magnitude(raw: int, bit: int) -> int:
    return -(raw & ((1 << bit) - 1)) if raw & (1 << bit) else raw & ((1 << bit) - 1)


def _to_sign_magnitude(value: int, bit: int) -> int:
    return min(abs(value), (1 << bit) - 1) | ((1 << bit) if value < 0 else 0)


@dataclass
class Fault:
    kind: str
    remaining: int | None  # None: until cleared
    bits: int = 0
    delay_s: float = 0.0  # "late": the reply leaves this long after the instruction


@dataclass
class EmulatedServo:
    """One servo: control table + a physical shaft angle (ticks, 0..4095 absolute)."""

    servo_id: int
    max_speed: float  # ticks/s toward the goal
    table: bytearray = field(default_factory=lambda: bytearray(256))
    shaft: float = 2048.0
    faults: list[Fault] = field(default_factory=list)
    goal_writes: list[int] = field(default_factory=list)  # Goal_Position after each write, for tests
    _last_update: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.poke(_ADDR["model"], 777, 2)
        self.poke(_ADDR["id"], self.servo_id, 1)
        self.poke(_ADDR["return_delay"], 0, 1)
        self.poke(_ADDR["max_limit"], 4095, 2)
        self.poke(_ADDR["lock"], 1, 1)
        self.poke(_ADDR["voltage"], 74, 1)
        self.poke(_ADDR["temperature"], 33, 1)
        self.poke(_ADDR["goal"], self.present(), 2)

    def peek(self, address: int, size: int) -> int:
        return int.from_bytes(self.table[address:address + size], "little")

    def poke(self, address: int, value: int, size: int) -> None:
        self.table[address:address + size] = int(value).to_bytes(size, "little")

    def offset(self) -> int:
        return _from_sign_magnitude(self.peek(_ADDR["homing_offset"], 2), 11)

    def present(self) -> int:
        return int(round(self.shaft - self.offset())) % 4096

    def step(self, now: float) -> None:
        """Advance the shaft toward the goal (torque on) and refresh the feedback registers."""
        dt, self._last_update = now - self._last_update, now
        velocity = 0.0
        if self.peek(_ADDR["torque"], 1):
            target = (self.peek(_ADDR["goal"], 2) + self.offset()) % 4096
            error = target - self.shaft
            move = max(-self.max_speed * dt, min(self.max_speed * dt, error))
            self.shaft += move
            velocity = move / dt if dt > 0 else 0.0
            load = int(max(-1000, min(1000, 2 * error)))
        else:
            load = 0
        self.poke(_ADDR["position"], self.present(), 2)
        self.poke(_ADDR["velocity"], _to_sign_magnitude(int(round(velocity)), 15), 2)
        self.poke(_ADDR["load"], _to_sign_magnitude(load, 10), 2)
        self.poke(_ADDR["current"], _to_sign_magnitude(abs(load) // 4, 15), 2)
        self.poke(_ADDR["moving"], int(abs(velocity) > 1), 1)

    def store(self, address: int, data: bytes) -> bool:
        """Apply a write; False when refused (EEPROM while locked)."""
        if address < _EEPROM_END and self.peek(_ADDR["lock"], 1):
            return False
        self.table[address:address + len(data)] = data
        if address < _ADDR["goal"] + 2 and address + len(data) > _ADDR["goal"]:
            lo, hi = self.peek(_ADDR["min_limit"], 2), self.peek(_ADDR["max_limit"], 2)
            if lo < hi:
                self.poke(_ADDR["goal"], max(lo, min(hi, self.peek(_ADDR["goal"], 2))), 2)
            self.goal_writes.append(self.peek(_ADDR["goal"], 2))
        return True

    def take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self.faults.pop(0)
        return fault


class BusEmulator:
    """Servos on a pty pair; a thread answers frames written to ``port_name``."""

    def __init__(self, servo_ids: tuple[int, ...] = (1, 2, 3, 4, 5, 6), max_speed: float = 3000.0) -> None:
        self.servos = {i: EmulatedServo(i, max_speed) for i in servo_ids}
        self.instructions: Counter[str] = Counter()
        self.refused_writes = 0
        self.bad_frames = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        tty.setraw(self._master)
        self.port_name = os.ttyname(self._slave)
        self._held: list[tuple[float, bytes]] = []  # late replies (due time, frame), for the serving thread only
        self._thread = threading.Thread(target=self._serve, name="sts3215-emulator", daemon=True)

    # -- control from tests
    def start(self) -> "BusEmulator":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the pty (the port then fails like an unplugged adapter). Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        os.close(self._master)
        os.close(self._slave)

    def __enter__(self) -> "BusEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, servo_id: int, kind: str, count: int | None = 1, bits: int = 0, delay_s: float = 0.0) -> None:
        """Make the next ``count`` replies of a servo faulty (None: until ``clear_faults``)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self.servos[servo_id].faults.append(Fault(kind, count, bits, delay_s))

    def clear_faults(self) -> None:
        with self._lock:
            for servo in self.servos.values():
                servo.faults.clear()

    def remove(self, servo_id: int) -> None:
        """Unplug a servo: it never answers again."""
        with self._lock:
            del self.servos[servo_id]

    def set_shaft(self, servo_id: int, ticks: float) -> None:
        """Move a shaft by hand (absolute ticks, before the homing offset)."""
        with self._lock:
            servo = self.servos[servo_id]
            servo.shaft = float(ticks) % 4096
            servo.step(time.monotonic())

    def shaft(self, servo_id: int) -> float:
        with self._lock:
            servo = self.servos[servo_id]
            servo.step(time.monotonic())
            return servo.shaft

    def goal_writes(self, servo_id: int) -> list[int]:
        """Every Goal_Position the servo took (after its own clamping to the position limits), oldest first."""
        with self._lock:
            return list(self.servos[servo_id].goal_writes)

    def register(self, servo_id: int, address: int, size: int) -> int:
        with self._lock:
            servo = self.servos[servo_id]
            servo.step(time.monotonic())
            return servo.peek(address, size)

    # -- the bus side
    def _serve(self) -> None:
        buffer = bytearray()
        while not self._stop.is_set():
            now = time.monotonic()
            while self._held and self._held[0][0] <= now:
                os.write(self._master, self._held.pop(0)[1])
            wait = min([0.05] + [due - now for due, _ in self._held[:1]])
            ready, _, _ = select.select([self._master], [], [], wait)
            if not ready:
                continue
            try:
                buffer += os.read(self._master, 4096)
            except OSError:
                return
            while True:
                frame = self._take_frame(buffer)
                if frame is None:
                    break
                with self._lock:
                    reply = self._handle(frame)
                if reply:
                    os.write(self._master, reply)

    def _take_frame(self, buffer: bytearray) -> bytes | None:
        """Cut the next complete, checksum-valid instruction frame out of ``buffer`` (None: need more bytes)."""
        while True:
            start = buffer.find(_HEADER)
            if start < 0:
                del buffer[:max(0, len(buffer) - 1)]
                return None
            del buffer[:start]
            if len(buffer) < 4:
                return None
            total = buffer[3] + 4
            if buffer[3] < 2:
                self.bad_frames += 1
                del buffer[:2]
                continue
            if len(buffer) < total:
                return None
            frame = bytes(buffer[:total])
            if _sum_check(frame[2:-1]) != frame[-1]:
                self.bad_frames += 1
                del buffer[:2]
                continue
            del buffer[:total]
            return frame

    def _handle(self, frame: bytes) -> bytes:
        servo_id, instruction, params = frame[2], frame[4], frame[5:-1]
        now = time.monotonic()
        for servo in self.servos.values():
            servo.step(now)
        if instruction == 0x83 and servo_id == _BROADCAST:
            self.instructions["sync_write"] += 1
            address, size = params[0], params[1]
            for k in range(2, len(params), size + 1):
                target = self.servos.get(params[k])
                if target is not None and not target.store(address, bytes(params[k + 1:k + 1 + size])):
                    self.refused_writes += 1
            return b""
        if instruction == 0x82 and servo_id == _BROADCAST:
            self.instructions["sync_read"] += 1
            address, size = params[0], params[1]
            out = b""
            for sid in params[2:]:
                servo = self.servos.get(sid)
                if servo is not None:
                    out += self._status(servo, bytes(servo.table[address:address + size]))
            return out
        servo = self.servos.get(servo_id)
        if servo is None:
            return b""
        if instruction == 0x01:
            self.instructions["ping"] += 1
            return self._status(servo, b"")
        if instruction == 0x02:
            self.instructions["read"] += 1
            address, size = params[0], params[1]
            return self._status(servo, bytes(servo.table[address:address + size]))
        if instruction == 0x03:
            self.instructions["write"] += 1
            if not servo.store(params[0], bytes(params[1:])):
                self.refused_writes += 1
            return self._status(servo, b"")
        self.instructions["unknown"] += 1
        return self._status(servo, b"", bits=0x40)

    def _status(self, servo: EmulatedServo, data: bytes, bits: int = 0) -> bytes:
        fault = servo.take_fault()
        if fault is not None and fault.kind == "no_reply":
            return b""
        if fault is not None and fault.kind == "error_bits":
            bits |= fault.bits
        body = bytes([servo.servo_id, len(data) + 2, bits]) + data
        frame = _HEADER + body + bytes([_sum_check(body)])
        if fault is not None and fault.kind == "bad_checksum":
            frame = frame[:-1] + bytes([frame[-1] ^ 0x5A])
        if fault is not None and fault.kind == "partial":
            frame = frame[:len(frame) // 2]
        if fault is not None and fault.kind == "late":
            self._held.append((time.monotonic() + fault.delay_s, frame))
            self._held.sort(key=lambda held: held[0])
            return b""
        return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an emulated STS3215 bus on a pseudo-terminal.")
    parser.add_argument("--ids", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="servo IDs on the bus")
    args = parser.parse_args(argv)
    with BusEmulator(tuple(args.ids)) as emulator:
        print(f"emulated STS3215 bus with IDs {args.ids} on {emulator.port_name} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
