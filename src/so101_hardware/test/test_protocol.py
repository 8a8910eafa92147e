"""The STS3215 protocol core against the independent bus emulator (pty pair)."""
from __future__ import annotations

import time

import pytest

from so101_hardware import protocol as P
from so101_hardware.emulator import BusEmulator

IDS = (1, 2, 3, 4, 5, 6)


def test_sign_magnitude_fields() -> None:
    assert P.encode_sign_magnitude(-5, 11) == 0x805
    assert P.encode_sign_magnitude(2047, 11) == 2047
    assert P.decode_sign_magnitude(0x805, 11) == -5
    assert P.decode_sign_magnitude(0x8000 | 300, 15) == -300
    for value in (-2047, -1, 0, 1, 1500):
        assert P.decode_sign_magnitude(P.encode_sign_magnitude(value, 11), 11) == value
    with pytest.raises(ValueError, match="bit 11"):
        P.encode_sign_magnitude(2048, 11)


def test_checksum_and_status_error_names() -> None:
    # Ping of ID 1: FF FF 01 02 01 FB
    assert P.checksum([0x01, 0x02, 0x01]) == 0xFB
    assert P.status_error_names(0x01 | 0x04 | 0x20) == ["voltage", "overheat", "overload"]
    with pytest.raises(P.OverloadError, match="overload"):
        P.raise_for_status(3, 0x20)
    with pytest.raises(P.VoltageError, match="voltage, overcurrent"):
        P.raise_for_status(3, 0x09)
    P.raise_for_status(3, 0)


def test_control_table_addresses() -> None:
    assert (P.TORQUE_ENABLE.address, P.ACCELERATION.address) == (40, 41)
    assert (P.GOAL_POSITION.address, P.LOCK.address) == (42, 55)
    assert (P.PRESENT_POSITION.address, P.PRESENT_VELOCITY.address, P.PRESENT_LOAD.address) == (56, 58, 60)
    assert (P.PRESENT_VOLTAGE.address, P.PRESENT_TEMPERATURE.address, P.PRESENT_CURRENT.address) == (62, 63, 69)
    assert (P.HOMING_OFFSET.address, P.MIN_POSITION_LIMIT.address, P.MAX_POSITION_LIMIT.address) == (31, 9, 11)
    assert (P.OPERATING_MODE.address, P.RETURN_DELAY_TIME.address) == (33, 7)
    assert (P.P_COEFFICIENT.address, P.D_COEFFICIENT.address, P.I_COEFFICIENT.address) == (21, 22, 23)
    assert P.FEEDBACK_LENGTH == 15


def test_ping_read_write(emulator: BusEmulator, bus: P.ServoBus) -> None:
    assert [bus.ping(i) for i in IDS] == [P.STS3215_MODEL] * 6
    emulator.set_shaft(2, 1234)
    assert bus.read(2, P.PRESENT_POSITION) == 1234
    bus.write(2, P.ACCELERATION, 17)
    assert emulator.register(2, P.ACCELERATION.address, 1) == 17
    with pytest.raises(ValueError, match="does not fit"):
        bus.write(2, P.GOAL_POSITION, 70000)


def test_sync_read_and_sync_write_move_servos(emulator: BusEmulator, bus: P.ServoBus) -> None:
    for k, servo_id in enumerate(IDS):
        emulator.set_shaft(servo_id, 1000 + 100 * k)
    frames = bus.sync_read(P.FEEDBACK_START, P.FEEDBACK_LENGTH, IDS)
    feedback = {i: P.Feedback.decode(frames[i]) for i in IDS}
    assert [feedback[i].position for i in IDS] == [1000 + 100 * k for k in range(6)]
    assert all(f.voltage == 74 and f.error_bits == 0 for f in feedback.values())
    for servo_id in IDS:
        bus.write(servo_id, P.TORQUE_ENABLE, 1)
    bus.sync_write(P.GOAL_POSITION, {i: 2000 for i in IDS})
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(abs(emulator.shaft(i) - 2000) > 1 for i in IDS):
        time.sleep(0.02)
    assert all(abs(emulator.shaft(i) - 2000) <= 1 for i in IDS)
    assert emulator.instructions["sync_write"] == 1 and emulator.instructions["sync_read"] == 1


def test_homing_offset_shifts_present_position(emulator: BusEmulator, bus: P.ServoBus) -> None:
    emulator.set_shaft(1, 3000)
    bus.write(1, P.LOCK, 0)
    bus.write(1, P.HOMING_OFFSET, P.encode_sign_magnitude(-100, P.HOMING_OFFSET_SIGN_BIT))
    assert bus.read(1, P.PRESENT_POSITION) == 3100


@pytest.mark.parametrize("fault", ["no_reply", "bad_checksum", "partial"])
def test_single_transaction_faults_are_retried(emulator: BusEmulator, bus: P.ServoBus, fault: str) -> None:
    emulator.set_shaft(4, 777)
    emulator.inject(4, fault, count=2)
    assert bus.read(4, P.PRESENT_POSITION) == 777
    counters = bus.counters[4]
    assert counters.retries == 2
    assert (counters.timeouts if fault == "no_reply" else counters.corrupt) == 2


def test_persistent_silence_raises_timeout_after_bounded_retries(emulator: BusEmulator, bus: P.ServoBus) -> None:
    emulator.inject(5, "no_reply", count=None)
    start = time.monotonic()
    with pytest.raises(P.ServoTimeout, match="servo ID 5"):
        bus.ping(5)
    assert time.monotonic() - start < 2.0  # 3 attempts + 2 waits for a late reply, x the fixture's 200 ms, + margin
    assert bus.counters[5].timeouts == 3


def test_a_late_reply_is_not_taken_for_the_next_ones(emulator: BusEmulator) -> None:
    """A reply past its deadline must not answer the retry or the next read (same length, other register)."""
    emulator.set_shaft(4, 1234)
    emulator.inject(4, "late", count=1, delay_s=0.3)  # between one and two 200 ms deadlines
    emulator.inject(4, "late", count=2, delay_s=0.15)  # the next two: slow but in time
    with P.ServoBus(emulator.port_name, reply_timeout_ms=200.0, retries=2) as bus:
        assert bus.read(4, P.PRESENT_POSITION) == 1234
        assert bus.read(4, P.MODEL_NUMBER) == 777
        assert bus.read(4, P.PRESENT_POSITION) == 1234
        assert bus.counters[4].timeouts == 1 and bus.counters[4].ok == 3


def test_error_bits_raise_named_exceptions(emulator: BusEmulator, bus: P.ServoBus) -> None:
    emulator.inject(3, "error_bits", bits=0x04)
    with pytest.raises(P.OverheatError, match="servo ID 3 reports overheat"):
        bus.read(3, P.PRESENT_TEMPERATURE)
    emulator.inject(3, "error_bits", bits=0x02)
    assert bus.read(3, P.PRESENT_POSITION, strict=False) == 2048  # data still valid when not strict
    assert bus.counters[3].status_errors == 2


def test_sync_read_survives_every_fault(emulator: BusEmulator, bus: P.ServoBus) -> None:
    emulator.inject(2, "no_reply")
    emulator.inject(3, "bad_checksum")
    emulator.inject(4, "partial")
    emulator.inject(6, "error_bits", bits=0x20)
    frames = bus.sync_read(P.FEEDBACK_START, P.FEEDBACK_LENGTH, IDS)
    assert all(isinstance(frames[i], P.StatusFrame) for i in IDS)  # the retry recovered all of them
    assert bus.counters[2].timeouts == 1 and bus.counters[3].corrupt == 1 and bus.counters[4].corrupt == 1
    # Servo 5's frame came right after 4's truncated one: either read, or counted and retried.
    assert bus.counters[2].retries == 1


def test_sync_read_reports_a_servo_that_stays_silent(emulator: BusEmulator, bus: P.ServoBus) -> None:
    emulator.inject(6, "no_reply", count=None)
    frames = bus.sync_read(P.FEEDBACK_START, P.FEEDBACK_LENGTH, IDS)
    assert isinstance(frames[6], P.ServoTimeout)
    assert all(isinstance(frames[i], P.StatusFrame) for i in IDS[:5])
    assert bus.counters[6].timeouts == 3


def test_unplugged_adapter_is_a_bus_error(emulator: BusEmulator, bus: P.ServoBus) -> None:
    assert isinstance(bus.sync_read(P.FEEDBACK_START, P.FEEDBACK_LENGTH, IDS)[1], P.StatusFrame)
    emulator.stop()
    with pytest.raises(P.BusError):
        for _ in range(3):  # the first read after the hang-up may still just time out
            bus.sync_read(P.FEEDBACK_START, P.FEEDBACK_LENGTH, IDS)
            bus.ping(1)


def test_unopenable_port_is_a_clear_error() -> None:
    with pytest.raises(P.BusError, match="/dev/does-not-exist"):
        P.ServoBus("/dev/does-not-exist").open()


def test_emulator_parser_handles_split_and_garbage_input(emulator: BusEmulator) -> None:
    import serial

    with serial.Serial(emulator.port_name, 1_000_000, timeout=0.5) as port:
        ping = bytes([0xFF, 0xFF, 0x01, 0x02, 0x01, 0xFB])
        port.write(b"\x00\x13" + ping[:3])
        time.sleep(0.05)
        port.write(ping[3:])
        reply = port.read(6)
    assert reply == bytes([0xFF, 0xFF, 0x01, 0x02, 0x00, 0xFC])
