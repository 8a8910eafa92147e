"""Feetech STS3215 bus protocol (no ROS): control table, frames, errors and a ServoBus over a serial port.

Frames are Dynamixel protocol 1.0 compatible (``FF FF ID LEN INST PARAMS CHK``, little-endian fields), so
dynamixel_sdk's PortHandler and protocol-1.0 packet handler carry ping/read/write/sync write. Feetech's
SYNC_READ (0x82), which dynamixel_sdk's protocol 1.0 lacks, is built here: one request, then one status frame per
servo in ID order. Every transaction has a deadline and a bounded number of retries.
"""
from __future__ import annotations

import select
import termios
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from dynamixel_sdk import PortHandler, Protocol1PacketHandler
from dynamixel_sdk.protocol1_packet_handler import PKT_ERROR, PKT_ID, PKT_INSTRUCTION, PKT_LENGTH, PKT_PARAMETER0
from dynamixel_sdk.robotis_def import (BROADCAST_ID, COMM_RX_CORRUPT, COMM_RX_TIMEOUT, COMM_SUCCESS, INST_PING,
                                       INST_READ, INST_WRITE)

INST_SYNC_READ = 0x82
DEFAULT_BAUDRATE = 1_000_000
STS3215_MODEL = 777
TICKS_PER_TURN = 4096
MAX_TICK = TICKS_PER_TURN - 1


class Register(NamedTuple):
    """One control-table field: byte address and size (1 or 2 bytes, little-endian)."""

    address: int
    size: int


# STS3215 control table (EEPROM below Torque_Enable; EEPROM writes need Lock = 0).
MODEL_NUMBER = Register(3, 2)
ID = Register(5, 1)
RETURN_DELAY_TIME = Register(7, 1)
MIN_POSITION_LIMIT = Register(9, 2)
MAX_POSITION_LIMIT = Register(11, 2)
P_COEFFICIENT = Register(21, 1)
D_COEFFICIENT = Register(22, 1)
I_COEFFICIENT = Register(23, 1)
HOMING_OFFSET = Register(31, 2)
OPERATING_MODE = Register(33, 1)
TORQUE_ENABLE = Register(40, 1)
ACCELERATION = Register(41, 1)
GOAL_POSITION = Register(42, 2)
LOCK = Register(55, 1)
PRESENT_POSITION = Register(56, 2)
PRESENT_VELOCITY = Register(58, 2)
PRESENT_LOAD = Register(60, 2)
PRESENT_VOLTAGE = Register(62, 1)
PRESENT_TEMPERATURE = Register(63, 1)
PRESENT_CURRENT = Register(69, 2)

# Sign-magnitude fields: the bit that carries the sign.
HOMING_OFFSET_SIGN_BIT = 11
VELOCITY_SIGN_BIT = 15
LOAD_SIGN_BIT = 10
CURRENT_SIGN_BIT = 15

# The block the control loop reads in one SYNC_READ: Present_Position .. Present_Current (56..70).
FEEDBACK_START = PRESENT_POSITION.address
FEEDBACK_LENGTH = PRESENT_CURRENT.address + PRESENT_CURRENT.size - FEEDBACK_START


def encode_sign_magnitude(value: int, sign_bit: int) -> int:
    """Signed int -> raw field with the sign in ``sign_bit`` (Feetech's encoding, not two's complement)."""
    magnitude = abs(int(value))
    if magnitude >= 1 << sign_bit:
        raise ValueError(f"{value} does not fit a sign-magnitude field with the sign in bit {sign_bit}")
    return magnitude | ((1 << sign_bit) if value < 0 else 0)


def decode_sign_magnitude(raw: int, sign_bit: int) -> int:
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def checksum(body: Iterable[int]) -> int:
    """Checksum of ID..last parameter: inverted low byte of the sum."""
    return ~sum(body) & 0xFF


# --- errors -----------------------------------------------------------------------------------------------


class BusError(Exception):
    """Anything that went wrong talking to the servos."""


class CommError(BusError):
    """No valid reply: the servo is silent, the frame is corrupt or truncated."""

    def __init__(self, servo_id: int, message: str) -> None:
        super().__init__(f"servo ID {servo_id}: {message}")
        self.servo_id = servo_id


class ServoTimeout(CommError):
    pass


class CorruptFrame(CommError):
    """Bad checksum, truncated frame or garbage where a status frame was expected."""


class MissingServoError(BusError):
    pass


class ServoStatusError(BusError):
    """A status frame with error bits set; ``names`` lists every bit that was set."""

    bit = 0

    def __init__(self, servo_id: int, bits: int) -> None:
        self.servo_id = servo_id
        self.bits = bits
        self.names = status_error_names(bits)
        super().__init__(f"servo ID {servo_id} reports {', '.join(self.names)} (status 0x{bits:02X})")


class VoltageError(ServoStatusError):
    bit = 0x01


class AngleError(ServoStatusError):
    bit = 0x02


class OverheatError(ServoStatusError):
    bit = 0x04


class OverCurrentError(ServoStatusError):
    bit = 0x08


class OverloadError(ServoStatusError):
    bit = 0x20


STATUS_ERRORS: dict[str, type[ServoStatusError]] = {
    "voltage": VoltageError,
    "angle": AngleError,
    "overheat": OverheatError,
    "overcurrent": OverCurrentError,
    "overload": OverloadError,
}


def status_error_names(bits: int) -> list[str]:
    names = [name for name, cls in STATUS_ERRORS.items() if bits & cls.bit]
    unknown = bits & ~sum(cls.bit for cls in STATUS_ERRORS.values())
    if unknown:
        names.append(f"unknown(0x{unknown:02X})")
    return names


def raise_for_status(servo_id: int, bits: int) -> None:
    """Raise the named exception of the lowest error bit set (its message names all of them)."""
    for cls in STATUS_ERRORS.values():
        if bits & cls.bit:
            raise cls(servo_id, bits)
    if bits:
        raise ServoStatusError(servo_id, bits)


# --- transport ----------------------------------------------------------------------------------------------


class _DeadlinePort(PortHandler):
    """dynamixel_sdk's PortHandler with our reply deadline and a blocking wait instead of a busy poll."""

    def __init__(self, port_name: str, reply_timeout_ms: float) -> None:
        super().__init__(port_name)
        self.reply_timeout_ms = reply_timeout_ms

    def setPacketTimeout(self, packet_length: int) -> None:  # noqa: N802 (dynamixel_sdk's name)
        self.packet_start_time = self.getCurrentTime()
        self.packet_timeout = self.tx_time_per_byte * packet_length + self.reply_timeout_ms

    def readPort(self, length: int) -> bytes:  # noqa: N802
        if self.ser.in_waiting == 0:
            remaining_s = max(0.0, (self.packet_timeout - self.getTimeSinceStart()) / 1000.0)
            select.select([self.ser.fileno()], [], [], min(remaining_s, 0.05))
        return self.ser.read(length)


@dataclass(frozen=True)
class StatusFrame:
    servo_id: int
    error_bits: int
    params: bytes


@dataclass
class BusCounters:
    """Per-servo transaction outcomes since the bus was opened."""

    ok: int = 0
    timeouts: int = 0
    corrupt: int = 0
    retries: int = 0
    status_errors: int = 0
    last_error_bits: int = 0


class ServoBus:
    """One serial bus of STS3215 servos: ping/read/write/sync write/sync read with deadlines and retries."""

    def __init__(self, port: str, baudrate: int = DEFAULT_BAUDRATE, reply_timeout_ms: float = 10.0,
                 retries: int = 2) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if reply_timeout_ms <= 0:
            raise ValueError(f"reply_timeout_ms must be > 0, got {reply_timeout_ms}")
        self.port_name = port
        self.baudrate = baudrate
        self.retries = retries
        self._port = _DeadlinePort(port, reply_timeout_ms)
        self._packets = Protocol1PacketHandler()
        self.counters: dict[int, BusCounters] = {}
        self._late_reply_possible = False

    # -- lifecycle
    def open(self) -> None:
        if self._port.getCFlagBaud(self.baudrate) <= 0:
            raise BusError(f"unsupported baud rate {self.baudrate} for {self.port_name}")
        try:
            self._port.setBaudRate(self.baudrate)
        except OSError as exc:  # serial.SerialException is an OSError
            raise BusError(f"cannot open serial port {self.port_name}: {exc}") from exc

    def close(self) -> None:
        if self._port.is_open:
            self._port.closePort()

    @property
    def is_open(self) -> bool:
        return bool(self._port.is_open)

    def __enter__(self) -> "ServoBus":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _serial_errors(self) -> Iterator[None]:
        """An unplugged adapter raises OSError/termios.error deep in pyserial: a BusError naming the port."""
        try:
            yield
        except (OSError, termios.error) as exc:
            raise BusError(f"serial port {self.port_name} failed: {exc}") from exc
        finally:
            self._port.is_using = False

    def _drop_late_reply(self) -> None:
        """After a missed or mismatched reply, wait one more deadline so that a late reply lands and is flushed
        (every transmission starts by flushing the input) instead of being read as the next instruction's reply."""
        if self._late_reply_possible:
            time.sleep(self._port.reply_timeout_ms / 1000.0)
            self._late_reply_possible = False

    def _count(self, servo_id: int) -> BusCounters:
        return self.counters.setdefault(servo_id, BusCounters())

    # -- single-servo transactions
    def _txrx(self, servo_id: int, packet: list[int], n_params: int) -> StatusFrame:
        """Send one instruction and return its status frame, retrying on timeouts and corrupt frames.

        Status frames carry no sequence number: a reply that arrives after its deadline is read as the reply to the
        next instruction. A frame with other than ``n_params`` parameters is such a late reply and is retried.
        """
        if not self._port.is_open:
            raise BusError(f"serial port {self.port_name} is not open")
        counters = self._count(servo_id)
        error: CommError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                counters.retries += 1
            self._drop_late_reply()
            with self._serial_errors():
                rx, result, bits = self._packets.txRxPacket(self._port, list(packet))
            if result == COMM_SUCCESS and rx[PKT_LENGTH] - 2 == n_params:
                counters.ok += 1
                counters.last_error_bits = bits
                if bits:
                    counters.status_errors += 1
                return StatusFrame(servo_id, bits, bytes(rx[PKT_ERROR + 1:PKT_ERROR + 1 + n_params]))
            self._late_reply_possible = True
            if result == COMM_SUCCESS:
                counters.corrupt += 1
                error = CorruptFrame(servo_id, f"status frame with {rx[PKT_LENGTH] - 2} parameters, expected "
                                               f"{n_params} (a late reply to an earlier instruction)")
            elif result == COMM_RX_TIMEOUT:
                counters.timeouts += 1
                error = ServoTimeout(servo_id, f"no reply within {self._port.reply_timeout_ms:g} ms")
            elif result == COMM_RX_CORRUPT:
                counters.corrupt += 1
                error = CorruptFrame(servo_id, "corrupt or truncated status frame (checksum or length)")
            else:
                error = CommError(servo_id, self._packets.getTxRxResult(result))
        assert error is not None
        raise error

    def ping(self, servo_id: int) -> int:
        """Ping one servo and return its model number (777 for an STS3215)."""
        packet = [0] * 6
        packet[PKT_ID] = servo_id
        packet[PKT_LENGTH] = 2
        packet[PKT_INSTRUCTION] = INST_PING
        self._txrx(servo_id, packet, 0)
        return self.read(servo_id, MODEL_NUMBER, strict=False)

    def read(self, servo_id: int, register: Register, strict: bool = True) -> int:
        """Read one field (raw unsigned). ``strict``: status error bits raise their named exception."""
        packet = [0] * 8
        packet[PKT_ID] = servo_id
        packet[PKT_LENGTH] = 4
        packet[PKT_INSTRUCTION] = INST_READ
        packet[PKT_PARAMETER0] = register.address
        packet[PKT_PARAMETER0 + 1] = register.size
        frame = self._txrx(servo_id, packet, register.size)
        if strict:
            raise_for_status(servo_id, frame.error_bits)
        return int.from_bytes(frame.params, "little")

    def write(self, servo_id: int, register: Register, value: int, strict: bool = True) -> None:
        """Write one field and wait for the servo's acknowledgement."""
        data = _field_bytes(register, value)
        packet = [0] * (7 + len(data))
        packet[PKT_ID] = servo_id
        packet[PKT_LENGTH] = 3 + len(data)
        packet[PKT_INSTRUCTION] = INST_WRITE
        packet[PKT_PARAMETER0] = register.address
        packet[PKT_PARAMETER0 + 1:PKT_PARAMETER0 + 1 + len(data)] = data
        frame = self._txrx(servo_id, packet, 0)
        if strict:
            raise_for_status(servo_id, frame.error_bits)

    # -- broadcast transactions
    def sync_write(self, register: Register, values: dict[int, int]) -> None:
        """One SYNC_WRITE frame setting ``register`` on several servos (no reply by design)."""
        if not values:
            return
        params: list[int] = []
        for servo_id, value in values.items():
            params += [servo_id, *_field_bytes(register, value)]
        if not self._port.is_open:
            raise BusError(f"serial port {self.port_name} is not open")
        with self._serial_errors():
            result = self._packets.syncWriteTxOnly(self._port, register.address, register.size, params, len(params))
        if result != COMM_SUCCESS:
            raise BusError(f"sync write to {self.port_name} failed: {self._packets.getTxRxResult(result)}")

    def sync_read(self, address: int, length: int, servo_ids: Sequence[int]
                  ) -> dict[int, StatusFrame | CommError]:
        """Feetech SYNC_READ: one request, one status frame per servo; failed servos are asked again.

        Returns, per servo, its frame (error bits included, not raised) or the CommError of its last attempt.
        """
        results: dict[int, StatusFrame | CommError] = {}
        pending = list(servo_ids)
        if not pending:
            return results
        for attempt in range(self.retries + 1):
            if attempt:
                for servo_id in pending:
                    self._count(servo_id).retries += 1
            with self._serial_errors():
                results.update(self._sync_read_once(address, length, pending))
            pending = [i for i in pending if isinstance(results[i], CommError)]
            if not pending:
                break
        return results

    def _sync_read_once(self, address: int, length: int, servo_ids: Sequence[int]
                        ) -> dict[int, StatusFrame | CommError]:
        if not self._port.is_open:
            raise BusError(f"serial port {self.port_name} is not open")
        packet = [0] * (8 + len(servo_ids))
        packet[PKT_ID] = BROADCAST_ID
        packet[PKT_LENGTH] = 4 + len(servo_ids)
        packet[PKT_INSTRUCTION] = INST_SYNC_READ
        packet[PKT_PARAMETER0] = address
        packet[PKT_PARAMETER0 + 1] = length
        packet[PKT_PARAMETER0 + 2:PKT_PARAMETER0 + 2 + len(servo_ids)] = list(servo_ids)
        result = self._packets.txPacket(self._port, packet)
        if result != COMM_SUCCESS:
            raise BusError(f"sync read request on {self.port_name} failed: {self._packets.getTxRxResult(result)}")
        results: dict[int, StatusFrame | CommError] = {}
        wanted = set(servo_ids)
        # One deadline per expected frame, measured from the request: servos answer one after another.
        frame_time_ms = self._port.tx_time_per_byte * (6 + length)
        self._port.setPacketTimeout(len(packet))
        self._port.packet_timeout += frame_time_ms * len(servo_ids)
        corrupt: set[int] = set()
        while wanted and not self._port.isPacketTimeout():
            rx, rx_result = self._packets.rxPacket(self._port)
            sender = rx[PKT_ID] if len(rx) > PKT_LENGTH else None
            if sender not in wanted:
                continue
            n_params = rx[PKT_LENGTH] - 2
            if rx_result == COMM_SUCCESS and n_params == length:
                counters = self._count(sender)
                counters.ok += 1
                counters.last_error_bits = rx[PKT_ERROR]
                if rx[PKT_ERROR]:
                    counters.status_errors += 1
                data = bytes(rx[PKT_ERROR + 1:PKT_ERROR + 1 + n_params])
                results[sender] = StatusFrame(sender, rx[PKT_ERROR], data)
                wanted.discard(sender)
                corrupt.discard(sender)
            elif rx_result in (COMM_SUCCESS, COMM_RX_CORRUPT):
                corrupt.add(sender)
        for servo_id in wanted:
            counters = self._count(servo_id)
            if servo_id in corrupt:
                counters.corrupt += 1
                results[servo_id] = CorruptFrame(servo_id, "corrupt or truncated status frame in sync read")
            else:
                counters.timeouts += 1
                results[servo_id] = ServoTimeout(servo_id, "no reply to sync read")
        return results


def _field_bytes(register: Register, value: int) -> list[int]:
    value = int(value)
    if not 0 <= value < 1 << (8 * register.size):
        raise ValueError(f"value {value} does not fit the {register.size}-byte field at address {register.address}")
    return list(value.to_bytes(register.size, "little"))


@dataclass(frozen=True)
class Feedback:
    """One servo's decoded feedback block (raw units: ticks, ticks/s, 0.1 % load, 0.1 V, deg C, 6.5 mA)."""

    position: int
    velocity: int
    load: int
    voltage: int
    temperature: int
    current: int
    error_bits: int

    @classmethod
    def decode(cls, frame: StatusFrame) -> "Feedback":
        p = frame.params
        if len(p) != FEEDBACK_LENGTH:
            raise CorruptFrame(frame.servo_id, f"feedback block has {len(p)} bytes, expected {FEEDBACK_LENGTH}")

        def field(register: Register) -> int:
            offset = register.address - FEEDBACK_START
            return int.from_bytes(p[offset:offset + register.size], "little")

        return cls(
            position=field(PRESENT_POSITION),
            velocity=decode_sign_magnitude(field(PRESENT_VELOCITY), VELOCITY_SIGN_BIT),
            load=decode_sign_magnitude(field(PRESENT_LOAD), LOAD_SIGN_BIT),
            voltage=field(PRESENT_VOLTAGE),
            temperature=field(PRESENT_TEMPERATURE),
            current=decode_sign_magnitude(field(PRESENT_CURRENT), CURRENT_SIGN_BIT),
            error_bits=frame.error_bits,
        )

